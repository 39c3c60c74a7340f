"""Armijo backtracking line search on flattened parameters, inside jit, cheap under vmap."""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from attnopt.solvers.state import check_option, where_needed


class LineSearchResult(NamedTuple):
    """Step length t, the point x + t p, its loss, whether the Armijo test passed,
    whether the direction p was finite, and the gradient at x + t p (None unless
    :func:`armijo` was given ``grad``)."""

    t: jax.Array
    x: jax.Array
    value: jax.Array
    ok: jax.Array
    finite: jax.Array
    grad: jax.Array | None = None


def value_noise(value: jax.Array) -> jax.Array:
    """Rounding level of a loss value, ``16 eps (1 + |f|)``.

    Near the optimum the decrease of a Newton step (about ``g^T H^{-1} g``)
    falls below the rounding error of f; comparing f values without this
    allowance would reject good steps there.
    """
    return 16 * jnp.finfo(value.dtype).eps * (1 + jnp.abs(value))


def armijo(loss, x, value, slope, direction, *, c1=1e-4, shrink=0.5, max_steps=40, grad=None) -> LineSearchResult:
    """Largest ``t = shrink^j`` (j < max_steps) with ``f(x + t p) <= f(x) + c1 t <g, p>`` (+ rounding).

    Args:
      loss: scalar function of the flat parameters (N,).
      x: (N,) current point; value: f(x); slope: ``<g, p>`` (negative for a descent direction).
      direction: (N,) search direction p.
      grad: optional gradient function of the flat parameters, (N,) -> (N,); if
        given, the result carries the gradient at the returned point.

    A non-finite trial value fails the test, so the search backs off from
    points outside the problem's domain. ``ok`` is False if no tried t passes.

    Cost: the full step t = 1 is tried outside any loop, together with its
    gradient (``loss`` and ``grad`` at one point share their work under jit,
    e.g. the product ``A x``); the backtracking ``while_loop`` evaluates the
    loss only, and the gradient is recomputed only where t < 1 (see
    :func:`attnopt.solvers.state.where_needed`). Under ``vmap`` a step where
    every instance accepts t = 1 costs one loss and one gradient evaluation.
    """
    tol = value_noise(value)

    def trial(t):
        x_t = x + t * direction
        f_t = loss(x_t)
        return x_t, f_t, jnp.isfinite(f_t) & (f_t <= value + c1 * t * slope + tol)

    def cond(carry):
        j, _, _, _, ok = carry
        return (~ok) & (j < max_steps)

    def body(carry):
        j, t, _, _, _ = carry
        t = t * shrink
        return (j + 1, t, *trial(t))

    t0 = jnp.ones((), value.dtype)
    x1, f1, ok1 = trial(t0)
    _, t, x_t, f_t, ok = jax.lax.while_loop(cond, body, (jnp.ones((), jnp.int32), t0, x1, f1, ok1))
    g_t = None if grad is None else where_needed(t < 1, grad, (x_t,), grad(x1))
    return LineSearchResult(t, x_t, f_t, ok, jnp.all(jnp.isfinite(direction)), g_t)


def check_linesearch(c1, shrink) -> None:
    """Raise ValueError unless 0 < c1 < 1/2 and 0 < shrink < 1 (skipped for traced values)."""
    check_option("c1", c1, lambda x: (0 < x) & (x < 0.5), "in (0, 1/2)")
    check_option("shrink", shrink, lambda x: (0 < x) & (x < 1), "in (0, 1)")
