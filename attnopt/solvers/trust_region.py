"""Newton with a trust region (docs/math.md, Trust-region Newton; Nocedal & Wright, Algorithm 4.1).

Each step minimises the quadratic model of the loss over a ball and keeps the
minimiser only if the loss agrees with the model::

    m(p) = <g, p> + 1/2 <p, H p>,        p = argmin m(p) over ||p|| <= Δ
    ρ    = (f(x) - f(x + p) + τ) / (-m(p)),      τ = 16 eps (1 + |f(x)|)   (rounding allowance;
           where -m(p) <= τ the ratio is rounding noise: ρ = 1 if f(x + p) <= f(x) + τ, else 0)
    Δ   <- ||p|| / 4              if ρ < 1/4 (or f(x + p) is not finite)
           min(2 Δ, max_radius)   if ρ > 3/4 and p is on the boundary
           Δ                      otherwise
    x   <- x + p                  if ρ > η

A rejected trial shrinks Δ and solves the subproblem again from the same
model, within the same step: every step moves x (or fails after ``max_trials``
trials, LINESEARCH_FAILED), so ``state.count`` counts accepted steps and
``state.inner.trials`` the subproblems the last step solved. The first trial's
gradient is evaluated next to its loss (XLA shares ``A x``); later trials evaluate the loss only.

Subproblems (``trust_region(subproblem=...)``):

- ``"exact"`` (:class:`TrustRegion`): H = ``problem.hessian(x)`` (N, N). If its
  Cholesky factor exists and the Newton step ``-H^{-1} g`` lies in the ball it
  is the solution (O(N^2) once factored). Otherwise ``H = Q diag(λ) Q^T`` (eigh,
  O(N^3), at most once per model) and :func:`eigen_step` gives the exact
  minimiser on the boundary, the hard case included.
- ``"cg"`` (:class:`TrustRegionCG`): Steihaug's truncated CG on the HVP
  (:func:`attnopt.solvers.newton_cg.truncated_cg` with a radius), O(N) memory, for large N.

Lazy Hessians (``"exact"``, ``max_reuse`` > 0): the model (H, its Cholesky factor
and eigendecomposition) serves the next step too, with the new gradient, while it
keeps predicting the loss and the step made progress::

    reuse  iff  accepted  and  |f(x) - f(x + p) - (-m(p))| <= -m(p) / 4 + τ
                and  (p on the boundary  or  ||g(x + p)|| <= ||g(x)|| / 4)
                and  the model has served fewer than 1 + max_reuse steps

A reused step costs O(N^2) plus the loss and gradient instead of a Hessian and a
factorisation; a reused model whose first trial is rejected is rebuilt at x and the
trial repeated at the same radius. Near a minimiser this is Shamanskii's variant of
Newton's method (superlinear); ``max_reuse=0`` builds H at every step (quadratic).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from attnopt.solvers.capabilities import HasHessian, HasHVP
from attnopt.solvers.linesearch import value_noise
from attnopt.solvers.newton import flat_grad
from attnopt.solvers.newton_cg import flat_hessian_operator, truncated_cg
from attnopt.solvers.state import (
    Solver, SolverState, advance, all_finite, check_count, check_option, is_concrete, solver_class, start, static,
    where_needed,
)


class TrustRegionInner(NamedTuple):
    """Inner state of the trust-region solvers.

    radius: Δ for the next step (the initial radius before the first step).
    rho: ρ of the last accepted trial (NaN before the first step).
    trials: subproblems solved in the last step (1 + rejected trials), int32.
    model: the quadratic model's cache (``"exact"``: a :class:`HessianModel`; ``"cg"``: empty).
    age: steps the current model has served (1 after the step that built it), int32.
    reuse: whether the next step reuses the model instead of building it anew (bool).
    """

    radius: jax.Array
    rho: jax.Array
    trials: jax.Array
    model: Any
    age: jax.Array
    reuse: jax.Array


class HessianModel(NamedTuple):
    """The exact subproblem's model: H (N, N), its lower Cholesky factor L (NaN unless H is
    positive definite), and its eigendecomposition lam (N,) ascending, Q (N, N), valid once ``have_eig``."""

    H: jax.Array
    L: jax.Array
    lam: jax.Array
    Q: jax.Array
    have_eig: jax.Array


class Trial(NamedTuple):
    """One trial step x + p: its loss, ρ, the predicted decrease -m(p), whether p is on the boundary,
    whether it is accepted, the radius it used and the radius that follows it."""

    x: jax.Array
    value: jax.Array
    rho: jax.Array
    predicted: jax.Array
    boundary: jax.Array
    accepted: jax.Array
    radius: jax.Array
    radius_next: jax.Array


def _secular_norm(lam, gh, sigma):
    """``c = -gh / (lam + sigma)``, ``||c||`` and ``q = sum gh^2 / (lam + sigma)^3`` (lam + sigma > 0)."""
    c = -gh / (lam + sigma)
    return c, jnp.linalg.norm(c), jnp.sum(c * c / (lam + sigma))


def eigen_step(lam, Q, g, radius, *, rtol=None, max_iters: int = 100):
    """Minimiser of ``<g, p> + 1/2 <p, H p>`` over ``||p|| <= radius`` for ``H = Q diag(lam) Q^T``.

    Args:
      lam: (N,) eigenvalues, ascending; Q: (N, N) orthonormal eigenvectors (columns); g: (N,);
      radius: Δ > 0; rtol: accepted relative error of ``||p|| = Δ`` (default sqrt(eps)).
    Returns:
      (p, boundary): the step (N,) and whether it lies on the boundary.

    With ``gh = Q^T g`` and ``p(σ) = -Q (diag(lam) + σ I)^{-1} gh`` (Moré & Sorensen; N&W Sec. 4.3):

    - interior: ``lam_1 > 0`` and ``||p(0)|| <= Δ``: ``p = p(0)``, the Newton step;
    - otherwise σ >= ``σ_lo = max(0, -lam_1) + δ``, where ``δ = N eps max(|lam|, ||g|| / Δ)`` is the
      resolution of σ: ``σ = σ_lo`` if ``||p(σ_lo)|| <= Δ``, else the root of ``1/||p(σ)|| = 1/Δ`` by
      Newton's iteration ``σ <- σ + (||p||^2 / q) (||p|| - Δ) / Δ``, ``q = sum gh_i^2 / (lam_i + σ)^3``,
      from ``σ_0 = max(σ_lo, max_i |gh_i| / Δ - lam_i)`` (where ``||p(σ_0)|| >= Δ``), safeguarded by
      bisection in the bracket ``[σ_0, ||g|| / Δ - lam_1]``; O(N) per iteration;
    - a step still inside the ball (the hard case, ``gh_1 = 0``, and its neighbours) is completed to
      the boundary along q_1: its coefficient on q_1 becomes ``± sqrt(Δ^2 - ||p||^2 + c_1^2)``, with the
      sign of ``-gh_1``, which leaves m(p) minimal.
    """
    dtype = g.dtype
    eps = jnp.finfo(dtype).eps
    rtol = jnp.sqrt(eps) if rtol is None else rtol
    gh = g @ Q
    g_norm = jnp.linalg.norm(g)
    newton_c, newton_norm, _ = _secular_norm(lam, gh, 0)
    interior = (lam[0] > 0) & (newton_norm <= radius)
    sigma_lo = jnp.maximum(0, -lam[0]) + lam.size * eps * jnp.maximum(jnp.max(jnp.abs(lam)), g_norm / radius)
    sigma0 = jnp.maximum(sigma_lo, jnp.max(jnp.abs(gh) / radius - lam))
    upper = jnp.maximum(g_norm / radius - lam[0], sigma0)

    def cond(carry):
        j, _, a, b, norm = carry
        unresolved = b - a > 4 * eps * jnp.abs(b)
        return (j < max_iters) & unresolved & (jnp.abs(norm - radius) > rtol * radius)

    def body(carry):
        j, sigma, a, b, _ = carry
        _, norm, q = _secular_norm(lam, gh, sigma)
        a = jnp.where(norm >= radius, sigma, a)
        b = jnp.where(norm <= radius, sigma, b)
        step = sigma + norm**2 / q * (norm - radius) / radius
        sigma = jnp.where((step > a) & (step < b), step, 0.5 * (a + b))
        return j + 1, sigma, a, b, _secular_norm(lam, gh, sigma)[1]

    start_norm = jnp.where(interior, radius, _secular_norm(lam, gh, sigma0)[1])  # solved cases skip the loop
    _, sigma, _, _, _ = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), sigma0, sigma0, upper, start_norm))
    c, norm, _ = _secular_norm(lam, gh, sigma)
    sign = jnp.where(c[0] < 0, -1, 1).astype(dtype)
    completed = c.at[0].set(sign * jnp.sqrt(jnp.maximum(radius**2 - norm**2 + c[0] ** 2, 0)))
    c = jnp.where(interior, newton_c, jnp.where(norm < radius, completed, c))
    return Q @ c, ~interior


class _Base(Solver):
    """The trust-region loop shared by the subproblem solvers.

    A subclass defines the model: :meth:`model_init` (a placeholder of the cache's shapes),
    :meth:`fresh_model` (the cache at params) and :meth:`subproblem` (the solver of
    ``min m(p), ||p|| <= Δ`` on it); ``max_reuse`` > 0 lets a model serve later steps.
    """

    max_reuse = 0

    def model_init(self, params):
        """A cache with the shapes of :meth:`fresh_model`'s (no work)."""
        del params
        return ()

    def fresh_model(self, problem, params):
        """The model's cache at params (a pytree, carried between steps)."""
        del problem, params
        return ()

    def subproblem(self, problem, params, unravel, g):
        """``solve(model, radius) -> (p, boundary, predicted, model, finite)``, with ``predicted = -m(p)``."""
        raise NotImplementedError

    def init(self, problem, params) -> SolverState:
        state = start(problem, params, None)
        dtype = state.value.dtype
        zero = jnp.zeros((), jnp.int32)
        inner = TrustRegionInner(
            jnp.asarray(self.radius, dtype), jnp.full((), jnp.nan, dtype), zero, self.model_init(params), zero,
            jnp.asarray(False),
        )
        return state._replace(inner=inner)

    def step(self, problem, state: SolverState) -> SolverState:
        x, unravel = ravel_pytree(state.params)
        g, _ = ravel_pytree(state.grad)
        value, dtype = state.value, state.value.dtype
        solve = self.subproblem(problem, state.params, unravel, g)
        loss = lambda y: problem.loss(unravel(y))
        noise = value_noise(value)
        rebuild = lambda needed, model: where_needed(needed, self.fresh_model, (problem, state.params), model)

        def trial(model, radius):
            p, boundary, predicted, model, finite = solve(model, radius)
            x_new = x + p
            f_new = loss(x_new)
            reduction = value - f_new + noise
            # Below rounding level the ratio is noise: the model agrees iff the loss did not rise.
            resolved = predicted > noise
            rho = jnp.where(resolved, reduction / jnp.where(resolved, predicted, 1), jnp.where(reduction >= 0, 1, 0))
            rho = jnp.where(jnp.isfinite(f_new), rho, jnp.nan).astype(dtype)
            expand = (rho > 0.75) & boundary
            radius_next = jnp.where(
                ~(rho >= 0.25), jnp.linalg.norm(p) / 4,
                jnp.where(expand, jnp.minimum(2 * radius, self.max_radius), radius),
            ).astype(dtype)
            return Trial(x_new, f_new, rho, predicted, boundary, rho > self.eta, radius, radius_next), model, finite

        model = rebuild(~state.inner.reuse, state.inner.model)
        age = jnp.where(state.inner.reuse, state.inner.age, 0)
        first, model, finite = trial(model, state.inner.radius)

        def cond(carry):
            count, current, _, _, finite = carry
            return finite & ~current.accepted & (count < self.max_trials)

        def body(carry):
            count, current, model, age, _ = carry
            # A reused model that failed is rebuilt here and retried at the same radius; a fresh one shrinks it.
            stale = age > 0
            model = rebuild(stale, model)
            new, model, finite = trial(model, jnp.where(stale, current.radius, current.radius_next))
            return count + 1, new, model, jnp.zeros_like(age), finite

        trials, last, model, age, finite = jax.lax.while_loop(
            cond, body, (jnp.ones((), jnp.int32), first, model, age, finite)
        )
        grad = flat_grad(problem, unravel)
        g_new = where_needed(trials > 1, grad, (last.x,), grad(first.x))
        # Reuse the model while it predicts the loss to within a quarter of the decrease and the step
        # either reached the boundary or shrank the gradient (docs/math.md, Trust-region Newton).
        accurate = jnp.abs(value - last.value - last.predicted) <= last.predicted / 4 + noise
        contracted = jnp.linalg.norm(g_new) <= jnp.linalg.norm(g) / 4
        reuse = last.accepted & accurate & (last.boundary | contracted) & (age < self.max_reuse)
        inner = TrustRegionInner(last.radius_next, last.rho, trials, model, age + 1, reuse)
        return advance(state, unravel(last.x), last.value, unravel(g_new), inner, last.accepted, finite)


@solver_class
class TrustRegion(_Base):
    """Trust-region Newton with the exact subproblem on the dense Hessian (build with :func:`trust_region`)."""

    radius: Any = 1.0
    max_radius: Any = float("inf")
    eta: Any = 1e-4
    max_reuse: Any = 8
    max_trials: int = static(40)
    name = "trust_region"
    needs = (HasHessian,)

    def model_init(self, params):
        size = ravel_pytree(params)[0].size
        dtype = ravel_pytree(params)[0].dtype
        square = jnp.zeros((size, size), dtype)
        return HessianModel(square, square, jnp.zeros(size, dtype), square, jnp.asarray(False))

    def fresh_model(self, problem, params):
        H = problem.hessian(params)
        return HessianModel(H, jnp.linalg.cholesky(H), jnp.zeros_like(H[0]), jnp.zeros_like(H), jnp.asarray(False))

    def subproblem(self, problem, params, unravel, g):
        del problem, params, unravel

        def solve(model, radius):
            newton = -jax.scipy.linalg.cho_solve((model.L, True), g)
            use_newton = jnp.all(jnp.isfinite(newton)) & (jnp.linalg.norm(newton) <= radius)
            eigh = lambda H: tuple(jnp.linalg.eigh(H))
            lam, Q = where_needed(~use_newton & ~model.have_eig, eigh, (model.H,), (model.lam, model.Q))
            model = HessianModel(model.H, model.L, lam, Q, model.have_eig | ~use_newton)
            p_eig, boundary = where_needed(~use_newton, eigen_step, (lam, Q, g, radius), (g, jnp.asarray(True)))
            p = jnp.where(use_newton, newton, p_eig)
            predicted = -(g @ p + 0.5 * p @ (model.H @ p))
            return p, ~use_newton & boundary, predicted, model, all_finite(model.H)

        return solve


@solver_class
class TrustRegionCG(_Base):
    """Trust-region Newton with Steihaug's CG on the HVP (build with ``trust_region(subproblem="cg")``)."""

    radius: Any = 1.0
    max_radius: Any = float("inf")
    eta: Any = 1e-4
    max_trials: int = static(40)
    max_cg_steps: int | None = static(None)
    name = "trust_region"
    needs = (HasHVP,)

    def subproblem(self, problem, params, unravel, g):
        hvp = flat_hessian_operator(problem, params, unravel)
        max_iters = g.size if self.max_cg_steps is None else self.max_cg_steps

        def solve(model, radius):
            cg = truncated_cg(hvp, g, max_iters, radius)
            predicted = -0.5 * (g @ cg.p + cg.p @ cg.residual)  # -m(p), using H p = r - g
            return cg.p, cg.boundary, predicted, model, all_finite(cg.p)

        return solve


def trust_region(
    subproblem: str = "exact", *, radius: float = 1.0, max_radius: float = float("inf"), eta: float = 1e-4,
    max_reuse: int | None = None, max_trials: int = 40, max_cg_steps: int | None = None,
) -> TrustRegion | TrustRegionCG:
    """Newton with a trust region: exact subproblem on ``problem.hessian`` or Steihaug CG on the HVP.

    Args:
      subproblem: ``"exact"`` (dense (N, N) Hessian; Cholesky, or eigh and the secular equation,
        hard case included) or ``"cg"`` (Steihaug's truncated CG on ``problem.hessian_operator``
        or ``problem.hvp``; for large N). Static.
      radius: initial trust-region radius Δ > 0 (traced).
      max_radius: cap on Δ, >= radius (traced; default no cap).
      eta: acceptance threshold on ρ, in [0, 1/4) (traced).
      max_reuse: ``"exact"`` only: steps a Hessian may serve after the one it was built for, an
        int >= 0 (traced; default 8; 0: a new Hessian at every step). See the module docstring.
      max_trials: subproblems per step before the step fails with LINESEARCH_FAILED (static).
      max_cg_steps: ``"cg"`` only: CG iterations per subproblem (static; default N).

    ``state.inner`` (:class:`TrustRegionInner`) holds the radius for the next step, the ρ of the
    last accepted trial, the number of trials of the last step and the model's age. Converges to
    points where the gradient vanishes and the Hessian is positive semidefinite (``"exact"``;
    Steihaug's CG can stop at saddle points), quadratically near a minimiser with a positive
    definite Hessian when ``max_reuse=0`` and superlinearly otherwise.
    """
    if subproblem not in ("exact", "cg"):
        raise ValueError(f"subproblem must be 'exact' or 'cg', got {subproblem!r}")
    check_option("radius", radius, lambda r: r > 0, "> 0")
    check_option("max_radius", max_radius, lambda r: r > 0, "> 0")
    if is_concrete(radius, max_radius) and not max_radius >= radius:
        raise ValueError(f"max_radius must be >= radius ({radius!r}), got {max_radius!r}")
    check_option("eta", eta, lambda e: (e >= 0) & (e < 0.25), "in [0, 1/4)")
    max_trials = check_count("max_trials", max_trials)
    if subproblem == "exact":
        if max_cg_steps is not None:
            raise ValueError("max_cg_steps applies to subproblem='cg' only")
        if max_reuse is None:
            max_reuse = 8
        elif is_concrete(max_reuse):
            max_reuse = check_count("max_reuse", max_reuse, 0)
        return TrustRegion(radius, max_radius, eta, max_reuse, max_trials)
    if max_reuse is not None:
        raise ValueError("max_reuse applies to subproblem='exact' only")
    if max_cg_steps is not None:
        max_cg_steps = check_count("max_cg_steps", max_cg_steps)
    return TrustRegionCG(radius, max_radius, eta, max_trials, max_cg_steps)
