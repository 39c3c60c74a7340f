"""Gradient-regularised Newton with the adaptive acceptance rule (MATH.md section 7).

One step, with the curvature matrix H (exact, or sketched when ``eps`` is given)::

    lam = ||g|| / gamma,   x+ = x - (H + lam I)^{-1} g
    accept iff f(x) - f(x+) >= ||grad f(x+)||^2 / (8 lam):  gamma <- 2 gamma
    else gamma <- gamma / 2 and retry (inside the step, up to ``max_tries`` times)

If H + lam I is not positive definite lam is raised further (Levenberg).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from attnopt.solvers.approx_newton import sketched
from attnopt.solvers.linesearch import value_noise
from attnopt.solvers.newton import EXACT, levenberg_cholesky
from attnopt.solvers.state import Solver, SolverState, advance, cached_solver, start, tree_norm


class RegularizedNewtonInner(NamedTuple):
    """gamma: the adaptive regularisation parameter; model: the curvature model's state."""

    gamma: jax.Array
    model: Any


@cached_solver
def regularized_newton(
    gamma: float = 1.0, *, eps: float | None = None, seed: int = 0, oversample: float = 4.0, max_tries: int = 50
) -> Solver:
    """Gradient-regularised Newton.

    Args:
      gamma: initial gamma > 0 (lam = ||g|| / gamma).
      eps: if given, use the leverage-sampled Hessian of
        :func:`attnopt.solvers.approx_newton.sketched_hessian` with this accuracy
        (seeded by ``seed``, ``oversample`` as there); else ``problem.hessian``.
      max_tries: halvings of gamma per step before LINESEARCH_FAILED.
    """
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    if int(max_tries) < 1:
        raise ValueError(f"max_tries must be >= 1, got {max_tries}")
    model = EXACT if eps is None else sketched(eps, seed, oversample)

    def init(problem, params) -> SolverState:
        state = start(problem, params, inner=None)
        return state._replace(inner=RegularizedNewtonInner(jnp.full_like(state.value, gamma), model.init(params)))

    def step(problem, state: SolverState) -> SolverState:
        x, unravel = ravel_pytree(state.params)
        g, _ = ravel_pytree(state.grad)
        H, model_state = model.matrix(problem, state.params, state.inner.model)
        g_norm = jnp.linalg.norm(g)
        noise = value_noise(state.value)

        def attempt(gamma):
            L, lam = levenberg_cholesky(H, g_norm / gamma)
            params = unravel(x - jax.scipy.linalg.cho_solve((L, True), g))
            value, grad = problem.loss(params), problem.grad(params)
            decrease = state.value - value + noise
            ok = jnp.isfinite(value) & (decrease >= tree_norm(grad) ** 2 / (8 * lam))
            return params, value, grad, ok

        def cond(carry):
            j, _, _, _, _, ok = carry
            return (~ok) & (j < max_tries)

        def body(carry):
            j, gamma, *_ = carry
            gamma = gamma / 2
            return (j + 1, gamma, *attempt(gamma))

        gamma0 = state.inner.gamma
        _, gamma, params, value, grad, ok = jax.lax.while_loop(
            cond, body, (jnp.ones((), jnp.int32), gamma0, *attempt(gamma0))
        )
        inner = RegularizedNewtonInner(jnp.where(ok, 2 * gamma, gamma), model_state)
        return advance(state, params, value, grad, inner, ok, jnp.all(jnp.isfinite(H)))

    return Solver("regularized_newton", init, step)
