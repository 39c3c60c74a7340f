"""Native nuclear-norm max-margin problem: ``min ||W||_* s.t. <A_k, W> >= m_k``, A (K, d1, d2), m (K,).

Its dual is ``max m^T lambda s.t. lambda >= 0, ||M(lambda)||_2 <= 1`` with
M(lambda) = sum_k lambda_k A_k. Steps, all with fixed shapes and lax loops (vmappable):

1. feasibility: the constraints are those of the Frobenius problem, so the native QP
   (:func:`attnopt.maxmargin.qp.solve_qp`) decides it and supplies the Farkas
   certificate when there is none; rows are rescaled as there;
2. barrier path following on the dual: Newton with line search on
   ``phi_t(lambda) = -t m^T lambda - log det(I - M^T M) - sum_k log lambda_k``, t x10 at
   each centred point, until the duality gap (K + min(d1, d2)) / t is 1e-7 relative.
   A centred point gives the primal ``W = (2/t) M (I - M^T M)^{-1}``, feasible
   with slack 1 / (t lambda_k);
3. polish: with the rank r read off W's singular values (relative to the largest)
   and the active set {lambda_k > slack_k}, Gauss-Newton (minimum-norm steps) on the
   optimality conditions of the factored problem ``min 1/2 (||K||^2 + ||Q||^2)``
   with W = K Q^T (d x r): ``K = M Q, Q = M^T K, <A_k, K Q^T> = m_k`` on the active set,
   the active set corrected in a few rounds (:func:`activeset.refine`);
4. keep whichever pair, barrier or polished, has the smallest KKT residual: the largest
   of primal infeasibility max_k (m_k - <A_k, W>)_+ / (|m_k| + ||A_k||_F ||W||_F), dual
   infeasibility (||M||_2 - 1)_+ and max_k (-lambda_k)_+ ||A_k||_F, and the relative
   duality gap |‖W‖_* - m^T lambda| / ‖W‖_*. Primal and dual feasible with gap g
   certify the objective to relative accuracy g.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from attnopt.maxmargin import qp
from attnopt.maxmargin.activeset import refine
from attnopt.maxmargin.result import SVMResult, check_constraints, safe_div

GAP_TOL = 1e-7
POLISH_STEPS = 3


def solve_nuclear(A, m, mask=None, *, tol=None, max_iter: int = 400) -> SVMResult:
    """Solve ``min ||W||_* s.t. <A_k, W> >= m_k`` (rows with ``mask`` False are dropped).

    A (K, d1, d2), m (K,), mask (K,) bool. Returns an :class:`SVMResult` with solution
    W (d1, d2), objective ||W||_*, the dual multipliers (K,), support and feasible.
    ``tol`` (relative, default sqrt(eps)) decides feasibility and the active constraints.
    Jits and vmaps.
    """
    A, m, mask = check_constraints(A, m, mask, "A")
    if A.ndim != 3:
        raise ValueError(f"A must have shape (K, d1, d2), got {tuple(A.shape)}")
    tol = jnp.sqrt(jnp.finfo(A.dtype).eps) if tol is None else tol
    return _solve(A, m, mask, jnp.asarray(tol, A.dtype), max_iter)


def _parts(A, lam):
    """M = sum_k lam_k A_k, the Cholesky factor of S = I - M^T M (NaN outside the domain), Z = M S^{-1}."""
    M = jnp.tensordot(lam, A, 1)
    eye = jnp.eye(M.shape[1], dtype=M.dtype)
    chol = jax.scipy.linalg.cho_factor(eye - M.T @ M)
    return M, chol, jax.scipy.linalg.cho_solve(chol, M.T).T


def _newton(A, m, lam, t):
    """Newton step of phi_t and its decrement.

    grad_k = -t m_k + 2 <Z, A_k> - 1/lam_k; Hessian
    2 <A_l, (I - M M^T)^{-1} A_k S^{-1}> + 2 tr(Z^T A_l Z^T A_k) + delta_kl / lam_k^2,
    solved in the scaled variable lam∘y.
    """
    M, chol, Z = _parts(A, lam)
    eye = jnp.eye(M.shape[1], dtype=M.dtype)
    S_inv = jax.scipy.linalg.cho_solve(chol, eye)
    left = jnp.eye(M.shape[0], dtype=M.dtype) + M @ S_inv @ M.T
    g = -t * m + 2 * jnp.einsum("kab,ab->k", A, Z) - 1 / lam
    ZA = jnp.einsum("ba,kbc->kac", Z, A)
    H = 2 * jnp.einsum("lab,kab->lk", A, jnp.einsum("ab,kbc,cd->kad", left, A, S_inv))
    H = H + 2 * jnp.einsum("lab,kba->lk", ZA, ZA)
    Hs = lam[:, None] * H * lam[None, :] + jnp.eye(lam.shape[0], dtype=lam.dtype)
    y = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(Hs), -lam * g)
    step = lam * y
    return step, jnp.sqrt(jnp.maximum(-g @ step, 0))


def _phi(A, m, lam, t):
    """phi_t(lam); +inf outside the domain (some lam_k <= 0 or ||M||_2 >= 1)."""
    M, chol, _ = _parts(A, lam)
    val = -t * (m @ lam) - 2 * jnp.sum(jnp.log(jnp.diag(chol[0]))) - jnp.sum(jnp.log(lam))
    return jnp.where(jnp.all(lam > 0) & jnp.isfinite(val), val, jnp.inf)


def _barrier(A, m, max_iter):
    """Path following on the dual: Newton with a backtracking line search (Armijo, over the fixed
    step lengths 2^-j), t x10 once centred (decrement < 1e-3); returns (lam, t)."""
    K, d1, d2 = A.shape
    nu = K + min(d1, d2)
    dtype = A.dtype
    trial = 0.5 ** jnp.arange(30, dtype=dtype)

    def body(state):
        lam, t, it, _ = state
        step, dec = _newton(A, m, lam, t)
        # phi now and at each trial step in one batched factorization (see attnopt.maxmargin._lax)
        phi = jax.vmap(lambda a: _phi(A, m, lam + a * step, t))(jnp.concatenate([jnp.zeros(1, dtype), trial]))
        # within the region of quadratic convergence (dec < 1/4) the full step is feasible and
        # taken as is: there phi's decrease can fall below its rounding error
        accept = (phi[1:] <= phi[0] - 0.25 * trial * dec**2) | ((dec < 0.25) & jnp.isfinite(phi[1:]))
        ok = jnp.any(accept)
        lam = jnp.where(ok, lam + trial[jnp.argmax(accept)] * step, lam)
        centred = dec < 1e-3
        finished = centred & (nu / t <= GAP_TOL * jnp.abs(m @ lam))
        t = jnp.where(centred & ~finished, 10 * t, t)
        return lam, t, it + 1, finished | ~ok

    lam0 = jnp.full(K, 0.5 / K, dtype)  # ||M|| <= sum_k lam_k ||A_k||_F = 1/2
    lam, t, _, _ = jax.lax.while_loop(
        lambda s: (s[2] < max_iter) & ~s[3], body, (lam0, jnp.ones((), dtype), jnp.zeros((), jnp.int32), jnp.zeros((), bool))
    )
    return lam, t


def _polish(A, m, active, rank_mask, svd, lam):
    """Gauss-Newton on K = M Q, Q = M^T K, <A_k, K Q^T> = m_k (k active), from W = K Q^T with r columns.

    Unknowns x = (vec K (d1, r), vec Q (d2, r), lam (K,)), those outside the rank mask and the
    active set held at 0. With G1_k = A_k Q and G2_k = A_k^T K the Jacobian is
    [[I, -M ⊗ I_r, -G1], [-M^T ⊗ I_r, I, -G2], [G1^T, G2^T, 0]]; each step solves its normal
    equations with a tiny Levenberg-Marquardt damping (the near minimum-norm step: K Q^T is
    unchanged by rotating the columns of K and Q together).
    """
    U, s, Vt = svd  # of the starting W
    d1, d2, r = U.shape[0], Vt.shape[1], s.shape[0]
    eye_r = jnp.eye(r, dtype=U.dtype)
    cols = rank_mask.astype(U.dtype)
    x_mask = jnp.concatenate([jnp.tile(cols, d1), jnp.tile(cols, d2), active.astype(U.dtype)])
    n_x = x_mask.shape[0]
    eps = jnp.finfo(U.dtype).eps

    def unpack(x):
        x = x * x_mask
        return x[: d1 * r].reshape(d1, r), x[d1 * r : (d1 + d2) * r].reshape(d2, r), x[(d1 + d2) * r :]

    def step(_, x):
        Kf, Qf, lam = unpack(x)
        M = jnp.tensordot(lam, A, 1)
        G1 = jnp.einsum("kab,bj->ajk", A, Qf).reshape(d1 * r, -1)
        G2 = jnp.einsum("kab,aj->bjk", A, Kf).reshape(d2 * r, -1)
        fit = jnp.einsum("kab,ab->k", A, Kf @ Qf.T) - m
        F = jnp.concatenate([(Kf - M @ Qf).ravel(), (Qf - M.T @ Kf).ravel(), jnp.where(active, fit, 0)])
        J = jnp.block([
            [jnp.eye(d1 * r, dtype=U.dtype), -jnp.kron(M, eye_r), -G1],
            [-jnp.kron(M.T, eye_r), jnp.eye(d2 * r, dtype=U.dtype), -G2],
            [G1.T * active[:, None], G2.T * active[:, None], jnp.zeros((A.shape[0],) * 2, U.dtype)],
        ]) * x_mask[None, :]
        JtJ = J.T @ J
        damping = eps * jnp.trace(JtJ) + jnp.finfo(U.dtype).tiny
        chol = jax.scipy.linalg.cho_factor(JtJ + damping * jnp.eye(n_x, dtype=U.dtype))
        return x - jax.scipy.linalg.cho_solve(chol, J.T @ F) * x_mask

    root = jnp.sqrt(s) * cols
    x = jnp.concatenate([(U * root).ravel(), (Vt.T * root).ravel(), jnp.where(active, lam, 0)])
    Kf, Qf, lam = unpack(jax.lax.fori_loop(0, POLISH_STEPS, step, x))
    return Kf @ Qf.T, lam


def _residual(A, m, W, lam, s=None):
    """(KKT residual, primal infeasibility, ||W||_*): the residual is the largest of primal
    infeasibility, dual infeasibility and relative duality gap (module docstring).
    s: the singular values (2, r) of W and M(lam), computed when None."""
    An = jnp.linalg.norm(A, axis=(1, 2))
    if s is None:
        s = jnp.linalg.svd(jnp.stack([W, jnp.tensordot(lam, A, 1)]), compute_uv=False)  # one batched call
    nuc, spectral = jnp.sum(s[0]), s[1, 0]
    primal = jnp.max(safe_div(jnp.maximum(m - jnp.einsum("kab,ab->k", A, W), 0), jnp.abs(m) + An * jnp.linalg.norm(W)))
    dual = jnp.maximum(jnp.maximum(spectral - 1, 0), jnp.max(jnp.maximum(-lam, 0) * An))
    gap = safe_div(jnp.abs(nuc - m @ lam), nuc)
    res = jnp.maximum(primal, jnp.maximum(dual, gap))
    return jnp.where(jnp.isfinite(res), res, jnp.inf), primal, nuc


@jax.jit(static_argnums=4)
def _solve(A, m, mask, tol, max_iter) -> SVMResult:
    K, d1, d2 = A.shape
    frob = qp._solve(A.reshape(K, -1), m, mask, tol, 100)
    sc = qp._scale(A.reshape(K, -1), m, mask)
    A_hat = sc.C.reshape(K, d1, d2)
    trivial = jnp.all(sc.m <= 0)  # W = 0 meets every constraint
    lam, t = _barrier(A_hat, sc.m, jnp.where(frob.feasible & ~trivial, max_iter, 0))
    W_bar = 2 / t * _parts(A_hat, lam)[2]
    slack = jnp.einsum("kab,ab->k", A_hat, W_bar) - sc.m
    # one batched SVD (see attnopt.maxmargin._lax) for the start's residual and the polish
    U, s, Vt = jnp.linalg.svd(jnp.stack([W_bar, jnp.tensordot(lam, A_hat, 1)]), full_matrices=False)
    res_bar, _, _ = _residual(A_hat, sc.m, W_bar, lam, s)
    rank_mask = s[0] > jnp.sqrt((K + min(d1, d2)) / t) * s[0, 0]
    W, lam, _ = refine(
        lambda active: _polish(A_hat, sc.m, active, rank_mask, (U[0], s[0], Vt[0]), lam),
        lambda W, lam: _residual(A_hat, sc.m, W, lam)[0],
        lambda W: jnp.einsum("kab,ab->k", A_hat, W) - sc.m,
        lam > slack,
        (W_bar, lam, res_bar),
        jnp.where(frob.feasible & ~trivial, 1e3 * jnp.finfo(A.dtype).eps, jnp.inf),  # else no rounds
    )
    W, lam = jnp.where(trivial, 0, W), jnp.where(trivial, 0, lam)
    res, primal, nuc = _residual(A_hat, sc.m, W, lam)
    feasible = frob.feasible & (primal <= tol)
    slack = jnp.einsum("kab,ab->k", A_hat, W) - sc.m
    support = feasible & mask & (slack <= tol * (jnp.abs(sc.m) + jnp.linalg.norm(W)))
    nan = jnp.array(jnp.nan, A.dtype)
    return SVMResult(
        solution=jnp.where(feasible, W * sc.beta, nan),
        objective=jnp.where(feasible, nuc * sc.beta, nan),
        multipliers=jnp.where(feasible, jnp.where(mask, lam / sc.r, 0), frob.multipliers),
        support=support,
        feasible=feasible,
        kkt_residual=jnp.where(feasible, res, frob.kkt_residual),
    )
