"""Gradient-regularised Newton with the adaptive acceptance rule (docs/math.md, Gradient-regularised Newton).

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

from attnopt.solvers.approx_newton import Sketched, check_sketch
from attnopt.solvers.capabilities import HasCurvature, HasHessian
from attnopt.solvers.linesearch import value_noise
from attnopt.solvers.newton import Newton, levenberg_cholesky
from attnopt.solvers.state import Solver, SolverState, advance, check_count, check_option, solver_class, start, static, tree_norm


class RegularizedNewtonInner(NamedTuple):
    """gamma: the adaptive regularisation parameter; model: the curvature model's state."""

    gamma: jax.Array
    model: Any


@solver_class
class RegularizedNewton(Solver):
    """Gradient-regularised Newton on the exact Hessian (build with :func:`regularized_newton`)."""

    gamma: Any = 1.0
    max_tries: int = static(50)
    name = "regularized_newton"
    needs = (HasHessian,)
    model_init = Newton.model_init
    matrix = Newton.matrix

    def init(self, problem, params) -> SolverState:
        state = start(problem, params, inner=None)
        gamma = jnp.full_like(state.value, self.gamma)
        return state._replace(inner=RegularizedNewtonInner(gamma, self.model_init(params)))

    def step(self, problem, state: SolverState) -> SolverState:
        x, unravel = ravel_pytree(state.params)
        g, _ = ravel_pytree(state.grad)
        H, model_state = self.matrix(problem, state.params, state.inner.model)
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
            return (~ok) & (j < self.max_tries)

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


@solver_class
class SketchedRegularizedNewton(Sketched, RegularizedNewton):
    """Gradient-regularised Newton on the leverage-sampled Hessian."""

    eps: float = static(0.5)
    oversample: float = static(4.0)
    seed: Any = 0
    needs = (HasCurvature,)


def regularized_newton(
    gamma: float = 1.0, *, eps: float | None = None, seed: int = 0, oversample: float = 4.0, max_tries: int = 50
) -> RegularizedNewton:
    """Gradient-regularised Newton.

    Args:
      gamma: initial gamma > 0 (lam = ||g|| / gamma; traced).
      eps: if given, use the leverage-sampled Hessian of
        :func:`attnopt.solvers.approx_newton.sketched_hessian` with this accuracy
        (seeded by ``seed``, ``oversample`` as there); else ``problem.hessian``.
      max_tries: halvings of gamma per step before LINESEARCH_FAILED (static).
    """
    check_option("gamma", gamma, lambda x: x > 0, "> 0")
    max_tries = check_count("max_tries", max_tries)
    if eps is None:
        return RegularizedNewton(gamma, max_tries)
    eps, oversample = check_sketch(eps, oversample)
    return SketchedRegularizedNewton(gamma, max_tries, eps, oversample, seed)
