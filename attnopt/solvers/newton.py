"""Dense Newton-type solvers: a curvature matrix, Levenberg damping, Armijo line search.

One step, for a curvature model M(x) (the Hessian, the Gauss-Newton matrix,
or a sketched Hessian)::

    mu  = smallest of 0, mu0, 10 mu0, ... with M + mu I positive definite (Cholesky succeeds)
    p   = -(M + mu I)^{-1} g                       O(N^3) for N parameters
    t   = Armijo backtracking along p, x+ = x + t p

Params may be any pytree; the matrix is in ``jax.flatten_util.ravel_pytree`` order.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from attnopt.solvers.linesearch import armijo, check_linesearch
from attnopt.solvers.state import Solver, SolverState, advance, cached_solver, require, start


class CurvatureModel(NamedTuple):
    """How a solver gets its (N, N) curvature matrix.

    ``init(params) -> model_state``; ``matrix(problem, params, model_state) -> (M, model_state)``.
    The model state is None for deterministic models and a PRNG key for sketched ones.
    """

    name: str
    init: Callable[[Any], Any]
    matrix: Callable[[Any, Any, Any], tuple[jax.Array, Any]]


def _no_state(params):
    del params


def _hessian(problem, params, model_state):
    return problem.hessian(params), model_state


def _gauss_newton_matrix(problem, params, model_state):
    require(problem, "gauss_newton_matrix", "gauss_newton")
    return problem.gauss_newton_matrix(params), model_state


EXACT = CurvatureModel("hessian", _no_state, _hessian)
GAUSS_NEWTON = CurvatureModel("gauss_newton_matrix", _no_state, _gauss_newton_matrix)


class NewtonInner(NamedTuple):
    """Inner state of the dense Newton solvers.

    damping: the Levenberg mu added in the last step (0 when M was positive definite).
    model: the curvature model's state (None, or a PRNG key).
    """

    damping: jax.Array
    model: Any


def levenberg_cholesky(M: jax.Array, shift, *, growth: float = 10.0, max_tries: int = 40):
    """Lower Cholesky factor of ``M + mu I`` and mu, for the first PD mu in
    ``shift, shift + mu0, shift + growth mu0, ...`` with ``mu0 = sqrt(eps) (1 + max|M_ii|)``.

    Args:
      M: (N, N) symmetric matrix; shift: scalar >= 0, the first mu tried.
    Returns:
      (L, mu); L is NaN if M is not finite or no mu within ``max_tries`` works.

    The first factorisation is outside the loop, so a positive definite M
    costs one Cholesky; under ``vmap`` the loop runs while any instance's
    factor has failed (each trip a batched Cholesky of small matrices).
    """
    eye = jnp.eye(M.shape[-1], dtype=M.dtype)
    mu0 = jnp.sqrt(jnp.finfo(M.dtype).eps) * (1 + jnp.max(jnp.abs(jnp.diag(M))))
    finite = jnp.all(jnp.isfinite(M))

    def factor(mu):
        return jnp.linalg.cholesky(M + mu * eye)

    def cond(carry):
        j, _, L = carry
        return finite & (j < max_tries) & ~jnp.all(jnp.isfinite(L))

    def body(carry):
        j, _, _ = carry
        mu = (shift + mu0 * growth**j).astype(M.dtype)
        return j + 1, mu, factor(mu)

    shift = jnp.asarray(shift, M.dtype)
    _, mu, L = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), shift, factor(shift)))
    return L, mu


def damped_newton_direction(M, g, shift=0.0):
    """``p = -(M + mu I)^{-1} g`` with mu from :func:`levenberg_cholesky`; returns (p, mu)."""
    L, mu = levenberg_cholesky(M, shift)
    return -jax.scipy.linalg.cho_solve((L, True), g), mu


def flat_grad(problem, unravel):
    """``problem.grad`` as a function of the flat parameters (N,) -> (N,)."""
    return lambda y: ravel_pytree(problem.grad(unravel(y)))[0]


def dense_newton(name: str, model: CurvatureModel, *, c1: float, shrink: float, max_backtracks: int) -> Solver:
    """A line-searched, Levenberg-damped Newton solver over the curvature ``model``."""

    def init(problem, params) -> SolverState:
        state = start(problem, params, inner=None)
        return state._replace(inner=NewtonInner(jnp.zeros_like(state.value), model.init(params)))

    def step(problem, state: SolverState) -> SolverState:
        x, unravel = ravel_pytree(state.params)
        g, _ = ravel_pytree(state.grad)
        M, model_state = model.matrix(problem, state.params, state.inner.model)
        p, mu = damped_newton_direction(M, g)
        ls = armijo(
            lambda y: problem.loss(unravel(y)), x, state.value, g @ p, p,
            c1=c1, shrink=shrink, max_steps=max_backtracks, grad=flat_grad(problem, unravel),
        )
        inner = NewtonInner(mu.astype(state.inner.damping.dtype), model_state)
        return advance(state, unravel(ls.x), ls.value, unravel(ls.grad), inner, ls.ok, ls.finite)

    return Solver(name, init, step)


@cached_solver
def newton(*, c1: float = 1e-4, shrink: float = 0.5, max_backtracks: int = 40) -> Solver:
    """Exact Newton: ``problem.hessian`` (Levenberg-damped where not PD) with Armijo backtracking.

    Args:
      c1: Armijo sufficient-decrease constant, in (0, 1/2).
      shrink: backtracking factor, in (0, 1).
      max_backtracks: trial step lengths per step; if none passes, the status is LINESEARCH_FAILED.

    Converges quadratically near a minimiser with a positive definite Hessian.
    """
    check_linesearch(c1, shrink, max_backtracks)
    return dense_newton("newton", EXACT, c1=c1, shrink=shrink, max_backtracks=max_backtracks)


@cached_solver
def gauss_newton(*, c1: float = 1e-4, shrink: float = 0.5, max_backtracks: int = 40) -> Solver:
    """Gauss-Newton: the PSD ``problem.gauss_newton_matrix`` (MATH.md section 1) with Armijo backtracking.

    Args as in :func:`newton`. Quadratic on zero-residual problems, linear otherwise.
    """
    check_linesearch(c1, shrink, max_backtracks)
    return dense_newton("gauss_newton", GAUSS_NEWTON, c1=c1, shrink=shrink, max_backtracks=max_backtracks)
