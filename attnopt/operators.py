"""Structured linear operators: diagonal plus low rank, and Kronecker products."""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class DiagPlusLowRank(NamedTuple):
    """Symmetric ``B = diag(diag) + U M U^T``.

    Shapes: diag (n,), U (n, k), M (k, k) symmetric. Leading batch axes are
    handled with ``jax.vmap``. The link curvatures of attnopt's problems all
    have this form with k = 2.
    """

    diag: jax.Array
    U: jax.Array
    M: jax.Array

    def mv(self, v: jax.Array) -> jax.Array:
        """``B v`` for v (n,), in O(nk)."""
        return self.diag * v + self.U @ (self.M @ (self.U.T @ v))

    def as_matrix(self) -> jax.Array:
        """Dense (n, n) matrix (for tests and small n)."""
        return jnp.diag(self.diag) + self.U @ self.M @ self.U.T

    def sandwich(self, A: jax.Array) -> jax.Array:
        """``A^T B A`` for A (n, d) in O(n d^2): one ``A^T diag(.) A`` product plus a rank-k term."""
        AU = A.T @ self.U
        return (A.T * self.diag) @ A + AU @ self.M @ AU.T

    def add_diag(self, extra: jax.Array) -> "DiagPlusLowRank":
        return self._replace(diag=self.diag + extra)


def symmetric_rank2(u: jax.Array, w: jax.Array, gamma: jax.Array, scale=1.0):
    """U, M with ``U M U^T = scale * (gamma u u^T - u w^T - w u^T)``; u, w (n,)."""
    one = jnp.ones_like(gamma)
    M = scale * jnp.stack([jnp.stack([gamma, -one]), jnp.stack([-one, 0 * one])])
    return jnp.stack([u, w], axis=-1), M
