"""Alternating minimisation for attention regression: a Newton step on X, then the exact Y.

For ``L(X, Y)`` an exact quadratic in Y (docs/math.md, Attention regression L(X, Y)), the
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


from typing import Any

import jax.numpy as jnp

from attnopt.solvers.capabilities import HasHessian, HasVariableProjection
from attnopt.solvers.linesearch import armijo
from attnopt.solvers.newton import LineSearched, NewtonInner, damped_newton_direction, line_search_options
from attnopt.solvers.state import SolverState, advance, solver_class, start, static


def _reduced_hessian(problem, params):
    """The Schur complement ``H_XX - H_XY H_YY^+ H_YX`` of the full Hessian (ravel order X then Y)."""
    H = problem.hessian(params)
    nx = problem.split_params(params)[0].size
    Hxx, Hxy, Hyy = H[:nx, :nx], H[:nx, nx:], H[nx:, nx:]
    M = Hxx - Hxy @ jnp.linalg.pinv(Hyy, hermitian=True) @ Hxy.T
    return 0.5 * (M + M.T)


_CURVATURES = {"reduced": _reduced_hessian, "block": lambda problem, params: problem.hessian_x(params)}


@solver_class
class Alternating(LineSearched):
    """Newton on X with the exact Y (build with :func:`alternating`)."""

    c1: Any = 1e-4
    shrink: Any = 0.5
    max_backtracks: int = static(40)
    hessian: str = static("reduced")
    needs = (HasVariableProjection, HasHessian)

    @property
    def name(self) -> str:
        return "alternating" if self.hessian == "reduced" else f"alternating_{self.hessian}"

    @staticmethod
    def _with_best_y(problem, like, X):
        return like(X, problem.solve_y(X))

    def init(self, problem, params) -> SolverState:
        X, _, like = problem.split_params(params)
        state = start(problem, self._with_best_y(problem, like, X), inner=None)
        nan = jnp.full_like(state.value, jnp.nan)
        return state._replace(inner=NewtonInner(jnp.zeros_like(state.value), nan, None))

    def step(self, problem, state: SolverState) -> SolverState:
        X, _, like = problem.split_params(state.params)
        gX, _, _ = problem.split_params(state.grad, "grad")
        g = gX.reshape(-1)
        p, mu = damped_newton_direction(_CURVATURES[self.hessian](problem, state.params), g)
        ls = armijo(
            lambda x: problem.loss(self._with_best_y(problem, like, x.reshape(X.shape))),
            X.reshape(-1), state.value, g @ p, p, c1=self.c1, shrink=self.shrink, max_steps=self.max_backtracks,
        )
        params = self._with_best_y(problem, like, ls.x.reshape(X.shape))
        dtype = state.value.dtype
        inner = NewtonInner(mu.astype(dtype), ls.t.astype(dtype), None)
        return advance(state, params, ls.value, problem.grad(params), inner, ls.ok, ls.finite)


def alternating(
    *, hessian: str = "reduced", c1: float = 1e-4, shrink: float = 0.5, max_backtracks: int = 40
) -> Alternating:
    """Newton steps on X (damped, line-searched) alternating with the exact least-squares solve for Y.

    Args:
      hessian: "reduced" (Newton on ``φ(X) = min_Y L(X, Y)``, the Schur
        complement of the Hessian) or "block" (the X-block ``H_XX`` alone); static.
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
    return Alternating(c1, shrink, line_search_options(c1, shrink, max_backtracks), hessian)
