"""l_p mirror descent (docs/math.md, Mirror descent), as a solver and as an optax transformation.

Potential ``psi(w) = ||w||_p^p / p`` entrywise (p > 1), dual exponent q = p / (p - 1)::

    grad psi(w)        = sign(w) |w|^{p-1}
    (grad psi)^{-1}(u) = sign(u) |u|^{1/(p-1)}
    w+ = (grad psi)^{-1}( grad psi(w) - eta g / (||g||_q + eps) )      (normalized; plain: eta g)

applied to each leaf of the params separately (as normalized GD normalises each leaf).
p = 2 is (normalized) gradient descent. For attention, normalized l_p mirror descent on
W (or p) converges in direction to the l_p-norm SVM.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from attnopt.solvers.state import Solver, SolverState, advance, check_option, solver_class, start, static


def mirror_map(w, p):
    """``grad psi(w) = sign(w) |w|^{p-1}``."""
    return jnp.sign(w) * jnp.abs(w) ** (p - 1)


def inverse_mirror_map(u, p):
    """``(grad psi)^{-1}(u) = sign(u) |u|^{1/(p-1)}``."""
    return jnp.sign(u) * jnp.abs(u) ** (1 / (p - 1))


def dual_norm(g, p):
    """``||g||_q`` with q = p / (p - 1), scaled by max|g| so that large q neither overflows nor underflows."""
    q = p / (p - 1)
    scale = jnp.max(jnp.abs(g))
    safe = jnp.where(scale > 0, scale, 1)
    return scale * jnp.sum((jnp.abs(g) / safe) ** q) ** (1 / q)


def mirror_step(w, g, learning_rate, p, eps, normalized: bool):
    """One mirror-descent step of a leaf w along its gradient g (a zero gradient gives a zero step)."""
    if normalized:
        norm = dual_norm(g, p) + eps
        g = g / jnp.where(norm > 0, norm, 1)
    return inverse_mirror_map(mirror_map(w, p) - learning_rate * g, p).astype(w.dtype)


@solver_class
class MirrorDescent(Solver):
    """l_p mirror descent (build with :func:`mirror_descent`)."""

    learning_rate: Any = 0.1
    p: Any = 2.0
    eps: Any = 0.0
    normalized: bool = static(True)
    name = "mirror_descent"

    def init(self, problem, params) -> SolverState:
        return start(problem, params, None)

    def step(self, problem, state: SolverState) -> SolverState:
        step = lambda w, g: mirror_step(w, g, self.learning_rate, self.p, self.eps, self.normalized)
        params = jax.tree.map(step, state.params, state.grad)
        return advance(state, params, problem.loss(params), problem.grad(params), None)


def _check(learning_rate, p, eps):
    if not callable(learning_rate):
        check_option("learning_rate", learning_rate, lambda x: x > 0, "> 0")
    check_option("p", p, lambda x: x > 1, "> 1")
    check_option("eps", eps, lambda x: x >= 0, ">= 0")


def mirror_descent(learning_rate: float = 0.1, p: float = 2.0, *, normalized: bool = True, eps: float = 0.0) -> MirrorDescent:
    """l_p mirror descent on any pytree of params, each leaf with its own (dual-norm) normalisation.

    Args:
      learning_rate: eta > 0 (traced).
      p: the potential's exponent, > 1 (traced: a sweep over p is one compiled program).
      normalized: divide each leaf's gradient by its dual norm ``||g||_q + eps`` (static).
      eps: added to the dual norm (>= 0).
    """
    _check(learning_rate, p, eps)
    if not isinstance(normalized, bool):
        raise ValueError(f"normalized must be a bool, got {normalized!r}")
    return MirrorDescent(learning_rate, p, eps, normalized)


class MirrorDescentState(NamedTuple):
    count: jax.Array


def mirror_descent_transform(
    learning_rate: float | Callable = 0.1, p: float = 2.0, *, normalized: bool = True, eps: float = 0.0
) -> optax.GradientTransformation:
    """The same step as an optax transformation (updates ``w+ - w``; needs ``params``), so that it
    chains with other transformations and takes an optax schedule ``count -> eta`` as learning_rate."""
    _check(learning_rate, p, eps)

    def init(params):
        del params
        return MirrorDescentState(jnp.zeros((), jnp.int32))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("mirror_descent_transform needs params")
        eta = learning_rate(state.count) if callable(learning_rate) else learning_rate
        step = lambda w, g: mirror_step(w, g, eta, p, eps, normalized) - w
        return jax.tree.map(step, params, updates), MirrorDescentState(state.count + 1)

    return optax.GradientTransformation(init, update)
