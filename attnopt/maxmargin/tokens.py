"""Token selection: optimal, selected and locally optimal tokens; alignment and numerical rank.

Token scores gamma_it = Y_i x_it^T v; the optimal token of input i is opt_i = argmax_t gamma_it.
A selection alpha with a feasible SVM solution is locally optimal when every input
scores its selected token strictly above each of its support tokens (the t whose
SVM constraint is active): gamma_{i,alpha_i} > gamma_it. The global selection
alpha = opt is locally optimal whenever its SVM is feasible; others may be too.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from attnopt import _validate
from attnopt.maxmargin.svm import attention_svm, check_alpha, check_problem, selected


def token_scores(problem, v=None) -> jax.Array:
    """gamma (n, T), gamma_it = Y_i x_it^T v; v (d,) defaults to the problem's fixed readout."""
    check_problem(problem)
    d = problem.X.shape[-1]
    if v is None:
        if problem.trains_v:
            raise ValueError(f"v is required: the problem trains v (trainable={problem.trainable!r})")
        v = problem.v
    v = _validate.as_array(f"v (X has {d} features)", v, problem.X.dtype, (d,))
    return problem.Y[:, None] * (problem.X @ v)


def optimal_tokens(problem, v=None) -> jax.Array:
    """opt (n,) int: argmax_t gamma_it (the first on ties)."""
    return jnp.argmax(token_scores(problem, v), axis=-1)


def selected_tokens(problem, params) -> jax.Array:
    """(n,) int: the token of largest softmax probability (largest score) of each input at ``params``."""
    check_problem(problem)
    return jnp.argmax(problem.scores(params), axis=-1)


def is_locally_optimal(problem, alpha, margins=None, v=None, norm: str = "fro") -> jax.Array:
    """Bool (): the SVM of ``alpha`` (:func:`attention_svm` with ``margins``, ``norm``) is feasible and
    gamma_{i,alpha_i} > gamma_it for every support token t of every input i (gamma from ``v``)."""
    alpha = check_alpha(problem, alpha)
    gamma = token_scores(problem, v)
    res = attention_svm(problem, alpha, margins, norm)
    beaten = selected(gamma, alpha)[:, None] > gamma
    return res.feasible & jnp.all(beaten | ~res.support)


def alignment(a, b) -> jax.Array:
    """Cosine <a, b> / (||a|| ||b||) of two arrays or pytrees of one structure, flattened; NaN if either is 0."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    if jax.tree.structure(a) != jax.tree.structure(b) or any(x.shape != y.shape for x, y in zip(la, lb)):
        raise ValueError("a and b must have one structure and shapes")
    dot = sum(jnp.vdot(x, y) for x, y in zip(la, lb))
    na = jnp.sqrt(sum(jnp.vdot(x, x) for x in la))
    nb = jnp.sqrt(sum(jnp.vdot(y, y) for y in lb))
    return jnp.where((na > 0) & (nb > 0), dot / (na * nb), jnp.nan)


def numerical_rank(W, rtol=None) -> jax.Array:
    """Int (): the number of singular values of W (..., d1, d2) above rtol times the largest.

    rtol defaults to sqrt(eps) of W's dtype; -1 when W has a non-finite entry (an infeasible SVM).
    """
    W = jnp.asarray(W)
    if W.ndim < 2:
        raise ValueError(f"W must be a matrix, got shape {tuple(W.shape)}")
    if not jnp.issubdtype(W.dtype, jnp.floating):
        W = W.astype(_validate.float_dtype(W))
    if rtol is None:
        rtol = jnp.sqrt(jnp.finfo(W.dtype).eps)
    elif _validate.is_concrete(rtol) and not 0 <= float(rtol) < 1:
        raise ValueError(f"rtol must be in [0, 1), got {float(rtol)}")
    s = jnp.linalg.svd(jnp.nan_to_num(W), compute_uv=False)
    rank = jnp.sum(s > rtol * s[..., :1], axis=-1)
    return jnp.where(jnp.all(jnp.isfinite(W), axis=(-2, -1)), rank, -1)
