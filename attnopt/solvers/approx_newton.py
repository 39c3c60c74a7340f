"""Approximate Newton with a leverage-score-sampled Hessian (docs/math.md, Approximate Newton (leverage-score sampling)).

For problems whose Hessian is ``H = A^T B A + λ I`` with ``B = diag(D) + U M U^T``
(rank 2), the diagonal part ``A^T diag(D) A = sum_i D_i a_i a_i^T`` is replaced by
an importance-sampled sum over m rows, the low-rank part is applied exactly::

    W  = sqrt(|D|) A                       rows w_i = sqrt(|D_i|) a_i
    l_i ~ w_i^T (W^T W + λ I)^{-1} w_i      approximate ridge leverage scores, O(n d k + d^3)
    p_i = l_i / sum(l),  i_1..i_m ~ p       m = min(n, ceil(c d log d / eps^2)) samples
    H~ = sum_j D_{i_j} / (m p_{i_j}) a_{i_j} a_{i_j}^T + (A^T U) M (A^T U)^T + λ I

With high probability ``(1 - eps) H <= H~ <= (1 + eps) H`` when D >= 0 (a
regularised instance). Cost O(n d k + m d^2 + d^3) instead of O(n d^2).
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from attnopt.solvers.capabilities import HasCurvature
from attnopt.solvers.newton import CurvatureScaled, Newton, line_search_options
from attnopt.solvers.state import solver_class, static


def sample_count(n: int, d: int, eps: float, oversample: float) -> int:
    """Static number of sampled rows, ``min(n, ceil(oversample d log d / eps^2))``."""
    return min(n, math.ceil(oversample * d * math.log(max(d, 2)) / eps**2))


def leverage_scores(key, W: jax.Array, ridge, *, jl_dim: int = 32) -> jax.Array:
    """Approximate ridge leverage scores ``w_i^T (W^T W + ridge I)^{-1} w_i`` of W (n, d), as (n,).

    A CountSketch S (4d buckets, O(nd)) gives R with ``R^T R ~ W^T S^T S W + ridge I`` (QR,
    O(d^3)); a Gaussian (d, jl_dim) G gives ``l_i ~ ||w_i R^{-1} G||^2 / jl_dim``, O(n d jl_dim).
    The scores are within a constant factor of the exact ones, which sampling tolerates.
    """
    n, d = W.shape
    k_bucket, k_sign, k_jl = jax.random.split(key, 3)
    buckets = min(n, 4 * d)
    rows = jax.random.randint(k_bucket, (n,), 0, buckets)
    signs = jax.random.rademacher(k_sign, (n,), W.dtype)
    SW = jax.ops.segment_sum(signs[:, None] * W, rows, num_segments=buckets)
    stacked = jnp.concatenate([SW, jnp.sqrt(ridge) * jnp.eye(d, dtype=W.dtype)])
    R = jnp.linalg.qr(stacked, mode="r")
    G = jax.random.normal(k_jl, (d, jl_dim), W.dtype)
    RinvG = jax.scipy.linalg.solve_triangular(R, G, lower=False)
    return jnp.sum(jnp.square(W @ RinvG), axis=1) / jl_dim


def sketched_hessian(problem, x, key, eps: float, oversample: float = 4.0) -> jax.Array:
    """H~ (d, d) of the module docstring for a problem with ``A``, ``curvature(x)`` and ``ridge``.

    Uses the exact ``A^T diag(D) A`` when the sample count reaches n.
    """
    A, B = problem.A, problem.curvature(x)
    n, d = A.shape
    ridge = problem.ridge * jnp.eye(d, dtype=A.dtype)
    m = sample_count(n, d, eps, oversample)
    if m >= n:
        return B.sandwich(A) + ridge
    k_scores, k_sample = jax.random.split(key)
    scores = leverage_scores(k_scores, jnp.sqrt(jnp.abs(B.diag))[:, None] * A, problem.ridge)
    total = jnp.sum(scores)
    prob = jnp.where(total > 0, scores / jnp.where(total > 0, total, 1), 1 / n)
    rows = jax.random.choice(k_sample, n, (m,), p=prob)
    weights = B.diag[rows] / (m * prob[rows])
    A_rows = A[rows]
    return (A_rows.T * weights) @ A_rows + B.low_rank_sandwich(A) + ridge


class Sketched:
    """Mixin: the curvature model is :func:`sketched_hessian`, its state a PRNG key split at every step.

    Needs the fields ``eps`` and ``oversample`` (static) and ``seed`` (traced)."""

    def model_init(self, params):
        del params
        return jax.random.key(self.seed)

    def matrix(self, problem, params, key):
        key, sample_key = jax.random.split(key)
        return sketched_hessian(problem, params, sample_key, self.eps, self.oversample), key


def check_sketch(eps, oversample) -> tuple[float, float]:
    """Static sketch options as floats: eps in (0, 1), oversample > 0."""
    if not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise ValueError(f"eps must be a number in (0, 1), got {eps!r}")
    if not isinstance(oversample, (int, float)) or not oversample > 0:
        raise ValueError(f"oversample must be a number > 0, got {oversample!r}")
    return float(eps), float(oversample)


class Verified(Sketched):
    """Mixin: a sketched model checked along each step, with one exact step where it fails.

    The model state is ``(key, exact)``. A step with the sketch H~ compares its
    curvature along the step with the exact one (the HVP of
    :class:`attnopt.solvers.newton.CurvatureScaled`); if
    ``|<p, H~ p> - <p, H p>| > eps <p, H p>`` (or ``<p, H p> <= 0``), H~ is not the
    ``(1 +- eps)`` approximation it should be there (sampling with |D| when D has
    negative entries, or a low-rank part that cancels most of ``A^T diag(D) A``),
    and the next step uses the exact Hessian, after which sampling resumes.
    """

    def model_init(self, params):
        return Sketched.model_init(self, params), jnp.asarray(False)

    def matrix(self, problem, params, model_state):
        key, exact = model_state
        M, key = jax.lax.cond(
            exact, lambda: (problem.hessian(params), key), lambda: Sketched.matrix(self, problem, params, key)
        )
        return M, (key, exact)

    def check_model(self, M, p, curvature, model_state):
        key, _ = model_state
        return key, ~(jnp.abs(p @ (M @ p) - curvature) <= self.eps * curvature)


@solver_class
class ApproxNewton(CurvatureScaled, Verified, Newton):
    """Newton with the sketched Hessian, verified along each step (build with :func:`approx_newton`)."""

    eps: float = static(0.5)
    oversample: float = static(4.0)
    seed: Any = 0
    name = "approx_newton"
    needs = (HasCurvature,)


def approx_newton(
    eps: float = 0.5, seed: int = 0, *, oversample: float = 4.0,
    c1: float = 1e-4, shrink: float = 0.5, max_backtracks: int = 40,
) -> ApproxNewton:
    """Newton with the sketched Hessian H~ (``(1 +- eps)``-spectral approximation), damped and line-searched.

    Args:
      eps: spectral accuracy in (0, 1) (static: it sets the sample count
        m = min(n, ceil(oversample d log d / eps^2))).
      seed: PRNG seed of the sampling (traced; the key lives in ``state.inner.model``).
      oversample: the constant c in the sample count (static).
      c1, shrink, max_backtracks: the line search, as in :func:`attnopt.solvers.newton`.

    Needs a problem with ``A``, ``curvature(x)`` (a DiagPlusLowRank) and ``ridge``. Each step
    scales its direction by the exact curvature along it (one HVP) and checks the sketch there;
    where the sketch is off by more than eps, the next step uses the exact Hessian (:class:`Verified`),
    so the solve converges also where sampling loses its guarantee (indefinite, unregularised
    instances), where up to every other step then forms the exact Hessian. Converges linearly at
    rate about eps near the optimum where the sketch holds.
    """
    max_backtracks = line_search_options(c1, shrink, max_backtracks)
    eps, oversample = check_sketch(eps, oversample)
    return ApproxNewton(c1, shrink, max_backtracks, eps, oversample, seed)
