"""Derivatives of a solve with respect to the problem's data, by the implicit function theorem.

At a stationary point ``x*(θ)`` of ``L(x, θ)`` (θ the problem's array fields),
``∇_x L(x*, θ) = 0`` defines x* as a function of θ, and

    dx*/dθ = -H^{-1} ∂_θ ∇_x L(x*, θ),        H = ∇²_x L(x*, θ)
    dL(x*(θ), θ)/dθ = ∂_θ L(x*, θ)             (envelope theorem: ∇_x L = 0)

so the vector-Jacobian product for cotangents (x̄, v̄) of (x*, L(x*)) is one
linear solve ``H w = x̄`` with the problem's Hessian and one reverse pass
through ``problem.grad`` and ``problem.loss`` in θ::

    θ̄ = -∂_θ <∇_x L(x*, θ), w> + v̄ ∂_θ L(x*, θ)

It holds only at a stationary point with a nonsingular Hessian: where the
solve did not converge (any status but CONVERGED) or H is singular, θ̄ is NaN,
never a plausible number. The start x0, the solver's options and the
tolerances get zero cotangents; cotangents of anything but
``result.state.params`` and ``result.state.value`` (the gradient, the trace)
are ignored. Cost: one O(N^3) dense solve plus a gradient evaluation.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from attnopt.solvers.state import Status


def _zero_cotangent(x):
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, jax.dtypes.float0)


def implicit_gradients(run):
    """Wrap ``run(problem, x0, solver, tolerance) -> SolveResult`` with the custom VJP of the module docstring."""

    @jax.custom_vjp
    def solve(problem, x0, solver, tolerance):
        return run(problem, x0, solver, tolerance)

    def forward(problem, x0, solver, tolerance):
        result = run(problem, x0, solver, tolerance)
        return result, (problem, x0, solver, tolerance, result.state.params, result.status)

    def backward(residuals, cotangent):
        problem, x0, solver, tolerance, x_star, status = residuals
        x_bar, _ = ravel_pytree(cotangent.state.params)
        w = jnp.linalg.solve(problem.hessian(x_star), x_bar)

        def grad_and_loss(data):
            return ravel_pytree(data.grad(x_star))[0], data.loss(x_star)

        _, pullback = jax.vjp(grad_and_loss, problem)
        (problem_bar,) = pullback((-w, cotangent.state.value))
        ok = (status == Status.CONVERGED) & jnp.all(jnp.isfinite(w))
        problem_bar = jax.tree.map(lambda t: jnp.where(ok, t, jnp.nan), problem_bar)
        zeros = jax.tree.map(_zero_cotangent, (x0, solver, tolerance))
        return (problem_bar, *zeros)

    solve.defvjp(forward, backward)
    return solve
