"""Native nuclear-norm max-margin problem: ``min ||W||_* s.t. <A_k, W> >= m_k``, A (K, d1, d2), m (K,).

Its dual is ``max m^T lambda s.t. lambda >= 0, ||M(lambda)||_2 <= 1`` with
M(lambda) = sum_k lambda_k A_k. Both are the semidefinite pair (n = d1 + d2)

    min tr X   s.t. <G_k, X> >= m_k, X >= 0 (n x n),        G_k = [[0, A_k], [A_k^T, 0]]
    max m^T lambda   s.t. lambda >= 0, Y = I - sum_k lambda_k G_k = [[I, -M], [-M^T, I]] >= 0

with W = 2 X_12 (the off-diagonal block of X). Steps, all with fixed shapes and lax
loops (vmappable):

1. feasibility: the constraints are those of the Frobenius problem, so the native QP
   (:func:`attnopt.maxmargin.qp.solve_qp`) decides it and supplies the Farkas
   certificate when there is none; rows are rescaled as there;
2. primal-dual interior point on the pair: HKM directions with Mehrotra's
   predictor-corrector, one K x K Cholesky of the Schur complement
   ``H_kl = tr(G_k X G_l Y^{-1}) + delta_kl x_k / lambda_k`` per step (x the primal slacks),
   from X = (||W_F||_F / n) I (W_F the Frobenius solution), until the duality gap and the
   primal residual are ``GAP_TOL`` relative. Step lengths: the largest of a fixed grid whose
   trial points X + a dX, Y + a dY all factor in one batched Cholesky (an eigendecomposition
   of the scaled directions costs about 3x more under vmap on CPU);
3. polish: at the optimum W = M P with P = (W^T W)^{1/2} >= 0 and (I - M^T M) P = 0 (W's row
   space lies in M's singular space of singular value 1). Newton on the square system

       sym((I - M^T M) P) = 0,   <A_k, M P> = m_k (k active),   lambda_k = 0 (k inactive)

   in (P symmetric, lambda), from the interior point's (2 X_22, lambda); the rank of W need
   not be known, and the active set {lambda_k > x_k} is corrected in a few rounds
   (:func:`activeset.refine`);
4. keep whichever pair, interior-point or polished, has the smallest KKT residual: the largest
   of primal infeasibility max_k (m_k - <A_k, W>)_+ / (|m_k| + ||A_k||_F ||W||_F), dual
   infeasibility (||M||_2 - 1)_+ and max_k (-lambda_k)_+ ||A_k||_F, and the relative
   duality gap |‖W‖_* - m^T lambda| / ‖W‖_*. Primal and dual feasible with gap g
   certify the objective to relative accuracy g.

W (d1, d2) with d1 < d2 is solved as W^T, so that P is the smaller square.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attnopt.maxmargin import qp
from attnopt.maxmargin.activeset import refine
from attnopt.maxmargin.result import SVMResult, check_constraints, safe_div

GAP_TOL = 1e-7  # the interior point's relative gap and primal residual
POLISH_STEPS = 2
STEP_FRACTION = 0.95  # of the way to the boundary of the cones
#: The interior point's step lengths, tried in one batched Cholesky (the predictor's only set the centring).
STEP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.01)
PREDICTOR_GRID = (1.0, 0.9, 0.75, 0.5, 0.25)


def solve_nuclear(A, m, mask=None, *, tol=None, max_iter: int = 100) -> SVMResult:
    """Solve ``min ||W||_* s.t. <A_k, W> >= m_k`` (rows with ``mask`` False are dropped).

    A (K, d1, d2), m (K,), mask (K,) bool. Returns an :class:`SVMResult` with solution
    W (d1, d2), objective ||W||_*, the dual multipliers (K,), support and feasible.
    ``tol`` (relative, default sqrt(eps)) decides feasibility and the active constraints;
    ``max_iter`` bounds the interior-point steps. Jits and vmaps.
    """
    A, m, mask = check_constraints(A, m, mask, "A")
    if A.ndim != 3:
        raise ValueError(f"A must have shape (K, d1, d2), got {tuple(A.shape)}")
    tol = jnp.sqrt(jnp.finfo(A.dtype).eps) if tol is None else tol
    if A.shape[1] < A.shape[2]:
        res = _solve(jnp.swapaxes(A, 1, 2), m, mask, jnp.asarray(tol, A.dtype), max_iter)
        return res._replace(solution=res.solution.T)
    return _solve(A, m, mask, jnp.asarray(tol, A.dtype), max_iter)


def _lift(A, lam):
    """sum_k lam_k G_k = [[0, M], [M^T, 0]] (n, n) for M = sum_k lam_k A_k."""
    M = jnp.tensordot(lam, A, 1)
    d1, d2 = M.shape
    return jnp.block([[jnp.zeros((d1, d1), M.dtype), M], [M.T, jnp.zeros((d2, d2), M.dtype)]])


def _project(A, S):
    """(<G_k, S>)_k (K,) for any S (n, n): <A_k, S_12 + S_21^T>."""
    d1 = A.shape[1]
    return jnp.einsum("kab,ab->k", A, S[:d1, d1:] + S[d1:, :d1].T)


def _schur(A, X, Z):
    """H_kl = tr(G_k X G_l Z) (K, K) for symmetric X, Z (n, n).

    = <A_k, Z11 A_l X22 + X11 A_l Z22 + Z12 A_l^T X12 + X12 A_l^T Z12>, i.e. vec(A)^T O vec(A)
    with O (d1 d2, d1 d2) built from Kronecker products (row-major vec) and two products.
    """
    K, d1, d2 = A.shape
    X11, X12, X22 = X[:d1, :d1], X[:d1, d1:], X[d1:, d1:]
    Z11, Z12, Z22 = Z[:d1, :d1], Z[:d1, d1:], Z[d1:, d1:]
    kron = lambda L, R: jnp.einsum("ac,be->abce", L, R)  # vec(L A R) = (L kron R^T) vec(A), R symmetric
    swap = lambda L, R: jnp.einsum("ac,eb->abec", L, R)  # vec(L A^T R)
    O = (kron(Z11, X22) + kron(X11, Z22) + swap(Z12, X12) + swap(X12, Z12)).reshape(d1 * d2, d1 * d2)
    Af = A.reshape(K, -1)
    H = Af @ (O @ Af.T)
    return (H + H.T) / 2


def _ratio(x, dx):
    """Largest a with x + a dx >= 0 (x > 0) along the last axis, inf when dx >= 0."""
    return jnp.min(jnp.where(dx < 0, -x / jnp.where(dx < 0, dx, -1), jnp.inf), axis=-1)


def _step_lengths(S, D, s, ds, grid, fraction):
    """(primal, dual) step lengths: for each pair i (X, x; Y, lambda) the largest a of ``grid``
    (descending, <= 1, 0 when none) with S_i + a / fraction D_i positive definite (one batched
    Cholesky of all trial points), and a <= fraction times the ratio test of s_i + a ds_i >= 0.
    S, D (2, n, n), s, ds (2, K)."""
    trials = jnp.asarray(grid, S.dtype)
    points = S[:, None] + (trials / fraction)[None, :, None, None] * D[:, None]
    inside = jnp.isfinite(jnp.linalg.cholesky(points)[..., -1, -1])  # (2, J); a failed factor is all NaN
    cone = jnp.where(jnp.any(inside, axis=1), trials[jnp.argmax(inside, axis=1)], 0)
    return jnp.minimum(cone, fraction * _ratio(s, ds))


def _interior_point(A, m, scale, max_iter):
    """Mehrotra predictor-corrector (HKM directions) on the semidefinite pair; returns (X, x, lambda).

    Central path X Y = mu I, x∘lambda = mu; with Z = Y^{-1}, a direction for the targets R (n, n),
    r (K,) is (H + diag(x/lambda)) dlambda = r_p - <G, R Z> + r/lambda, dY = -sum dlambda_k G_k,
    dX = sym(R Z - X dY Z), dx = (r - x∘dlambda)/lambda, with r_p = m - <G, X> + x. Starts from
    X = (scale / n) I, x = scale / n, lambda = 0.9/K (||M|| <= 0.9 for unit A_k), ``scale`` an estimate
    of the optimum (tr X = scale). Stops once the relative gap and primal residual are below GAP_TOL,
    when below eps^(1/4) they have not fallen under 0.9 times their best in 5 steps (the rounding
    floor of a coarse dtype), on a non-finite step (keeping the last iterate) or after ``max_iter``.
    """
    K, d1, d2 = A.shape
    n, dtype = d1 + d2, A.dtype
    eye = jnp.eye(n, dtype=dtype)

    def errors(X, x, lam):
        gap = jnp.abs(jnp.trace(X) - m @ lam) / (1 + jnp.abs(m @ lam))
        return jnp.maximum(gap, jnp.max(jnp.abs(m - _project(A, X) + x)))

    def body(state):
        X, x, lam, it, best, stalls, _ = state
        Y = eye - _lift(A, lam)
        Z = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(Y, lower=True), eye)
        chol = jax.scipy.linalg.cho_factor(_schur(A, X, Z) + jnp.diag(x / lam))
        r_p = m - _project(A, X) + x
        XY = X @ Y
        mu = (jnp.trace(XY) + x @ lam) / (n + K)

        def direction(R, r):  # (dX, dY, dx, dlambda)
            dlam = jax.scipy.linalg.cho_solve(chol, r_p - _project(A, R @ Z) + r / lam)
            dY = -_lift(A, dlam)
            dX = R @ Z - X @ dY @ Z
            return (dX + dX.T) / 2, dY, (r - x * dlam) / lam, dlam

        def steps(dX, dY, dx, dlam, grid, fraction):
            return _step_lengths(jnp.stack([X, Y]), jnp.stack([dX, dY]), jnp.stack([x, lam]), jnp.stack([dx, dlam]),
                                 grid, fraction)

        dXa, dYa, dxa, dla = direction(-XY, -x * lam)
        a_p, a_d = steps(dXa, dYa, dxa, dla, PREDICTOR_GRID, 1.0)
        mu_a = (jnp.sum((X + a_p * dXa) * (Y + a_d * dYa)) + (x + a_p * dxa) @ (lam + a_d * dla)) / (n + K)
        sigma = jnp.clip(mu_a / mu, 0, 1) ** 3
        dX, dY, dx, dlam = direction(sigma * mu * eye - XY - dXa @ dYa, sigma * mu - x * lam - dxa * dla)
        a_p, a_d = steps(dX, dY, dx, dlam, STEP_GRID, STEP_FRACTION)
        new = (X + a_p * dX, x + a_p * dx, lam + a_d * dlam)
        ok = jnp.all(jnp.array([jnp.all(jnp.isfinite(v)) for v in new]))
        X, x, lam = (jnp.where(ok, v, old) for v, old in zip(new, (X, x, lam)))
        error = errors(X, x, lam)
        stalls = jnp.where((error > 0.9 * best) & (error < jnp.finfo(dtype).eps ** 0.25), stalls + 1, 0)
        return X, x, lam, it + 1, jnp.minimum(error, best), stalls, ~ok | (error <= GAP_TOL) | (stalls >= 5)

    zero = jnp.zeros((), jnp.int32)
    start = (scale / n * eye, jnp.full(K, scale / n, dtype), jnp.full(K, 0.9 / K, dtype), zero,
             jnp.array(jnp.inf, dtype), zero, jnp.zeros((), bool))
    X, x, lam, *_ = jax.lax.while_loop(lambda s: (s[3] < max_iter) & ~s[-1], body, start)
    return X, x, lam


def _polish(A, m, active, P, lam):
    """Newton on sym((I - M^T M) P) = 0, <A_k, M P> = m_k (k active), lambda_k = 0 (k inactive).

    Unknowns: the upper triangle of P (d2, d2) symmetric and lambda (K,); the Jacobian is
    [[dP -> sym(B dP), l -> -sym((A_l^T M + M^T A_l) P)], [<sym(M^T A_k), dP>, <A_k, A_l P>]]
    (B = I - M^T M; inactive rows and columns of lambda replaced by the identity), solved by LU.
    Returns (W = M P, lambda).
    """
    K, _, d = A.shape
    iu, ju = np.triu_indices(d)
    off = jnp.asarray(iu != ju)
    upper = lambda S: S[..., iu, ju]
    sym = lambda S: (S + jnp.swapaxes(S, -1, -2)) / 2
    eye = jnp.eye(d, dtype=A.dtype)
    # vec(sym(B dP)) for the basis E_ij + E_ji of symmetric dP: columns (i, j) and (j, i) of (B kron I + I kron B) / 2
    lyapunov = lambda B: (jnp.kron(B, eye) + jnp.kron(eye, B)).reshape(d, d, d, d)[iu, ju] / 2

    def step(_, state):
        P, lam = state
        M = jnp.tensordot(lam, A, 1)
        B = eye - M.T @ M
        C = jnp.einsum("kab,ac->kbc", A, M)  # A_k^T M
        T = lyapunov(B)
        J11 = T[:, iu, ju] + jnp.where(off, T[:, ju, iu], 0)
        J12 = -upper(sym((C + jnp.swapaxes(C, 1, 2)) @ P)).T
        J21 = jnp.where(off, 2, 1) * upper(sym(C))
        J22 = A.reshape(K, -1) @ (A @ P).reshape(K, -1).T
        J22 = jnp.where(active[:, None], J22 * active, jnp.eye(K, dtype=A.dtype))
        J = jnp.block([[J11, J12 * active], [J21 * active[:, None], J22]])
        F = jnp.concatenate([upper(sym(B @ P)), jnp.where(active, jnp.einsum("kab,ab->k", A, M @ P) - m, 0)])
        dx = jnp.linalg.solve(J, -F)
        dP = jnp.zeros((d, d), A.dtype).at[iu, ju].set(dx[: len(iu)])
        return P + dP + jnp.triu(dP, 1).T, lam + dx[len(iu):]

    P, lam = jax.lax.fori_loop(0, POLISH_STEPS, step, (P, jnp.where(active, lam, 0)))
    return jnp.tensordot(lam, A, 1) @ P, lam


def _residual(A, m, W, lam):
    """(KKT residual, primal infeasibility, ||W||_*): the residual is the largest of primal
    infeasibility, dual infeasibility and relative duality gap (module docstring)."""
    An = jnp.linalg.norm(A, axis=(1, 2))
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
    # the interior point runs where the QP found W feasible; its loop reads the QP's residual, which
    # comes last (after the Farkas certificate), so no two factorizations run concurrently (_lax.py)
    run = frob.feasible & ~trivial & jnp.isfinite(frob.kkt_residual)
    # the Frobenius minimum norm ||W_F||_F <= ||W||_F <= ||W||_* sets the start's scale
    X, x, lam = _interior_point(A_hat, sc.m, jnp.where(run, frob.objective / sc.beta, 1), jnp.where(run, max_iter, 0))
    W_ipm = 2 * X[:d1, d1:]
    W, lam, _ = refine(
        lambda active: _polish(A_hat, sc.m, active, 2 * X[d1:, d1:], lam),
        lambda W, lam: _residual(A_hat, sc.m, W, lam)[0],
        lambda W: jnp.einsum("kab,ab->k", A_hat, W) - sc.m,
        lam > x,
        (W_ipm, lam, _residual(A_hat, sc.m, W_ipm, lam)[0]),
        jnp.where(run, 100 * jnp.finfo(A.dtype).eps, jnp.inf),  # polished pairs reach a few eps; else no rounds
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
