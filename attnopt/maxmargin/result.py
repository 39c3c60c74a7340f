"""The result of every max-margin solve, and the argument checks the solvers share."""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from attnopt import _validate


class SVMResult(NamedTuple):
    """A hard-margin problem ``min ||w|| s.t. <c_k, w> >= m_k`` solved (a pytree: it jits and vmaps).

    solution      w in its natural shape (p (d,), W (d, d), v (d,), or (N,) for raw
                  constraints); NaN when ``feasible`` is False.
    objective     the norm minimised: ||w||_2 (||W||_F) or the nuclear norm ||W||_*;
                  NaN when infeasible.
    multipliers   dual variables lambda >= 0, one per constraint (0 where masked out).
                  Feasible: w = sum_k lambda_k c_k (Euclidean norms) or the nuclear-norm
                  dual (sum_k lambda_k c_k has spectral norm 1). Infeasible: a Farkas
                  certificate, lambda >= 0 with m^T lambda = 1 and sum_k lambda_k c_k ~ 0.
    support       bool per constraint: active at the solution (<c_k, w> = m_k to a
                  tolerance relative to |m_k| + ||c_k|| ||w||); all False when infeasible.
    feasible      bool: a w meeting every constraint was found.
    kkt_residual  the largest relative optimality residual of (solution, multipliers)
                  (see each solver); when infeasible the certificate's relative residual
                  ||sum_k lambda_k c_k|| / sum_k lambda_k ||c_k||.
    """

    solution: Any
    objective: jax.Array
    multipliers: jax.Array
    support: jax.Array
    feasible: jax.Array
    kkt_residual: jax.Array


def check_constraints(C, m, mask, c_name: str = "C"):
    """C (K, ...) float, m (K,) and mask (K,) bool (default all True), checked; raises ValueError naming the argument."""
    dtype = _validate.float_dtype(C, m)
    C = jnp.asarray(C, dtype=dtype)
    if C.ndim < 2:
        raise ValueError(f"{c_name} must have a constraint axis and at least one variable axis, got shape {tuple(C.shape)}")
    C = _validate.as_array(c_name, C, dtype, (None,) * C.ndim)
    K = C.shape[0]
    m = _validate.as_array("m", m, dtype, (K,))
    if mask is None:
        mask = jnp.ones(K, dtype=bool)
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_ or mask.shape != (K,):
        raise ValueError(f"mask must be a bool array of shape ({K},), got {mask.dtype}{list(mask.shape)}")
    return C, m, mask


def safe_div(x, y):
    """x / y where y > 0, else x (a residual of a zero-scale problem is absolute)."""
    return x / jnp.where(y > 0, y, 1)
