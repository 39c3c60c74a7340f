"""Zeroth-order descent with two-point (SPSA) gradient estimates (docs/math.md, Zeroth-order (SPSA)).

    mu = smoothing * (1 + ||x|| / sqrt(N))                       radius relative to the scale of x
    g^ = 1/k sum_j (f(x + mu z_j) - f(x - mu z_j)) / (2 mu) z_j,   z_j ~ N(0, I)
    x+ = x - eta_t g^

Only ``problem.loss`` is called in the steps (2k evaluations each); ``state.grad`` holds the
estimate g^ and the trace records its norm. An estimate never declares convergence: the
stopping test confirms ``||grad f|| <= tol`` with the problem's true gradient.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from attnopt.solvers.state import (
    Solver, SolverState, Tolerance, advance, cauchy, check_count, check_option, gradient_small, solver_class, start, static,
)


class ZerothOrderInner(NamedTuple):
    """key: the PRNG key for the next directions."""

    key: jax.Array


def spsa_gradient(loss, x, key, num_directions: int, smoothing) -> jax.Array:
    """Two-point estimate of ``grad loss(x)`` for flat x (N,) from ``num_directions`` Gaussian directions,
    with radius ``smoothing * (1 + ||x|| / sqrt(N))``."""
    mu = smoothing * (1 + jnp.linalg.norm(x) / jnp.sqrt(x.size).astype(x.dtype))
    z = jax.random.normal(key, (num_directions, x.size), x.dtype)
    differences = jax.vmap(lambda zj: loss(x + mu * zj) - loss(x - mu * zj))(z)
    return (differences / (2 * mu)) @ z / num_directions


@solver_class
class ZerothOrder(Solver):
    """SPSA descent (build with :func:`zeroth_order`)."""

    learning_rate: Any = 0.1
    smoothing: Any = None
    seed: Any = 0
    schedule: Callable | None = static(None)
    num_directions: int = static(8)
    name = "zeroth_order"

    def _estimate(self, problem, params, key):
        x, unravel = ravel_pytree(params)
        smoothing = jnp.finfo(x.dtype).eps ** (1 / 3) if self.smoothing is None else self.smoothing
        g = spsa_gradient(lambda y: problem.loss(unravel(y)), x, key, self.num_directions, smoothing)
        return unravel(g)

    def init(self, problem, params) -> SolverState:
        key, sub = jax.random.split(jax.random.key(self.seed))
        return start(problem, params, ZerothOrderInner(key), grad=self._estimate(problem, params, sub))

    def step(self, problem, state: SolverState) -> SolverState:
        eta = self.learning_rate if self.schedule is None else self.schedule(state.count)
        params = jax.tree.map(lambda x, g: (x - eta * g).astype(x.dtype), state.params, state.grad)
        key, sub = jax.random.split(state.inner.key)
        grad = self._estimate(problem, params, sub)
        return advance(state, params, problem.loss(params), grad, ZerothOrderInner(key))

    def terminate(self, problem, state: SolverState, previous: SolverState, tolerance: Tolerance) -> jax.Array:
        """The gradient test on the true gradient (evaluated only when the estimate passes), or the Cauchy test."""
        estimate_small = gradient_small(state, tolerance)
        true_small = jax.lax.cond(
            estimate_small, lambda: gradient_small(state._replace(grad=problem.grad(state.params)), tolerance),
            lambda: jnp.asarray(False),
        )
        return true_small | cauchy(state, previous, tolerance)


def zeroth_order(
    learning_rate: float | Callable = 0.1, *, num_directions: int = 8, smoothing: float | None = None, seed: int = 0
) -> ZerothOrder:
    """SPSA descent ``x <- x - eta_t g^``.

    Args:
      learning_rate: a constant eta > 0 (traced) or an optax schedule ``count -> eta_t``
        (e.g. ``optax.exponential_decay(0.1, 100, 0.5)``; static: build it once).
      num_directions: k, directions per estimate (static).
      smoothing: relative finite-difference radius (default ``eps^(1/3)`` of the dtype; traced).
      seed: PRNG seed (traced); the key lives in ``state.inner.key``.
    """
    num_directions = check_count("num_directions", num_directions, 1, 2**20)
    if smoothing is not None:
        check_option("smoothing", smoothing, lambda x: x > 0, "> 0")
    if callable(learning_rate):
        return ZerothOrder(0.0, smoothing, seed, learning_rate, num_directions)
    check_option("learning_rate", learning_rate, lambda x: x > 0, "> 0")
    return ZerothOrder(learning_rate, smoothing, seed, None, num_directions)
