"""Zeroth-order descent with two-point (SPSA) gradient estimates (MATH.md section 7).

    g^ = 1/k sum_j (f(x + mu z_j) - f(x - mu z_j)) / (2 mu) z_j,   z_j ~ N(0, I)
    x+ = x - eta_t g^

Only ``problem.loss`` is called (2k evaluations per step). ``state.grad``
holds the estimate g^, so the driver's tolerance test and the trace use it
(a noisy test: ``E||g^||^2 >= ||grad f||^2``, but one draw can fall below).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from attnopt.solvers.state import Solver, SolverState, advance, cached_solver, start


class ZerothOrderInner(NamedTuple):
    """key: the PRNG key for the next directions."""

    key: jax.Array


def spsa_gradient(loss, x, key, num_directions: int, smoothing=None) -> jax.Array:
    """Two-point estimate of ``grad loss(x)`` for flat x (N,) from ``num_directions`` Gaussian directions.

    ``smoothing`` mu defaults to ``eps^(1/3)`` of x's dtype (the central-difference optimum).
    """
    mu = jnp.finfo(x.dtype).eps ** (1 / 3) if smoothing is None else smoothing
    z = jax.random.normal(key, (num_directions, x.size), x.dtype)
    differences = jax.vmap(lambda zj: loss(x + mu * zj) - loss(x - mu * zj))(z)
    return (differences / (2 * mu)) @ z / num_directions


@cached_solver
def zeroth_order(
    learning_rate: float | Callable = 0.1, *, num_directions: int = 8, smoothing: float | None = None, seed: int = 0
) -> Solver:
    """SPSA descent ``x <- x - eta_t g^``.

    Args:
      learning_rate: a constant eta or an optax schedule ``count -> eta_t``
        (e.g. ``optax.exponential_decay(0.1, 100, 0.5)``).
      num_directions: k, directions per estimate.
      smoothing: finite-difference radius mu (default ``eps^(1/3)`` of the dtype).
      seed: PRNG seed; the key lives in ``state.inner.key``.
    """
    if int(num_directions) < 1:
        raise ValueError(f"num_directions must be >= 1, got {num_directions}")
    if smoothing is not None and not smoothing > 0:
        raise ValueError(f"smoothing must be > 0, got {smoothing}")
    schedule = learning_rate if callable(learning_rate) else (lambda count: learning_rate)

    def estimate(problem, params, key):
        x, unravel = ravel_pytree(params)
        g = spsa_gradient(lambda y: problem.loss(unravel(y)), x, key, num_directions, smoothing)
        return unravel(g)

    def init(problem, params) -> SolverState:
        key, sub = jax.random.split(jax.random.key(seed))
        return start(problem, params, ZerothOrderInner(key), grad=estimate(problem, params, sub))

    def step(problem, state: SolverState) -> SolverState:
        eta = schedule(state.count)
        params = jax.tree.map(lambda x, g: (x - eta * g).astype(x.dtype), state.params, state.grad)
        key, sub = jax.random.split(state.inner.key)
        return advance(state, params, problem.loss(params), estimate(problem, params, sub), ZerothOrderInner(key))

    return Solver("zeroth_order", init, step)
