"""The regularization path ``p(R) = argmin_{||p|| <= R} L(p)`` of a problem with vector params.

For the max-margin losses L decreases towards infinity along the max-margin
direction, so the constraint is active and ``p(R)`` minimises L on the sphere
``||p|| = R``. Each radius is solved by Riemannian Newton on the sphere, warm
started from the previous radius (docs/math.md, Attention as a max-margin problem)::

    λ      = -<∇L(p), p> / R^2                          (the KKT multiplier of ||p||^2 <= R^2, halved)
    P      = I - p p^T / R^2                            (projector on the tangent space at p)
    g_R    = P ∇L(p)                                    (Riemannian gradient; 0 at a KKT point)
    H_R    = P (∇²L(p) + λ I) P                         (Riemannian Hessian on the tangent space)
    ξ      = -(H_R / s + p p^T / R^2 + μ I)^{-1} g_R / s   (s = max|H_R|; μ: Levenberg damping where not PD)
    p+     = R (p + t ξ) / ||p + t ξ||                  (retraction; t by Armijo backtracking on L)

A point is accepted when ``||g_R|| <= tol ||∇L||`` (the sine of the angle
between -∇L and p: scale free, since far out on the path ∇L is tiny) and ``λ >= 0`` (the
constraint pushes inward, so the point minimises L over the ball, not only on
the sphere); ``converged`` reports both.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from attnopt.solvers.linesearch import value_noise
from attnopt.solvers.newton import damped_newton_direction


class PathResult(NamedTuple):
    """The path at each radius (leading axis k = number of radii).

    radii (k,); params (k, d) = p(R); loss (k,); multiplier (k,) = λ;
    kkt_residual (k,) = ||g_R|| / ||∇L||; steps (k,) Newton steps; converged (k,) bool.
    """

    radii: jax.Array
    params: jax.Array
    loss: jax.Array
    multiplier: jax.Array
    kkt_residual: jax.Array
    steps: jax.Array
    converged: jax.Array


def _on_sphere(problem, p, R):
    """Loss, Euclidean gradient, multiplier λ, projector P and Riemannian gradient at p on the sphere of radius R."""
    value, g = problem.loss(p), problem.grad(p)
    lam = -(g @ p) / R**2
    P = jnp.eye(p.size, dtype=p.dtype) - jnp.outer(p, p) / R**2
    return value, g, lam, P, P @ g


def _solve_radius(problem, p, R, tol, max_steps: int, max_backtracks: int = 40):
    """Riemannian Newton on ``||p|| = R`` from p (rescaled onto the sphere)."""
    p = R * p / jnp.linalg.norm(p)

    def residual(p):
        _, g, _, _, rg = _on_sphere(problem, p, R)
        g_norm = jnp.linalg.norm(g)
        return jnp.linalg.norm(rg) / jnp.where(g_norm > 0, g_norm, 1)

    def cond(carry):
        k, p, res, ok = carry
        return ok & (k < max_steps) & (res > tol)

    def body(carry):
        k, p, _, _ = carry
        value, _, lam, P, rg = _on_sphere(problem, p, R)
        H = P @ (problem.hessian(p) + lam * jnp.eye(p.size, dtype=p.dtype)) @ P
        # Far out on the path L, ∇L and ∇²L are all tiny: scale the system to O(1) before damping.
        scale = jnp.max(jnp.abs(H))
        scale = jnp.where(scale > 0, scale, 1)
        xi, _ = damped_newton_direction(0.5 * (H + H.T) / scale + jnp.outer(p, p) / R**2, rg / scale)
        slope, noise = rg @ xi, value_noise(value)
        retract = lambda t: R * (p + t * xi) / jnp.linalg.norm(p + t * xi)

        def search(carry):
            j, t, _ = carry
            return j + 1, t / 2, problem.loss(retract(t / 2)) <= value + 1e-4 * (t / 2) * slope + noise

        _, t, accepted = jax.lax.while_loop(
            lambda c: ~c[2] & (c[0] < max_backtracks), search,
            (jnp.zeros((), jnp.int32), jnp.ones_like(value), problem.loss(retract(1.0)) <= value + 1e-4 * slope + noise),
        )
        p_new = jnp.where(accepted, retract(t), p)
        return k + 1, p_new, residual(p_new), accepted & jnp.all(jnp.isfinite(p_new))

    k, p, res, _ = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), p, residual(p), jnp.asarray(True)))
    value, _, lam, _, _ = _on_sphere(problem, p, R)
    return p, value, lam, res, k


def regularization_path(problem, radii, *, start=None, tol: float = 1e-10, max_steps: int = 50) -> PathResult:
    """Solve ``min L(p) s.t. ||p|| <= R`` for each radius in increasing ``radii``, warm started along the path.

    Args:
      problem: a problem with vector params p (d,) and ``loss``, ``grad``, ``hessian`` (e.g. a
        ``PromptAttention`` with ``trainable="p"``).
      radii: (k,) increasing positive radii.
      start: (d,) direction of the first solve (default: ``-grad L(0)``, the steepest descent direction).
      tol: KKT tolerance on ``||g_R|| / ||∇L||``.
      max_steps: Newton steps per radius (static).
    """
    radii = jnp.asarray(radii)
    if radii.ndim != 1 or radii.size == 0:
        raise ValueError(f"radii must be a non-empty 1-d array, got shape {radii.shape}")
    r = np.asarray(radii)
    if not (np.all(np.isfinite(r)) and np.all(r > 0) and np.all(np.diff(r) > 0)):
        raise ValueError("radii must be finite, positive and increasing")
    shape = tuple(getattr(problem, "params_shape", ()))
    if len(shape) != 1:
        raise ValueError(f"regularization_path needs vector params, got params of shape {shape}")
    dtype = problem.dtype
    radii = radii.astype(dtype)
    p0 = -problem.grad(jnp.zeros(shape, dtype)) if start is None else jnp.asarray(start, dtype)
    return _path(problem, radii, p0, jnp.asarray(tol, dtype), max_steps=int(max_steps))


@functools.partial(jax.jit, static_argnames=("max_steps",))
def _path(problem, radii, p0, tol, max_steps):
    def one(p, R):
        p, value, lam, res, k = _solve_radius(problem, p, R, tol, max_steps)
        return p, (p, value, lam, res, k, (res <= tol) & (lam >= 0))

    _, out = jax.lax.scan(one, p0, radii)
    return PathResult(radii, *out)
