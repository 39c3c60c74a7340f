"""The SVMs of attention (docs/math.md, Attention as a max-margin problem), for a token selection alpha.

A selection alpha (n,) picks token alpha_i of each input. With keys k_it = W^T x_it:

    ATT-SVM (PromptAttention, on p):  min ||p||    s.t. (k_{i,alpha_i} - k_it)^T p >= m_i       for all t != alpha_i
    W-SVM   (CrossAttention, on W):   min ||W||    s.t. (x_{i,alpha_i} - x_it)^T W z_i >= m_i   for all t != alpha_i
                                      (Frobenius norm: a QP; nuclear norm ||W||_*: see nuclear.py)
    v-SVM   (either problem):         min ||v||    s.t. Y_i x_{i,alpha_i}^T v >= 1

The norm is Euclidean / Frobenius ("fro"), nuclear ("nuc", W only) or the entrywise l_p
norm ||vec Θ||_p for a real p > 1 (lp.py).

m_i = 1 by default; ``margins`` (n,) sets them (the relaxed ATT-SVM of joint (v, p)
training uses 0 for inputs that are not support vectors of the v-SVM). Results are
:class:`SVMResult` with multipliers and support of shape (n, T) (token t of input i;
always 0 / False at t = alpha_i) for the attention SVMs, (n,) for the v-SVM.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attnopt import _validate
from attnopt.maxmargin.lp import check_p, solve_lp
from attnopt.maxmargin.nuclear import solve_nuclear
from attnopt.maxmargin.qp import solve_qp
from attnopt.maxmargin.result import SVMResult
from attnopt.problems.maxmargin import CrossAttention, PromptAttention

NORMS = ("fro", "nuc")


def check_norm(norm, matrix: bool):
    """norm as "fro", "nuc" (only for a ``matrix`` variable) or a float p > 1; ValueError naming norm."""
    if isinstance(norm, str):
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {list(NORMS)} or a real number p > 1, got {norm!r}")
        if norm == "nuc" and not matrix:
            raise ValueError("norm='nuc' needs a matrix variable (the W of a CrossAttention W-SVM), here a vector")
        return norm
    return check_p(norm, "norm")


def check_problem(problem) -> None:
    if not isinstance(problem, (PromptAttention, CrossAttention)):
        raise ValueError(f"problem must be a PromptAttention or a CrossAttention, got {type(problem).__name__}")


def check_alpha(problem, alpha) -> jax.Array:
    """alpha as an int array (n,) with entries in [0, T) (range checked when concrete)."""
    n, T, _ = problem.X.shape
    alpha = jnp.asarray(alpha)
    if not jnp.issubdtype(alpha.dtype, jnp.integer):
        raise ValueError(f"alpha must be an integer array of token indices, got dtype {alpha.dtype}")
    if alpha.shape != (n,):
        raise ValueError(f"alpha must have shape ({n},) (one token per input), got {tuple(alpha.shape)}")
    if _validate.is_concrete(alpha) and not bool(np.all((np.asarray(alpha) >= 0) & (np.asarray(alpha) < T))):
        raise ValueError(f"alpha must hold token indices in [0, {T}), got {np.asarray(alpha).tolist()}")
    return alpha


def check_margins(problem, margins) -> jax.Array:
    n = problem.X.shape[0]
    if margins is None:
        return jnp.ones(n, problem.X.dtype)
    return _validate.nonnegative("margins", _validate.as_array("margins", margins, problem.X.dtype, (n,)))


def selected(X, alpha) -> jax.Array:
    """Rows alpha_i of each X_i: (n, ...) from X (n, T, ...)."""
    return jnp.take_along_axis(X, alpha.reshape((-1,) + (1,) * (X.ndim - 1)), axis=1)[:, 0]


def attention_constraints(problem, alpha):
    """(C (n, T, *shape), mask (n, T)): the constraint of token t of input i is <C_it, Θ> >= m_i, t != alpha_i.

    PromptAttention: C_it = W^T (x_{i,alpha_i} - x_it) (d,). CrossAttention: C_it = (x_{i,alpha_i} - x_it) z_i^T (d, d).
    """
    X = problem.X
    diff = selected(X, alpha)[:, None, :] - X
    if isinstance(problem, PromptAttention):
        C = diff @ problem.W
    else:
        C = diff[..., :, None] * problem.Z[:, None, None, :]
    return C, jnp.arange(X.shape[1]) != alpha[:, None]


def _solve(C, m, mask, norm) -> SVMResult:
    """``min ||Θ|| s.t. <C_k, Θ> >= m_k`` (C (K, *shape), m (K,), mask (K,)) in a checked ``norm``; solution of ``shape``."""
    if norm == "nuc":
        return solve_nuclear(C, m, mask)
    flat = C.reshape(C.shape[0], -1)
    res = solve_qp(flat, m, mask) if norm == "fro" else solve_lp(flat, m, norm, mask)
    return res._replace(solution=res.solution.reshape(C.shape[1:]))


def attention_svm(problem, alpha, margins=None, norm="fro") -> SVMResult:
    """The ATT-SVM on p (PromptAttention) or the W-SVM (CrossAttention) of the selection ``alpha`` (n,).

    ``margins`` (n,) >= 0, default 1. ``norm``: "fro" (Euclidean / Frobenius, native QP),
    "nuc" (nuclear norm of W, CrossAttention only) or a real p > 1 (entrywise ||vec Θ||_p,
    lp.py; multipliers with sign(Θ)|Θ|^{p-1} = sum lambda_it C_it). Solution p (d,) or
    W (d, d); multipliers and support (n, T). Jits and vmaps (over stacked problems and selections).
    """
    check_problem(problem)
    norm = check_norm(norm, isinstance(problem, CrossAttention))
    alpha = check_alpha(problem, alpha)
    margins = check_margins(problem, margins)
    C, mask = attention_constraints(problem, alpha)
    n, T = mask.shape
    m = jnp.broadcast_to(margins[:, None], (n, T)).reshape(-1)
    res = _solve(C.reshape((n * T,) + C.shape[2:]), m, mask.reshape(-1), norm)
    return res._replace(multipliers=res.multipliers.reshape(n, T), support=res.support.reshape(n, T))


def value_svm(problem, alpha, norm="fro") -> SVMResult:
    """The hard-margin v-SVM ``min ||v|| s.t. Y_i x_{i,alpha_i}^T v >= 1`` (no bias); multipliers, support (n,).

    ``norm``: "fro" (Euclidean, native QP) or a real p > 1 (||v||_p, lp.py).
    """
    check_problem(problem)
    norm = check_norm(norm, False)
    alpha = check_alpha(problem, alpha)
    C = problem.Y[:, None] * selected(problem.X, alpha)
    return _solve(C, jnp.ones_like(problem.Y), None, norm)
