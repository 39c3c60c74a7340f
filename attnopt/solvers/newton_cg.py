"""Matrix-free truncated Newton (Newton-CG) with the problem's Hessian-vector product.

Each step solves ``H p = -g`` approximately by conjugate gradients
(Nocedal & Wright, Algorithm 7.1; docs/math.md, Newton-CG), one Hessian-vector product per CG
iteration (``problem.hessian_operator(x)`` if the problem has it, which
prepares the curvature once per step, else ``problem.hvp``):

- stop when ``||r|| <= eta ||g||`` with ``eta = min(1/2, sqrt(||g||))`` (superlinear near the optimum);
- on negative or zero curvature ``d^T H d <= 0`` along the CG direction d, take CG's step
  along d with the curvature's magnitude, ``p + (r^T r / |d^T H d|) d`` (``p + d`` if it is 0),
  and stop: d is a descent direction on which the quadratic model has no minimiser, and
  this length follows the problem's scale (a bare ``-g``, or p without the step along d, can
  be orders of magnitude too short where the curvature is small, and the search only shortens);

then an Armijo backtracking line search along p. Never forms the Hessian:
O(k N) memory and k HVPs per step. :func:`truncated_cg` with a radius is
Steihaug's CG, the subproblem solver of ``trust_region(subproblem="cg")``.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from attnopt.solvers.capabilities import HasHVP
from attnopt.solvers.newton import LineSearched, line_search_options
from attnopt.solvers.state import SolverState, advance, check_count, solver_class, start, static


class NewtonCGInner(NamedTuple):
    """cg_steps: CG iterations (HVPs) of the last step; t: the step length its line search accepted."""

    cg_steps: jax.Array
    t: jax.Array


class CGResult(NamedTuple):
    """Outcome of :func:`truncated_cg`.

    p: (N,) the step; residual: (N,) ``H p + g``; iterations: CG iterations (HVPs), int32;
    boundary: whether p stopped on the trust-region boundary ``||p|| = radius`` (False without a radius).
    """

    p: jax.Array
    residual: jax.Array
    iterations: jax.Array
    boundary: jax.Array


def _to_boundary(z, d, radius):
    """``tau >= 0`` with ``||z + tau d|| = radius`` (for ``||z|| <= radius``)."""
    dd, zd, zz = d @ d, z @ d, z @ z
    disc = jnp.sqrt(jnp.maximum(zd * zd + dd * (radius * radius - zz), 0))
    return (disc - zd) / jnp.where(dd > 0, dd, 1)


def truncated_cg(hvp, g, max_iters: int, radius=None) -> CGResult:
    """Approximate ``-H^{-1} g`` by CG from p = 0 (Nocedal & Wright Alg. 7.1; with ``radius``, Steihaug's Alg. 7.2).

    Iterates ``alpha = r^T r / d^T H d``, ``p += alpha d``, ``r += alpha H d`` (r = H p + g),
    ``d = -r + (r_new^T r_new / r^T r) d``, and stops

    - when ``||r|| <= min(1/2, sqrt(||g||)) ||g||`` (forcing term) or after ``max_iters`` iterations;
    - on curvature ``d^T H d <= 0``: without a radius, at ``p + (r^T r / |d^T H d|) d`` (``p + d`` if
      it is 0; at the first iteration ``-g ||g||^2 / |g^T H g|``), a descent direction since
      ``<g, d> = -r^T r``; with a radius, at ``p + tau d`` on the boundary ``||p + tau d|| = radius``;
    - with a radius, when ``p + alpha d`` would leave the ball: at ``p + tau d`` on the boundary.

    Args:
      hvp: v (N,) -> H v (N,).
      g: (N,) gradient; max_iters: CG iteration cap; radius: trust-region radius (scalar) or None.
    Returns:
      a :class:`CGResult`; p is a descent direction (``<g, p> < 0`` for g != 0).
    """
    g_norm = jnp.linalg.norm(g)
    tol = jnp.minimum(0.5, jnp.sqrt(g_norm)) * g_norm

    def cond(carry):
        j, _, r, _, done, _ = carry
        return (~done) & (j < max_iters) & (jnp.linalg.norm(r) > tol)

    def body(carry):
        j, z, r, d, _, _ = carry
        Hd = hvp(d)
        curvature = d @ Hd
        negative = curvature <= 0
        rr = r @ r
        alpha = rr / jnp.where(negative, 1, curvature)
        z_next, r_next = z + alpha * d, r + alpha * Hd
        if radius is None:
            crossed = jnp.zeros_like(negative)
            tau = rr / jnp.where(curvature < 0, -curvature, rr)  # CG's step with |d^T H d| (1 if it is 0)
        else:
            crossed = ~negative & (jnp.linalg.norm(z_next) >= radius)
            tau = _to_boundary(z, d, radius)
        stop = negative | crossed
        d_next = -r_next + (r_next @ r_next) / rr * d
        pick = lambda a, b: jnp.where(stop, a, b)
        boundary = stop if radius is not None else crossed
        return j + 1, pick(z + tau * d, z_next), pick(r + tau * Hd, r_next), pick(d, d_next), stop, boundary

    false = jnp.asarray(False)
    j, p, r, _, _, boundary = jax.lax.while_loop(
        cond, body, (jnp.zeros((), jnp.int32), jnp.zeros_like(g), g, -g, false, false)
    )
    return CGResult(p, r, j, boundary)


def flat_hessian_operator(problem, params, unravel):
    """v (N,) -> H v (N,) at params: ``problem.hessian_operator(params)`` (its curvature prepared once)
    if the problem has it, else ``problem.hvp``; v and H v flat in ``ravel_pytree`` order."""
    hessian_at = (
        problem.hessian_operator(params)
        if hasattr(problem, "hessian_operator")
        else functools.partial(problem.hvp, params)
    )
    return lambda v: ravel_pytree(hessian_at(unravel(v)))[0]


@solver_class
class NewtonCG(LineSearched):
    """Truncated Newton with CG on the HVP (build with :func:`newton_cg`)."""

    c1: Any = 1e-4
    shrink: Any = 0.5
    max_backtracks: int = static(40)
    max_cg_steps: int | None = static(None)
    name = "newton_cg"
    needs = (HasHVP,)

    def init(self, problem, params) -> SolverState:
        state = start(problem, params, None)
        return state._replace(inner=NewtonCGInner(jnp.zeros((), jnp.int32), jnp.full_like(state.value, jnp.nan)))

    def step(self, problem, state: SolverState) -> SolverState:
        x, unravel = ravel_pytree(state.params)
        g, _ = ravel_pytree(state.grad)
        hvp = flat_hessian_operator(problem, state.params, unravel)
        cg = truncated_cg(hvp, g, x.size if self.max_cg_steps is None else self.max_cg_steps)
        ls = self.search(problem, unravel, x, state.value, g, cg.p)
        inner = NewtonCGInner(cg.iterations, ls.t.astype(state.value.dtype))
        return advance(state, unravel(ls.x), ls.value, unravel(ls.grad), inner, ls.ok, ls.finite)


def newton_cg(
    *, max_cg_steps: int | None = None, c1: float = 1e-4, shrink: float = 0.5, max_backtracks: int = 40
) -> NewtonCG:
    """Truncated Newton with CG on ``problem.hvp`` and Armijo backtracking; for large N.

    Args:
      max_cg_steps: CG iterations per step (static; default: the number of parameters N).
      c1, shrink, max_backtracks: the line search, as in :func:`attnopt.solvers.newton`.
    """
    max_backtracks = line_search_options(c1, shrink, max_backtracks)
    if max_cg_steps is not None:
        max_cg_steps = check_count("max_cg_steps", max_cg_steps)
    return NewtonCG(c1, shrink, max_backtracks, max_cg_steps)
