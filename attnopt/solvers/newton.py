"""Dense Newton-type solvers: a curvature matrix, Levenberg damping, Armijo line search.

One step, for a curvature model M(x) (the Hessian, the Gauss-Newton matrix,
or a sketched Hessian; docs/math.md, Newton with Levenberg damping and Armijo backtracking)::

    mu  = smallest of 0, mu0, 10 mu0, ... with M + mu I positive definite (Cholesky succeeds)
    p   = -(M + mu I)^{-1} g                       O(N^3) for N parameters
    t   = Armijo backtracking along p, x+ = x + t p

Params may be any pytree; the matrix is in ``jax.flatten_util.ravel_pytree`` order.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from attnopt.solvers.capabilities import HasGaussNewton, HasHessian
from attnopt.solvers.linesearch import armijo, check_linesearch
from attnopt.solvers.state import Solver, SolverState, advance, check_count, solver_class, start, static


class NewtonInner(NamedTuple):
    """Inner state of the dense Newton solvers.

    damping: the Levenberg mu added in the last step (0 when M was positive definite).
    t: the step length the last line search accepted (NaN before the first step).
    model: the curvature model's state (None, or a PRNG key).
    """

    damping: jax.Array
    t: jax.Array
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


class LineSearched(Solver):
    """Shared part of the solvers with an Armijo line search: options c1, shrink (traced) and
    max_backtracks (static), and an inner state with the accepted step length ``t``."""

    def line_search_step(self, state: SolverState) -> jax.Array:
        return state.inner.t

    def search(self, problem, unravel, x, value, g, p):
        """Armijo backtracking from flat x along flat p (see :func:`attnopt.solvers.linesearch.armijo`)."""
        return armijo(
            lambda y: problem.loss(unravel(y)), x, value, g @ p, p,
            c1=self.c1, shrink=self.shrink, max_steps=self.max_backtracks, grad=flat_grad(problem, unravel),
        )


@solver_class
class Newton(LineSearched):
    """Exact Newton (build with :func:`newton`); subclasses change the curvature model."""

    c1: Any = 1e-4
    shrink: Any = 0.5
    max_backtracks: int = static(40)
    name = "newton"
    needs = (HasHessian,)

    def model_init(self, params):
        """The curvature model's state (None; a PRNG key for sampled models)."""
        del params

    def matrix(self, problem, params, model_state):
        """``(M, model_state)``: the (N, N) curvature matrix at params."""
        return problem.hessian(params), model_state

    def init(self, problem, params) -> SolverState:
        state = start(problem, params, inner=None)
        nan = jnp.full_like(state.value, jnp.nan)
        return state._replace(inner=NewtonInner(jnp.zeros_like(state.value), nan, self.model_init(params)))

    def refine(self, problem, params, unravel, g, M, p, model_state):
        """``(direction, model_state)``: the direction the line search starts from, given
        ``p = -(M + mu I)^{-1} g`` (here p itself)."""
        del problem, params, unravel, g, M
        return p, model_state

    def check_model(self, M, p, curvature, model_state):
        """The model state for the next step, given the exact ``curvature = <p, H p>`` along p
        (called by :class:`CurvatureScaled`; here unchanged)."""
        del M, p, curvature
        return model_state

    def step(self, problem, state: SolverState) -> SolverState:
        x, unravel = ravel_pytree(state.params)
        g, _ = ravel_pytree(state.grad)
        M, model_state = self.matrix(problem, state.params, state.inner.model)
        p, mu = damped_newton_direction(M, g)
        p, model_state = self.refine(problem, state.params, unravel, g, M, p, model_state)
        ls = self.search(problem, unravel, x, state.value, g, p)
        dtype = state.value.dtype
        inner = NewtonInner(mu.astype(dtype), ls.t.astype(dtype), model_state)
        return advance(state, unravel(ls.x), ls.value, unravel(ls.grad), inner, ls.ok, ls.finite)


class CurvatureScaled:
    """Mixin for Newton-type solvers whose curvature model M is not the Hessian H (Gauss-Newton, sketches).

    The direction ``p = -(M + mu I)^{-1} g`` is rescaled, before the line search,
    to the minimiser of the exact quadratic model along it (one HVP)::

        t* = -<g, p> / <p, H p>   if <p, H p> > 0,   else t* = 1;       search from x along t* p

    Where M misjudges H's scale along p (a large-residual Gauss-Newton model can
    be many times smaller than H), the plain step p overshoots and halving
    backtracking alternates around the minimiser without converging once the
    loss decrease reaches rounding level; t* p is the model's own step length.
    """

    def refine(self, problem, params, unravel, g, M, p, model_state):
        curvature = p @ ravel_pytree(problem.hvp(params, unravel(p)))[0]
        positive = curvature > 0
        t = jnp.where(positive, -(g @ p) / jnp.where(positive, curvature, 1), 1)
        return t * p, self.check_model(M, p, curvature, model_state)


@solver_class
class GaussNewton(CurvatureScaled, Newton):
    """Newton on the PSD Gauss-Newton model (build with :func:`gauss_newton`), steps scaled by the exact curvature."""

    name = "gauss_newton"
    needs = (HasGaussNewton,)

    def matrix(self, problem, params, model_state):
        return problem.gauss_newton_matrix(params), model_state


def line_search_options(c1, shrink, max_backtracks) -> int:
    """Check the line-search options; returns max_backtracks as an int."""
    check_linesearch(c1, shrink)
    return check_count("max_backtracks", max_backtracks)


def newton(*, c1: float = 1e-4, shrink: float = 0.5, max_backtracks: int = 40) -> Newton:
    """Exact Newton: ``problem.hessian`` (Levenberg-damped where not PD) with Armijo backtracking.

    Args:
      c1: Armijo sufficient-decrease constant, in (0, 1/2).
      shrink: backtracking factor, in (0, 1).
      max_backtracks: trial step lengths per step (static); if none passes, the status is LINESEARCH_FAILED.

    Converges quadratically near a minimiser with a positive definite Hessian.
    """
    return Newton(c1, shrink, line_search_options(c1, shrink, max_backtracks))


def gauss_newton(*, c1: float = 1e-4, shrink: float = 0.5, max_backtracks: int = 40) -> GaussNewton:
    """Gauss-Newton: the PSD ``problem.gauss_newton_matrix``, the step scaled by the exact curvature along it
    (:class:`CurvatureScaled`, one HVP), then Armijo backtracking (docs/math.md, Gauss-Newton).

    Args as in :func:`newton`. Quadratic on zero-residual problems, linear otherwise (at a rate set
    by how well the Gauss-Newton matrix matches the Hessian).
    """
    return GaussNewton(c1, shrink, line_search_options(c1, shrink, max_backtracks))
