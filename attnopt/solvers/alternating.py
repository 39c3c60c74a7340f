"""Alternating minimisation for attention regression: a Newton step on X, then the exact Y.

For ``L(X, Y)`` an exact quadratic in Y (../shared/MATH.md section 5), the
solver keeps Y at ``Y*(X) = argmin_Y L(X, Y)`` and takes Newton steps on the
reduced loss ``φ(X) = L(X, Y*(X))``, whose gradient is ``grad_X L(X, Y*(X))``.
One step from (X, Y*(X))::

    M   = H_XX - H_XY H_YY^+ H_YX      ("reduced", the Hessian of φ; default)
       or H_XX                          ("block", the papers' greedy scheme)
    mu  = smallest Levenberg damping with M + mu I positive definite
    p   = -(M + mu I)^{-1} grad_X                           O(|X|^3 + |Y|^3)
    t   = Armijo backtracking on t -> φ(X + t p)            each trial solves for Y
    X+  = X + t p,   Y+ = Y*(X+)                            a least-squares solve

With the reduced curvature this is Newton's method on φ (variable projection)
and converges quadratically near a nondegenerate minimiser. The block
curvature ignores the coupling of X and Y through Y*(X); it converges only
linearly, often slowly, and is there to reproduce the papers' scheme.

Params are a pair (X, Y) (a tuple or a NamedTuple such as
:class:`attnopt.problems.attention.AttentionParams`). The problem must provide
``solve_y(X)`` (the exact minimiser over Y) and ``hessian(params)`` (reduced)
or ``hessian_x(params)`` (block), as
:class:`attnopt.problems.attention.AttentionRegression` does.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp

from attnopt.solvers.linesearch import armijo, check_linesearch
from attnopt.solvers.newton import NewtonInner, damped_newton_direction
from attnopt.solvers.state import Solver, SolverState, advance, cached_solver, require, start

_NAME = "alternating"


def _reduced_hessian(problem, params):
    """The Schur complement ``H_XX - H_XY H_YY^+ H_YX`` of the full Hessian (ravel order X then Y)."""
    H = problem.hessian(params)
    nx = problem.split_params(params)[0].size
    Hxx, Hxy, Hyy = H[:nx, :nx], H[:nx, nx:], H[nx:, nx:]
    M = Hxx - Hxy @ jnp.linalg.pinv(Hyy, hermitian=True) @ Hxy.T
    return 0.5 * (M + M.T)


def _block_hessian(problem, params):
    return problem.hessian_x(params)


_CURVATURES = {"reduced": ("hessian", _reduced_hessian), "block": ("hessian_x", _block_hessian)}


@cached_solver
def alternating(
    *, hessian: str = "reduced", c1: float = 1e-4, shrink: float = 0.5, max_backtracks: int = 40
) -> Solver:
    """Newton steps on X (damped, line-searched) alternating with the exact least-squares solve for Y.

    Args:
      hessian: "reduced" (Newton on ``φ(X) = min_Y L(X, Y)``, the Schur
        complement of the Hessian) or "block" (the X-block ``H_XX`` alone).
      c1: Armijo sufficient-decrease constant, in (0, 1/2).
      shrink: backtracking factor, in (0, 1).
      max_backtracks: trial step lengths per step; if none passes, the status is LINESEARCH_FAILED.

    ``init`` replaces the given Y by ``problem.solve_y(X0)`` (only X0 matters),
    so the trace starts at φ(X0). The inner state is a
    :class:`~attnopt.solvers.newton.NewtonInner` whose ``damping`` is the
    Levenberg mu of the last step.
    """
    if hessian not in _CURVATURES:
        raise ValueError(f"hessian must be one of {sorted(_CURVATURES)}, got {hessian!r}")
    check_linesearch(c1, shrink, max_backtracks)
    method, curvature = _CURVATURES[hessian]

    def check(problem):
        for name in ("solve_y", "split_params", method):
            require(problem, name, _NAME)

    def with_best_y(problem, like, X):
        return like(X, problem.solve_y(X))

    def init(problem, params) -> SolverState:
        check(problem)
        X, _, like = problem.split_params(params)
        state = start(problem, with_best_y(problem, like, X), inner=None)
        return state._replace(inner=NewtonInner(jnp.zeros_like(state.value), None))

    def step(problem, state: SolverState) -> SolverState:
        check(problem)
        X, _, like = problem.split_params(state.params)
        gX, _, _ = problem.split_params(state.grad, "grad")
        g = gX.reshape(-1)
        p, mu = damped_newton_direction(curvature(problem, state.params), g)
        ls = armijo(
            lambda x: problem.loss(with_best_y(problem, like, x.reshape(X.shape))),
            X.reshape(-1), state.value, g @ p, p, c1=c1, shrink=shrink, max_steps=max_backtracks,
        )
        params = with_best_y(problem, like, ls.x.reshape(X.shape))
        inner = NewtonInner(mu.astype(state.inner.damping.dtype), None)
        return advance(state, params, ls.value, problem.grad(params), inner, ls.ok, ls.finite)

    return Solver(_NAME if hessian == "reduced" else f"{_NAME}_{hessian}", init, step)
