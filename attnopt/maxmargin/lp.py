"""Native l_p-norm max-margin problem ``min ||w||_p s.t. C w >= m`` (p > 1), and the directional Bregman divergence.

It has the solution of ``min 1/p ||w||_p^p s.t. C w >= m``. With q = p / (p - 1),
F(w) = sign(w) |w|^{p-1} and its inverse G(z) = sign(z) |z|^{q-1}, the KKT conditions are

    F(w) = C^T lambda,   C w - s = m,   lambda >= 0,  s >= 0,  lambda∘s = 0,

the dual is ``max_{lambda >= 0} m^T lambda - 1/q ||C^T lambda||_q^q`` with w = G(C^T lambda), and
at the optimum m^T lambda = ||w||_p^p (p = 2: the QP of qp.py). Steps, all with fixed shapes
and lax loops (vmappable):

1. feasibility does not depend on the norm: the native QP (:func:`attnopt.maxmargin.qp.solve_qp`)
   decides it and supplies the Farkas certificate when there is none. Rows are scaled to unit
   ||c_k||_2 and m by the Euclidean minimum norm ||w_2|| (so the solution is of order 1);
2. primal-dual interior point (Mehrotra predictor-corrector) on (w, lambda, s) from
   (w_2 / ||w_2||, 1, 1). The stationarity is linearised on its smooth side (z = C^T lambda):
   for p <= 2 as e = w - G(z) (G' = (q-1) |z|^{q-2} is bounded), for p > 2 as e = F(w) - z
   (F' = (p-1) |w|^{p-2} is bounded; |w| floored at sqrt(eps) max |w|). With D = G'(z) and
   rho = e, or D = 1 / F'(w) and rho = e / F'(w), a first-order step has dw = D C^T dlambda - rho
   and, for a complementarity target r (lambda∘s -> r),

       (C D C^T + diag(s / lambda)) dlambda = C rho - (C w - s - m) + r / lambda,
       ds = (r - s∘dlambda) / lambda,

   one K x K Cholesky per step. The step to the boundary (x 0.99) is halved while it would
   more than double the infeasibility max(|C w - s - m|, |e|) (e is nonlinear in the step)
   beyond lambda^T s / K;
3. polish: on the active set A = {lambda_k > s_k}, the same Newton steps with s = 0 and
   lambda = 0 off A (``C_A w = m_A`` and the stationarity), the active set corrected in a few
   rounds (:func:`activeset.refine`);
4. keep whichever pair has the smallest KKT residual: the largest of (each relative, invariant
   to scaling) stationarity ||F(w) - C^T lambda||_q / ||w||_p^{p-1}, primal infeasibility
   max_k (m_k - c_k^T w)_+ / (|m_k| + ||c_k||_q ||w||_p), dual infeasibility
   max_k (-lambda_k)_+ ||c_k||_q / ||w||_p^{p-1} and complementarity
   sum_k |lambda_k (c_k^T w - m_k)| / ||w||_p^p (it bounds the duality gap relative to ||w||_p^p).

The multipliers are those of ``1/p ||w||_p^p``: F(w) = sum_k lambda_k c_k (p = 2: qp.py's).
"""
from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp

from attnopt.maxmargin import qp
from attnopt.maxmargin.activeset import refine
from attnopt.maxmargin.result import SVMResult, check_constraints, safe_div
from attnopt.solvers.mirror import dual_norm, inverse_mirror_map, mirror_map

BACKTRACKS = 30
GROWTH = 2.0  # the interior point's steps may at most double the infeasibility (or keep it below mu)
STALLS = 10
POLISH_STEPS = 12


