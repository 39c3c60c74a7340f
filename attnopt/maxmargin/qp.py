"""Native hard-margin SVM: ``min 1/2 ||w||^2 s.t. C w >= m`` for C (K, N), m (K,).

Its dual is the nonnegative QP ``max_{lambda >= 0} m^T lambda - 1/2 ||C^T lambda||^2``
with ``w = C^T lambda``; it is unbounded when no w is feasible. The solver works
instead on a problem that always has a solution, the nonnegative least squares

    min_{lambda >= 0} 1/2 ||C^T lambda||^2 + 1/2 (1 - m^T lambda)^2.

Its minimiser is lambda_svm / (1 + ||w*||^2) with rho = 1 - m^T lambda = 1 / (1 + ||w*||^2)
when the SVM is feasible, and a Farkas certificate (lambda >= 0, C^T lambda = 0,
m^T lambda = 1, rho = 0) when it is not. Steps, all with fixed shapes and lax loops
(so a batch of SVMs is one ``vmap``):

1. rescale: each row of (C, m) to a unit c_k, then m to max |m_k| = 1 (the same w
   up to one factor; the multipliers rescale back);
2. Mehrotra predictor-corrector interior point on the least squares, one K x K
   Cholesky per step;
3. polish: on the identified active set A = {k: lambda_k > s_k} (s the dual slack)
   solve the equality-constrained problem ``min ||w|| s.t. C_A w = m_A`` exactly
   (minimum-norm least squares) and correct lambda_A to ``C_A^T lambda_A = w``; a
   wrong guess of A is corrected in a few rounds (:func:`activeset.refine`);
4. keep whichever of the interior-point and the polished pairs has the smallest
   KKT residual; feasible when it meets every constraint to the tolerance.

The KKT residual is the largest of (||w|| > 0; each relative, invariant to scaling):
stationarity ||w - C^T lambda|| / ||w||, primal feasibility
max_k (m_k - c_k^T w)_+ / (|m_k| + ||c_k|| ||w||), dual feasibility
max_k (-lambda_k)_+ ||c_k|| / ||w|| and complementarity sum_k |lambda_k (c_k^T w - m_k)| / ||w||^2.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from attnopt.maxmargin._lax import run_if
from attnopt.maxmargin.activeset import refine
from attnopt.maxmargin.result import SVMResult, check_constraints, safe_div


def solve_qp(C, m, mask=None, *, tol=None, max_iter: int = 100) -> SVMResult:
    """Solve ``min 1/2 ||w||^2 s.t. C w >= m`` (rows with ``mask`` False are dropped).

    C (K, N), m (K,), mask (K,) bool. Returns an :class:`SVMResult` with solution w (N,),
    objective ||w||, multipliers lambda (K,), support and feasible. ``tol`` (relative,
    default sqrt(eps)) decides feasibility and which constraints are active. Jits and vmaps.
    """
    C, m, mask = check_constraints(C, m, mask)
    if C.ndim != 2:
        raise ValueError(f"C must have shape (K, N), got {tuple(C.shape)}")
    tol = jnp.sqrt(jnp.finfo(C.dtype).eps) if tol is None else tol
    return _solve(C, m, mask, jnp.asarray(tol, C.dtype), max_iter)


class _Scaled(NamedTuple):
    """Rows of (C, m) scaled by 1/r_k (unit c_k; masked rows become 0 >= -1), then m by 1/beta."""

    C: jax.Array
    m: jax.Array
    r: jax.Array
    beta: jax.Array


def _scale(C, m, mask) -> _Scaled:
    C = jnp.where(mask[:, None], C, 0)
    norms = jnp.linalg.norm(C, axis=1)
    r = jnp.where(norms > 0, norms, 1)
    m = jnp.where(mask, m / r, -1)
    beta = jnp.max(jnp.abs(m))
    return _Scaled(C / r[:, None], m / beta, r, beta)


def residuals(C, m, w, lam):
    """(stationarity, primal, dual, complementarity) relative residuals of the pair (w, lam)."""
    wn = jnp.linalg.norm(w)
    cn = jnp.linalg.norm(C, axis=1)
    slack = C @ w - m
    stat = safe_div(jnp.linalg.norm(w - C.T @ lam), wn)
    primal = jnp.max(safe_div(jnp.maximum(-slack, 0), jnp.abs(m) + cn * wn))
    dual = safe_div(jnp.max(jnp.maximum(-lam, 0) * cn), wn)
    comp = safe_div(jnp.sum(jnp.abs(lam * slack)), wn**2)
    return stat, primal, dual, comp


def _interior_point(C, m, max_iter):
    """Mehrotra predictor-corrector for ``min 1/2 lam^T H lam - m^T lam, lam >= 0``, H = C C^T + m m^T.

    KKT: s = H lam - m >= 0, lam >= 0, lam∘s = 0. Stops at mu = lam^T s / K <= tol rho^2 with the
    residual <= tol rho (rho = 1 - m^T lam, tol = eps^0.8), or after 5 steps without progress
    (mu down by less than 10%). Returns (lam, s).
    """
    K = m.shape[0]
    dtype = C.dtype
    eps = jnp.finfo(dtype).eps
    H = C @ C.T + jnp.outer(m, m)
    reg = 10 * K * eps * jnp.max(jnp.diag(H))
    tol = eps**0.8

    def rho(lam):
        return jnp.maximum(1 - m @ lam, jnp.sqrt(eps))

    def done(lam, s):
        scale = rho(lam)
        r = H @ lam - m - s
        return (lam @ s / K <= tol * scale**2) & (jnp.max(jnp.abs(r)) <= tol * scale)

    def max_step(x, dx):
        return jnp.min(jnp.where(dx < 0, -x / jnp.where(dx < 0, dx, -1), jnp.inf))

    def body(state):
        lam, s, it, stalls, _ = state
        r = H @ lam - m - s
        mu = lam @ s / K
        chol = jax.scipy.linalg.cho_factor(H + jnp.diag(s / lam) + reg * jnp.eye(K, dtype=dtype))

        def direction(rc):  # (H + S/Lam) dlam = rc/lam - r, ds = H dlam + r
            dlam = jax.scipy.linalg.cho_solve(chol, rc / lam - r)
            return dlam, H @ dlam + r

        dl_a, ds_a = direction(-lam * s)
        a_aff = jnp.minimum(1.0, jnp.minimum(max_step(lam, dl_a), max_step(s, ds_a)))
        mu_aff = (lam + a_aff * dl_a) @ (s + a_aff * ds_a) / K
        sigma = jnp.clip(mu_aff / mu, 0, 1) ** 3
        dl, ds = direction(-lam * s + sigma * mu - dl_a * ds_a)
        a = jnp.minimum(1.0, 0.99 * jnp.minimum(max_step(lam, dl), max_step(s, ds)))
        new_lam, new_s = lam + a * dl, s + a * ds
        ok = jnp.all(jnp.isfinite(new_lam)) & jnp.all(jnp.isfinite(new_s)) & jnp.all(new_lam > 0) & jnp.all(new_s > 0)
        lam, s = jnp.where(ok, new_lam, lam), jnp.where(ok, new_s, s)
        stalls = jnp.where(lam @ s / K > 0.9 * mu, stalls + 1, 0)  # rounding floor, or rho -> 0 (infeasible)
        return lam, s, it + 1, stalls, (stalls >= 5) | done(lam, s)

    ones = jnp.ones(K, dtype)
    zero = jnp.zeros((), jnp.int32)
    lam, s, _, _, _ = jax.lax.while_loop(
        lambda st: (st[2] < max_iter) & ~st[4], body, (ones, ones, zero, zero, jnp.zeros((), bool))
    )
    return lam, s


def _pinv(G, iters=3):
    """b -> G^+ b for a PSD G (K, K) and b in its range: iterated Tikhonov on one Cholesky factor
    of G + delta I, delta = eps tr(G) (G may be singular)."""
    delta = jnp.finfo(G.dtype).eps * jnp.trace(G) + jnp.finfo(G.dtype).tiny
    chol = jax.scipy.linalg.cho_factor(G + delta * jnp.eye(G.shape[0], dtype=G.dtype))
    step = lambda b, x: x + jax.scipy.linalg.cho_solve(chol, b - G @ x)
    return lambda b: jax.lax.fori_loop(0, iters, lambda _, x: step(b, x), jnp.zeros_like(b))


def _polish(C, m, active, lam):
    """Minimum-norm w with C_A w = m_A, and lam corrected on A (least change) so that C_A^T lam_A = w.

    With G_A = C_A C_A^T: w = C_A^T mu, mu = G_A^+ m_A, and lam_A + G_A^+ G_A (mu - lam_A).
    """
    C_A = jnp.where(active[:, None], C, 0)
    G = C_A @ C_A.T
    solve = _pinv(G)
    mu = solve(jnp.where(active, m, 0))
    lam = jnp.where(active, lam, 0)
    return C_A.T @ mu, lam + solve(G @ (mu - lam))


def certificate_residual(C, y):
    """||C^T y|| / sum_k y_k ||c_k||: how far y >= 0 is from cancelling the rows of C."""
    return safe_div(jnp.linalg.norm(C.T @ y), y @ jnp.linalg.norm(C, axis=1))


def _certificate(C, m, lam):
    """A Farkas certificate y >= 0, C^T y = 0, m^T y = 1 from the least squares' lam when infeasible.

    A correction y = lam∘(1 + u), u the minimum-norm least-squares solution of
    B diag(lam) u = e - B lam with B = [C^T; m^T] and e = (0, ..., 0, 1), is relative, so y
    stays >= 0 when lam nearly certifies (y is clipped at 0 otherwise). The interior point
    leaves small entries off the certificate's support, so the correction is also tried
    without the entries below 1e-8, 1e-6 and 1e-4 of the largest; the candidate with the
    smallest residual is kept.
    """
    B = jnp.concatenate([C.T, m[None]], axis=0)
    e = jnp.zeros(B.shape[0], C.dtype).at[-1].set(1)
    H = B.T @ B

    def correct(lam):
        lam = lam / jnp.where(m @ lam > 0, m @ lam, 1)
        u = _pinv(lam[:, None] * H * lam[None, :])(lam * (B.T @ (e - B @ lam)))
        y = jnp.maximum(lam * (1 + u), 0)
        return y / jnp.where(m @ y > 0, m @ y, 1)

    y = correct(lam)
    cuts = jnp.array([1e-8, 1e-6, 1e-4], C.dtype)
    ys = jnp.concatenate([y[None], jax.vmap(lambda c: correct(jnp.where(y > c * jnp.max(y), y, 0)))(cuts)])
    res = jax.vmap(lambda y: certificate_residual(C, y))(ys)
    return ys[jnp.argmin(jnp.where(jnp.isfinite(res), res, jnp.inf))]


@jax.jit(static_argnums=4)
def _solve(C, m, mask, tol, max_iter) -> SVMResult:
    eps = jnp.finfo(C.dtype).eps
    sc = _scale(C, m, mask)
    lam, s = _interior_point(sc.C, sc.m, max_iter)
    rho = 1 - sc.m @ lam
    usable = rho > 100 * m.shape[0] * eps
    lam_ipm = lam / jnp.where(usable, rho, 1)

    def worst(w, lam):
        res = jnp.max(jnp.stack(residuals(sc.C, sc.m, w, lam)))
        return jnp.where(jnp.isfinite(res), res, jnp.inf)

    w_ipm = sc.C.T @ lam_ipm
    w, lam_hm, _ = refine(
        lambda active: _polish(sc.C, sc.m, active, lam_ipm),
        worst,
        lambda w: sc.C @ w - sc.m,
        lam > s,
        (w_ipm, lam_ipm, jnp.where(usable, worst(w_ipm, lam_ipm), jnp.inf)),
        1e3 * eps,
    )
    stat, primal, dual, comp = residuals(sc.C, sc.m, w, lam_hm)
    feasible = primal <= tol
    slack = sc.C @ w - sc.m
    support = mask & (slack <= tol * (jnp.abs(sc.m) + jnp.linalg.norm(w)))

    certificate = run_if(~feasible, lambda: _certificate(sc.C, sc.m, jnp.where(mask, lam, 0)), jnp.zeros_like(lam))
    cert_res = certificate_residual(sc.C, certificate)
    w = w * sc.beta
    multipliers = jnp.where(
        mask, jnp.where(feasible, lam_hm * sc.beta, certificate / sc.beta) / sc.r, 0
    )
    nan = jnp.array(jnp.nan, C.dtype)
    return SVMResult(
        solution=jnp.where(feasible, w, nan),
        objective=jnp.where(feasible, jnp.linalg.norm(w), nan),
        multipliers=multipliers,
        support=support & feasible,
        feasible=feasible,
        kkt_residual=jnp.where(feasible, jnp.maximum(jnp.maximum(stat, primal), jnp.maximum(dual, comp)), cert_res),
    )
