"""Structured linear operators: diagonal plus low rank, dense matrices and Kronecker products.

:class:`DenseOperator` and :class:`KroneckerOperator` share one interface
(``shape``, ``in_shape``, ``out_shape``, ``mv``, ``rmv``, ``sandwich``,
``sandwich_mv``, ``as_matrix``), so a problem written against it serves both.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from attnopt import _validate


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
        return self.diag * v + self.U @ (self.M @ (v @ self.U))

    def as_matrix(self) -> jax.Array:
        """Dense (n, n) matrix (for tests and small n)."""
        return jnp.diag(self.diag) + self.U @ self.M @ self.U.T

    def sandwich(self, A: jax.Array) -> jax.Array:
        """``A^T B A`` for A (n, d) in O(n d^2): one ``A^T diag(.) A`` product plus a rank-k term."""
        return (A.T * self.diag) @ A + self.low_rank_sandwich(A)

    def low_rank_sandwich(self, A: jax.Array) -> jax.Array:
        """``(A^T U) M (A^T U)^T``, the low-rank part of :meth:`sandwich`, (d, d) in O(n d k)."""
        UA = self.U.T @ A
        return UA.T @ self.M @ UA

    def add_diag(self, extra: jax.Array) -> "DiagPlusLowRank":
        return self._replace(diag=self.diag + extra)


def symmetric_rank2(u: jax.Array, w: jax.Array, gamma: jax.Array, scale=1.0):
    """U, M with ``U M U^T = scale * (gamma u u^T - u w^T - w u^T)``; u, w (n,)."""
    one = jnp.ones_like(gamma)
    M = scale * jnp.stack([jnp.stack([gamma, -one]), jnp.stack([-one, 0 * one])])
    return jnp.stack([u, w], axis=-1), M


class DenseOperator(NamedTuple):
    """A dense matrix ``A`` (m, d) with the interface of :class:`KroneckerOperator`.

    ``mv`` maps x (d,) to ``A x`` (m,). Products with ``A^T`` are written
    ``y @ A``: a plain gemv on row-major A, where ``A.T @ y`` made XLA
    copy-transpose A (up to 5x slower). A stack of operators is batched with
    ``jax.vmap``.
    """

    A: jax.Array

    @property
    def shape(self) -> tuple[int, int]:
        """(m, d), the shape of A."""
        return self.A.shape[-2:]

    @property
    def in_shape(self) -> tuple[int]:
        """(d,), the shape of the input of ``mv``."""
        return self.A.shape[-1:]

    @property
    def out_shape(self) -> tuple[int]:
        """(m,), the shape of the output of ``mv``."""
        return self.A.shape[-2:-1]

    def mv(self, x: jax.Array) -> jax.Array:
        """``A x`` for x (d,), (m,)."""
        _validate.params_shape("x", x, self.in_shape)
        return self.A @ x

    def rmv(self, y: jax.Array) -> jax.Array:
        """``A^T y`` for y (m,), computed as ``y @ A``, (d,)."""
        _validate.params_shape("y", y, self.out_shape)
        return y @ self.A

    def as_matrix(self) -> jax.Array:
        """A itself, (m, d)."""
        return self.A

    def sandwich(self, B: DiagPlusLowRank) -> jax.Array:
        """``A^T B A`` (d, d) for B (m, m) diagonal plus low rank, in O(m d^2) (:meth:`DiagPlusLowRank.sandwich`)."""
        _validate.params_shape("B.diag", B.diag, self.out_shape)
        return B.sandwich(self.A)

    def sandwich_mv(self, B: DiagPlusLowRank, x: jax.Array) -> jax.Array:
        """``A^T B A x`` for x (d,), in O(m (d + k)) without forming the matrix."""
        _validate.params_shape("B.diag", B.diag, self.out_shape)
        return self.rmv(B.mv(self.mv(x)))


class KroneckerOperator(NamedTuple):
    """``K = A1 ⊗ A2`` acting on row-major vectorised matrices, never formed.

    Shapes: A1 (m1, d1), A2 (m2, d2); K is (m1*m2, d1*d2) and, with row-major
    vec (``X.reshape(-1)``),

        K vec(X)   = vec(A1 X A2^T)      X (d1, d2) -> (m1, m2)
        K^T vec(Y) = vec(A1^T Y A2)      Y (m1, m2) -> (d1, d2)

    Row block j of K (rows j*m2 ... j*m2 + m2 - 1) is ``a1_j^T ⊗ A2``: it maps
    vec(X) to row j of ``A1 X A2^T``. Like :class:`DiagPlusLowRank` it is a
    NamedTuple of arrays, so a stack of operators is batched with ``jax.vmap``.
    """

    A1: jax.Array
    A2: jax.Array

    @property
    def shape(self) -> tuple[int, int]:
        """(m1*m2, d1*d2), the shape of the dense matrix."""
        (m1, d1), (m2, d2) = self.A1.shape[-2:], self.A2.shape[-2:]
        return m1 * m2, d1 * d2

    @property
    def in_shape(self) -> tuple[int, int]:
        """(d1, d2), the matrix shape of the input of ``mv``."""
        return self.A1.shape[-1], self.A2.shape[-1]

    @property
    def out_shape(self) -> tuple[int, int]:
        """(m1, m2), the matrix shape of the output of ``mv``."""
        return self.A1.shape[-2], self.A2.shape[-2]

    @property
    def T(self) -> "KroneckerOperator":
        """The transpose ``A1^T ⊗ A2^T``."""
        return KroneckerOperator(self.A1.T, self.A2.T)

    def mv(self, x: jax.Array) -> jax.Array:
        """``K x``: x is vec(X) (d1*d2,) or X (d1, d2); returns the same form, (m1*m2,) or (m1, m2).

        Costs O(m1 d1 d2 + m1 m2 d2) instead of O(m1 m2 d1 d2).
        """
        X = _as_matrix("x", x, self.in_shape)
        Y = self.A1 @ X @ self.A2.T
        return Y if x.ndim == 2 else Y.reshape(-1)

    def rmv(self, y: jax.Array) -> jax.Array:
        """``K^T y``: y is vec(Y) (m1*m2,) or Y (m1, m2); returns vec(A1^T Y A2) or A1^T Y A2."""
        return self.T.mv(y)

    def as_matrix(self) -> jax.Array:
        """The dense (m1*m2, d1*d2) matrix ``kron(A1, A2)`` (for tests and small sizes)."""
        return jnp.kron(self.A1, self.A2)

    def sandwich(self, B: DiagPlusLowRank, row_block: int = 512) -> jax.Array:
        """``K^T blockdiag(B_1, ..., B_m1) K`` as a dense (d1*d2, d1*d2) matrix, row-major order.

        B holds one symmetric (m2, m2) block per row block of K, stacked:
        ``diag`` (m1, m2), ``U`` (m1, m2, k), ``M`` (m1, k, k). Since row block
        j of K is ``a1_j^T ⊗ A2``,

            K^T blockdiag(B) K = sum_j (a1_j a1_j^T) ⊗ (A2^T B_j A2),

        assembled with matrix products as ``K1^T S`` where row j of K1 (m1, d1^2)
        is vec(a1_j a1_j^T) and row j of S (m1, d2^2) is vec(A2^T B_j A2), then
        reordered from (d1, d1, d2, d2) to (d1, d2, d1, d2) axes. The diagonal
        parts of all blocks are one product ``diag @ K2`` (K2 like K1, for A2),
        the low-rank parts k products ``U[:, :, r] @ A2``.
        Cost O(m1 m2 d2 (d2 + k) + m1 k^2 d2^2 + m1 d1^2 d2^2); the dense
        ``K^T B K`` would cost O(m1 m2^2 d1 d2 + m1 m2 d1^2 d2^2) and
        O(m1 m2 d1 d2) memory.

        The sum over j runs in a ``lax.scan`` over ``row_block`` rows of A1 at a
        time (zero-padded): each block is two plain GEMMs on materialised
        operands. Memory: O(m1 d2^2) for the low-rank rows, O(row_block (m2 + d1^2 +
        d2^2)) per block, and the (d1 d2)^2 result.
        """
        (m1, d1), (m2, d2) = self.A1.shape, self.A2.shape
        _validate.params_shape("B.diag", B.diag, self.out_shape)
        K2 = (self.A2[:, :, None] * self.A2[:, None, :]).reshape(m2, d2 * d2)
        P = jnp.stack([u @ self.A2 for u in _columns(B.U)], axis=-1)  # A2^T U_j, (m1, d2, k)
        low_rank = jnp.einsum("jar,jrs,jbs->jab", P, B.M, P).reshape(m1, d2 * d2)
        size = min(m1, row_block)
        blocks = -(-m1 // size)
        pad = lambda x: jnp.pad(x, [(0, blocks * size - m1)] + [(0, 0)] * (x.ndim - 1))
        split = lambda x: pad(x).reshape(blocks, size, *x.shape[1:])

        def add_block(H, block):
            a1, diag, low = block
            K1T = (a1.T[:, None, :] * a1.T[None, :, :]).reshape(d1 * d1, size)
            return H + K1T @ (diag @ K2 + low), None

        H0 = jnp.zeros((d1 * d1, d2 * d2), B.diag.dtype)
        H, _ = jax.lax.scan(add_block, H0, (split(self.A1), split(B.diag), split(low_rank)))
        return H.reshape(d1, d1, d2, d2).transpose(0, 2, 1, 3).reshape(d1 * d2, d1 * d2)

    def sandwich_mv(self, B: DiagPlusLowRank, x: jax.Array) -> jax.Array:
        """``K^T blockdiag(B_1, ..., B_m1) K x`` for x as in :meth:`mv`, without forming the matrix.

        B as in :meth:`sandwich`. Row j of ``Z = K x`` (m1, m2) is multiplied
        by B_j, then mapped back with ``K^T``: O(m1 m2 (d + k)). The k low-rank
        columns are applied one at a time (unrolled: meant for small k), which
        keeps every step an elementwise product or a row sum.
        """
        _validate.params_shape("B.diag", B.diag, self.out_shape)
        Z = self.mv(x)
        V = Z.reshape(self.out_shape)
        cols = _columns(B.U)
        w = jnp.stack([jnp.sum(u * V, axis=-1) for u in cols], axis=-1)  # U_j^T v_j, (m1, k)
        Mw = jnp.einsum("jrs,js->jr", B.M, w)
        BV = B.diag * V + sum(u * Mw[:, r, None] for r, u in enumerate(cols))
        return self.rmv(BV.reshape(Z.shape))


def _columns(U: jax.Array) -> list[jax.Array]:
    """The k slices ``U[..., r]``."""
    return [U[..., r] for r in range(U.shape[-1])]


def _as_matrix(name: str, x: jax.Array, shape: tuple[int, int]) -> jax.Array:
    """x (rows*cols,) or (rows, cols) as a (rows, cols) matrix; ValueError otherwise."""
    rows, cols = shape
    if x.shape == (rows * cols,):
        return x.reshape(rows, cols)
    if x.shape == (rows, cols):
        return x
    raise ValueError(f"{name} must have shape ({rows * cols},) or ({rows}, {cols}), got {x.shape}")
