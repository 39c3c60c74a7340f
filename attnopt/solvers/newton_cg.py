"""Matrix-free truncated Newton (Newton-CG) with the problem's Hessian-vector product.

Each step solves ``H p = -g`` approximately by conjugate gradients
(Nocedal & Wright, Algorithm 7.1; docs/math.md, Newton-CG), one Hessian-vector product per CG
iteration (``problem.hessian_operator(x)`` if the problem has it, which
prepares the curvature once per step, else ``problem.hvp``):

- stop when ``||r|| <= eta ||g||`` with ``eta = min(1/2, sqrt(||g||))`` (superlinear near the optimum);
- on negative or zero curvature ``d^T H d <= 0``, return the iterate so far,
  or ``-g`` (steepest descent) if that happens at the first CG iteration;

then an Armijo backtracking line search along p. Never forms the Hessian:
O(k N) memory and k HVPs per step.
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


def truncated_cg(hvp, g, max_iters: int):
    """Approximate ``-H^{-1} g`` by CG from 0, stopped on the forcing term or negative curvature.

    Args:
      hvp: v (N,) -> H v (N,).
      g: (N,) gradient; max_iters: CG iteration cap.
    Returns:
      (p, iterations); p is a descent direction (``<g, p> < 0`` for g != 0).
    """
    g_norm = jnp.linalg.norm(g)
    tol = jnp.minimum(0.5, jnp.sqrt(g_norm)) * g_norm

    def cond(carry):
        j, _, r, _, done = carry
        return (~done) & (j < max_iters) & (jnp.linalg.norm(r) > tol)

    def body(carry):
        j, z, r, d, _ = carry
        Hd = hvp(d)
        curvature = d @ Hd
        negative = curvature <= 0
        rr = r @ r
        alpha = rr / jnp.where(negative, 1, curvature)
        z_next, r_next = z + alpha * d, r + alpha * Hd
        d_next = -r_next + (r_next @ r_next) / rr * d
        # On negative curvature keep z (or fall back to -g at the first iteration) and stop.
        z_stop = jnp.where(j == 0, -g, z)
        return (
            j + 1,
            jnp.where(negative, z_stop, z_next),
            jnp.where(negative, r, r_next),
            jnp.where(negative, d, d_next),
            negative,
        )

    zero = jnp.zeros_like(g)
    j, p, _, _, _ = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), zero, g, -g, jnp.asarray(False)))
    return p, j


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
        hessian_at = (
            problem.hessian_operator(state.params)
            if hasattr(problem, "hessian_operator")
            else functools.partial(problem.hvp, state.params)
        )
        hvp = lambda v: ravel_pytree(hessian_at(unravel(v)))[0]
        p, cg_steps = truncated_cg(hvp, g, x.size if self.max_cg_steps is None else self.max_cg_steps)
        ls = self.search(problem, unravel, x, state.value, g, p)
        inner = NewtonCGInner(cg_steps, ls.t.astype(state.value.dtype))
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
