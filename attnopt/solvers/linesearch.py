"""Armijo backtracking line search on flattened parameters, inside jit."""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class LineSearchResult(NamedTuple):
    """Step length t, the point x + t p and its loss, and whether the Armijo test passed."""

    t: jax.Array
    x: jax.Array
    value: jax.Array
    ok: jax.Array


def value_noise(value: jax.Array) -> jax.Array:
    """Rounding level of a loss value, ``16 eps (1 + |f|)``.

    Near the optimum the decrease of a Newton step (about ``g^T H^{-1} g``)
    falls below the rounding error of f; comparing f values without this
    allowance would reject good steps there.
    """
    return 16 * jnp.finfo(value.dtype).eps * (1 + jnp.abs(value))


def armijo(loss, x, value, slope, direction, *, c1=1e-4, shrink=0.5, max_steps=40) -> LineSearchResult:
    """Largest ``t = shrink^j`` (j < max_steps) with ``f(x + t p) <= f(x) + c1 t <g, p>`` (+ rounding).

    Args:
      loss: scalar function of the flat parameters (N,).
      x: (N,) current point; value: f(x); slope: ``<g, p>`` (negative for a descent direction).
      direction: (N,) search direction p.

    A non-finite trial value fails the test, so the search backs off from
    points outside the problem's domain. ``ok`` is False if no tried t passes.
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
    _, t, x_t, f_t, ok = jax.lax.while_loop(cond, body, (jnp.ones((), jnp.int32), t0, *trial(t0)))
    return LineSearchResult(t, x_t, f_t, ok)