def check_p(p, name: str = "p") -> float:
    """p as a float > 1 (a Python real number); ValueError naming ``name`` otherwise."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not (math.isfinite(p) and p > 1):
        raise ValueError(f"{name} must be a finite real number p > 1 (a Python float), got {p!r}")
    return float(p)


def norm(x, p) -> jax.Array:
    """||x||_p of the flattened x (scaled by max |x|: no overflow; the dual exponent of q is p)."""
    return dual_norm(x, p / (p - 1))


def bregman(a, b, p) -> jax.Array:
    """Directional Bregman divergence of psi = ||.||_p^p / p between the directions of a and b.

    With a = A / ||A||_p, b = B / ||B||_p (flattened arrays of one shape):
    ``D = ||a||_p^p / p + (p - 1) ||b||_p^p / p - <sign(b) |b|^{p-1}, a>`` (clipped at 0 against
    rounding): 0 iff the directions are equal, > 0 otherwise; NaN if A or B is 0 or not finite.
    """
    p = check_p(p)
    a, b = jnp.asarray(a), jnp.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"a and b must have one shape, got a {tuple(a.shape)} and b {tuple(b.shape)}")
    a, b = (x.ravel() / norm(x, p) for x in (a, b))
    d = jnp.sum(jnp.abs(a) ** p) / p + (p - 1) * jnp.sum(jnp.abs(b) ** p) / p - mirror_map(b, p) @ a
    return jnp.maximum(d, 0)


def solve_lp(C, m, p, mask=None, *, tol=None, max_iter: int = 100) -> SVMResult:
    """Solve ``min ||w||_p s.t. C w >= m`` (rows with ``mask`` False are dropped), p > 1.

    C (K, N), m (K,), mask (K,) bool. Returns an :class:`SVMResult` with solution w (N,),
    objective ||w||_p, multipliers lambda (K,) (sign(w)|w|^{p-1} = C^T lambda), support and
    feasible. ``tol`` (relative, default sqrt(eps)) decides feasibility and the active
    constraints. Jits and vmaps (p a Python float, passed on as an array: one compilation for all p).
    """
    p = check_p(p)
    C, m, mask = check_constraints(C, m, mask)
    if C.ndim != 2:
        raise ValueError(f"C must have shape (K, N), got {tuple(C.shape)}")
    tol = jnp.sqrt(jnp.finfo(C.dtype).eps) if tol is None else tol
    return _solve(C, m, mask, jnp.asarray(tol, C.dtype), jnp.asarray(p, C.dtype), max_iter)


def _max_step(x, dx):
    """The largest a with x + a dx >= 0 (inf when dx >= 0)."""
    return jnp.min(jnp.where(dx < 0, -x / jnp.where(dx < 0, dx, -1), jnp.inf))


def _interior_point(C, m, p, w, max_iter):
    """Primal-dual Mehrotra predictor-corrector on (w, lam, s) from (w, 1, 1) (module docstring, step 2).

    A step is halved (at most BACKTRACKS times) while it would more than double the
    infeasibility max(|C w - s - m|, |e|) (e is nonlinear) beyond mu = lam^T s / K. Stops when
    both are below eps^0.6 (the polish does the rest), after STALLS steps that do not bring
    their maximum 10% below its best, or when no step is accepted. Returns (w, lam, s).
    """
    K = m.shape[0]
    dtype = C.dtype
    eps = jnp.finfo(dtype).eps

    def measures(w, lam, s):  # (infeasibility, mu)
        e = _linearization(C, p, w, lam)[2]
        infeasibility = jnp.maximum(jnp.max(jnp.abs(C @ w - s - m)), jnp.max(jnp.abs(e)))
        return jnp.where(jnp.isfinite(infeasibility), infeasibility, jnp.inf), lam @ s / K

    def body(state):
        w, lam, s, (infeasibility, mu), best, it, stalls, _ = state
        D, rho, _ = _linearization(C, p, w, lam)
        r_p = C @ w - s - m
        M = (C * D) @ C.T
        chol = jax.scipy.linalg.cho_factor(M + jnp.diag(s / lam) + 10 * K * eps * jnp.max(jnp.diag(M)) * jnp.eye(K, dtype=dtype))

        def direction(rc):
            dlam = jax.scipy.linalg.cho_solve(chol, C @ rho - r_p + rc / lam)
            return D * (C.T @ dlam) - rho, dlam, (rc - s * dlam) / lam

        _, dl_a, ds_a = direction(-lam * s)
        a_aff = jnp.minimum(1.0, jnp.minimum(_max_step(lam, dl_a), _max_step(s, ds_a)))
        mu_aff = (lam + a_aff * dl_a) @ (s + a_aff * ds_a) / K
        sigma = jnp.clip(mu_aff / mu, 0, 1) ** 3
        dw, dl, ds = direction(sigma * mu - lam * s - dl_a * ds_a)

        def rejected(st):
            a, tries = st
            new_infeasibility, new_mu = measures(w + a * dw, lam + a * dl, s + a * ds)
            return (tries < BACKTRACKS) & ~(new_infeasibility <= jnp.maximum(GROWTH * infeasibility, new_mu))

        a0 = jnp.minimum(1.0, 0.99 * jnp.minimum(_max_step(lam, dl), _max_step(s, ds)))
        a, tries = jax.lax.while_loop(rejected, lambda st: (st[0] / 2, st[1] + 1), (a0, 0))
        a = jnp.where(tries < BACKTRACKS, a, 0)
        w, lam, s = (jnp.where(a > 0, x + a * dx, x) for x, dx in ((w, dw), (lam, dl), (s, ds)))
        new = measures(w, lam, s)
        progress = jnp.maximum(*new) < 0.9 * best
        best = jnp.where(progress, jnp.maximum(*new), best)
        stalls = jnp.where(progress, 0, stalls + 1)
        done = (stalls >= STALLS) | (jnp.maximum(*new) <= eps**0.6) | (a == 0)
        return w, lam, s, new, best, it + 1, stalls, done

    ones = jnp.ones(K, dtype)
    zero = jnp.zeros((), jnp.int32)
    first = measures(w, ones, ones)
    start = (w, ones, ones, first, jnp.maximum(*first), zero, zero, jnp.zeros((), bool))
    w, lam, s = jax.lax.while_loop(lambda st: (st[5] < max_iter) & ~st[7], body, start)[:3]
    return w, lam, s


def _linearization(C, p, w, lam):
    """(D, rho, e) (N,): the stationarity between w and z = C^T lam, linearised on its smooth side.

    p <= 2: e = w - G(z), D = G'(z), rho = e; p > 2: e = F(w) - z, D = 1 / F'(w), rho = e / F'(w)
    (module docstring). A step keeps e = 0 to first order when dw = D C^T dlam - rho.
    """
    z = C.T @ lam
    q = p / (p - 1)
    floor = jnp.sqrt(jnp.finfo(w.dtype).eps) * jnp.max(jnp.abs(w)) + jnp.finfo(w.dtype).tiny
    slope = (p - 1) * jnp.maximum(jnp.abs(w), floor) ** (p - 2)  # F'(w)
    dual_side = p <= 2
    D = jnp.where(dual_side, (q - 1) * jnp.abs(z) ** (q - 2), 1 / slope)
    e = jnp.where(dual_side, w - inverse_mirror_map(z, p), mirror_map(w, p) - z)
    return D, jnp.where(dual_side, e, e / slope), e


def _polish(C, m, p, active, w, lam):
    """Newton on the KKT system of the active set A from (w, lam): ``C_A w = m_A`` and the
    stationarity (:func:`_linearization`), lam = 0 off A. With r = C_A w - m_A each step solves
    ``(C_A D C_A^T) dlam = C_A rho - r`` (qp.py's regularised solve), dw = D C^T dlam - rho, and
    is halved (at most BACKTRACKS times) until max(|r|, |e|) falls; at most POLISH_STEPS steps.
    Returns (w, lam)."""
    target = 16 * jnp.finfo(C.dtype).eps
    both = active[:, None] & active[None, :]

    def size(w, lam):
        e = _linearization(C, p, w, lam)[2]
        value = jnp.maximum(jnp.max(jnp.abs(jnp.where(active, C @ w - m, 0))), jnp.max(jnp.abs(e)))
        return jnp.where(jnp.isfinite(value), value, jnp.inf)

    def body(state):
        w, lam, current, it, _ = state
        D, rho, _ = _linearization(C, p, w, lam)
        dlam = qp._pinv((C * D) @ C.T * both)(jnp.where(active, C @ (rho - w) + m, 0))
        dw = D * (C.T @ dlam) - rho
        rejected = lambda st: (st[1] < BACKTRACKS) & ~(size(w + st[0] * dw, lam + st[0] * dlam) < current)
        a, tries = jax.lax.while_loop(rejected, lambda st: (st[0] / 2, st[1] + 1), (jnp.ones((), w.dtype), 0))
        a = jnp.where(tries < BACKTRACKS, a, 0)
        w, lam = jnp.where(a > 0, w + a * dw, w), jnp.where(a > 0, lam + a * dlam, lam)
        new = size(w, lam)
        return w, lam, new, it + 1, (a == 0) | (new <= target)

    lam = jnp.where(active, lam, 0)
    start = (w, lam, size(w, lam), jnp.zeros((), jnp.int32), jnp.zeros((), bool))
    w, lam, _, _, _ = jax.lax.while_loop(lambda s: (s[3] < POLISH_STEPS) & ~s[4], body, start)
    return w, lam


def residuals(C, m, p, w, lam, c_norms):
    """(stationarity, primal, dual, complementarity) relative residuals of the pair (w, lam)
    (module docstring); c_norms (K,) = ||c_k||_q."""
    wn = norm(w, p)
    slack = C @ w - m
    stat = safe_div(norm(mirror_map(w, p) - C.T @ lam, p / (p - 1)), wn ** (p - 1))
    primal = jnp.max(safe_div(jnp.maximum(-slack, 0), jnp.abs(m) + c_norms * wn))
    dual = safe_div(jnp.max(jnp.maximum(-lam, 0) * c_norms), wn ** (p - 1))
    comp = safe_div(jnp.sum(jnp.abs(lam * slack)), wn**p)
    return stat, primal, dual, comp


def _scale(sc, mask, feasibility):
    """qp.py's scaling (unit rows) with m then divided by ||w_2||, the Euclidean minimum norm, when
    positive: the l_p solution is then of order 1 (masked rows stay 0 >= -1)."""
    beta = jnp.where(feasibility.feasible & (feasibility.objective > 0), feasibility.objective, sc.beta)
    return sc._replace(m=jnp.where(mask, sc.m * sc.beta / beta, -1), beta=beta)


@jax.jit(static_argnums=5)
def _solve(C, m, mask, tol, p, max_iter) -> SVMResult:
    eps = jnp.finfo(C.dtype).eps
    feasibility = qp.solve_qp(C, m, mask, tol=tol)
    sc = _scale(qp._scale(C, m, mask), mask, feasibility)
    c_norms = jax.vmap(lambda c: norm(c, p / (p - 1)))(sc.C)
    trivial = jnp.all(sc.m <= 0)  # w = 0 meets every constraint
    # the interior point's loop reads the QP's residual, which comes last (after the Farkas
    # certificate), so no two factorizations run concurrently (see attnopt.maxmargin._lax)
    run = feasibility.feasible & ~trivial & jnp.isfinite(feasibility.kkt_residual)
    w0 = jnp.where(run, feasibility.solution / sc.beta, 0)  # ||w0||_2 = 1
    w_ipm, lam_ipm, s_ipm = _interior_point(sc.C, sc.m, p, w0, jnp.where(run, max_iter, 0))

    def worst(w, lam):
        res = jnp.max(jnp.stack(residuals(sc.C, sc.m, p, w, lam, c_norms)))
        return jnp.where(jnp.isfinite(res), res, jnp.inf)

    w, lam, _ = refine(
        lambda active: _polish(sc.C, sc.m, p, active, w_ipm, lam_ipm),
        worst,
        lambda w: sc.C @ w - sc.m,
        lam_ipm > s_ipm,
        (w_ipm, lam_ipm, worst(w_ipm, lam_ipm)),
        jnp.where(run, 100 * eps, jnp.inf),  # else no rounds
    )
    w, lam = jnp.where(trivial, 0, w), jnp.where(trivial, 0, lam)
    stat, primal, dual, comp = residuals(sc.C, sc.m, p, w, lam, c_norms)
    feasible = feasibility.feasible & (primal <= tol)
    wn = norm(w, p)
    support = feasible & mask & (sc.C @ w - sc.m <= tol * (jnp.abs(sc.m) + c_norms * wn))
    nan = jnp.array(jnp.nan, C.dtype)
    return SVMResult(
        solution=jnp.where(feasible, w * sc.beta, nan),
        objective=jnp.where(feasible, wn * sc.beta, nan),
        multipliers=jnp.where(feasible, jnp.where(mask, lam * sc.beta ** (p - 1) / sc.r, 0), feasibility.multipliers),
        support=support,
        feasible=feasible,
        kkt_residual=jnp.where(feasible, jnp.max(jnp.stack([stat, primal, dual, comp])), feasibility.kkt_residual),
    )
