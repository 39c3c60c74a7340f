"""Matrix ("tensor trick") regression: a link loss on every row of ``Z = A1 X A2^T``.

Shapes: A1 (n1, d1), A2 (n2, d2), B (n1, n2), X (d1, d2) (the papers take
n1 = n2 = n, d1 = d2 = d). Row j of Z is ``A_j vec(X)`` with
``A_j = a1_j^T ⊗ A2``, the j-th row block of the never-formed Kronecker
operator ``K = A1 ⊗ A2`` (row-major vec, see :class:`KroneckerOperator`), so
the problem is n1 vector link regressions sharing X
(docs/math.md, Matrix (tensor-trick) regression):

    L(X) = sum_j ell(z_j; b_j) + 1/2 ||W∘Z||_F^2 + λ/2 ||X||_F^2

with ell a link of :mod:`attnopt.problems.links` applied row by row, W the
nonnegative ``reg`` (a scalar or (n1, n2)) and λ the ``ridge``. The papers write
the squared norms without the factor 1/2; attnopt keeps it. Derivatives:

    grad    = A1^T G A2 + λ X,   row j of G = ∇ell(z_j) + w_j^2∘z_j        O(n1 n2 d)
    hvp     = A1^T D A2 + λ V,   row j of D = B_j (row j of A1 V A2^T)       O(n1 n2 d)
    hessian = sum_j (a1_j a1_j^T) ⊗ (A2^T B_j A2) + λ I                      O(n^2 d^2 + n d^4)

where ``B_j = ∇^2 ell(z_j) + diag(w_j^2)`` is diagonal plus rank 2; the
Hessian is (d1*d2, d1*d2) in row-major order, assembled by
:meth:`KroneckerOperator.sandwich` without forming the n1 n2 x d1 d2 operator.
Where the link leaves its domain in any row, every method returns NaN. The
implementation is :class:`attnopt.problems.regression.OperatorRegression` with
K = A1 ⊗ A2 and the link vmapped over the rows of Z.
"""
from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp

from attnopt import _validate
from attnopt.operators import KroneckerOperator
from attnopt.problems.links import RescaledLink, SoftmaxLink
from attnopt.problems.registry import Instance, conditioned_matrix, noisy, register
from attnopt.problems.regression import LinkByName, OperatorRegression


class MatrixLinkRegression(OperatorRegression):
    """Matrix link regression, K = A1 ⊗ A2: X (d1, d2), Z = A1 X A2^T (n1, n2); subclasses fix the static ``link``."""

    leaves: ClassVar = ("A1", "A2", "B", "reg", "ridge")
    names: ClassVar = ("X", "V")

    def __init__(self, A1, A2, B, reg=0.0, ridge=0.0, *, link):
        dtype = _validate.float_dtype(A1=A1, A2=A2, B=B)
        A1 = _validate.as_array("A1", A1, dtype, (None, None))
        A2 = _validate.as_array("A2", A2, dtype, (None, None))
        shape = (A1.shape[0], A2.shape[0])
        self._set(A1=A1, A2=A2, B=_validate.as_array("B (rows of A1 x rows of A2)", B, dtype, shape))
        self._set_regularisers(dtype, reg, ridge, link)

    @property
    def operator(self) -> KroneckerOperator:
        """K = A1 ⊗ A2: maps X (d1, d2) to the logits Z = A1 X A2^T (n1, n2)."""
        return KroneckerOperator(self.A1, self.A2)

    @property
    def target(self) -> jax.Array:
        """B (n1, n2), one target row per row of Z."""
        return self.B


class MatrixSoftmaxRegression(MatrixLinkRegression):
    """``1/2 ||row_softmax(A1 X A2^T) - B||_F^2 + 1/2 ||W∘(A1 X A2^T)||_F^2 + λ/2 ||X||_F^2``.

    Args:
      A1: (n1, d1); A2: (n2, d2); B: (n1, n2) target (rows typically on the simplex).
      reg: W, a nonnegative scalar or (n1, n2) matrix.
      ridge: λ >= 0.
    """

    def __init__(self, A1, A2, B, reg=0.0, ridge=0.0):
        super().__init__(A1, A2, B, reg, ridge, link=SoftmaxLink())


class MatrixRescaledRegression(LinkByName, MatrixLinkRegression):
    """``1/2 ||E - rowsum(E)∘B||_F^2 + regularisers``, E = φ(A1 X A2^T) entrywise.

    For φ = exp (the default) the gradient is ``A1^T (E∘Q) A2`` with
    ``C = E - rowsum(E)∘B``, ``Q = C - rowsum(B∘C)``
    (docs/math.md, Matrix (tensor-trick) regression): the rescaled link
    (docs/math.md, Rescaled regression) on every row.

    Args:
      A1, A2, B, reg, ridge: as in :class:`MatrixSoftmaxRegression`.
      link: "exp", "cosh" or "sinh" (φ). Without a regulariser the problem is
        not well posed (L -> 0 as E -> 0); where φ overflows in some row every
        method returns NaN.
    """

    def __init__(self, A1, A2, B, reg=0.0, ridge=0.0, *, link="exp"):
        super().__init__(A1, A2, B, reg, ridge, link=RescaledLink(link))


def _planted(key, n, d, cond, scale, noise, dtype):
    """A1, A2 (n, d) of condition number ``cond``, a planted X* (d, d) with O(scale) logits, and the
    function that applies the multiplicative ``noise`` to a target; checks the options (ValueError naming one)."""
    _validate.generator_options(n=n, d=d, cond=cond, scale=scale, noise=noise, dtype=dtype)
    _validate.at_most("d", d, "n", n)
    k_p, k_n = jax.random.split(key)
    k1, k2, kx = jax.random.split(k_p, 3)
    A1 = conditioned_matrix(k1, n, d, cond, dtype)
    A2 = conditioned_matrix(k2, n, d, cond, dtype)
    return A1, A2, scale * jax.random.normal(kx, (d, d), dtype) / d, lambda target: noisy(k_n, target, noise)


@register("matrix_softmax")
def matrix_softmax_instance(key, n=8, d=3, cond=1.0, reg=0.0, ridge=0.0, noise=0.0, scale=1.0, dtype="float64"):
    """MatrixSoftmaxRegression with B = row_softmax(A1 X* A2^T) (times multiplicative noise), X0 = 0."""
    A1, A2, X_star, add_noise = _planted(key, n, d, cond, scale, noise, dtype)
    B = add_noise(jax.nn.softmax(A1 @ X_star @ A2.T, axis=-1))
    return Instance(MatrixSoftmaxRegression(A1, A2, B, reg, ridge), jnp.zeros((d, d), dtype), X_star)


@register("matrix_rescaled")
def matrix_rescaled_instance(key, n=8, d=3, cond=1.0, reg=0.1, ridge=0.0, noise=0.0, scale=1.0, dtype="float64"):
    """MatrixRescaledRegression (exp) with B = E*/rowsum(E*), E* = exp(A1 X* A2^T) (noisy), X0 = 0."""
    A1, A2, X_star, add_noise = _planted(key, n, d, cond, scale, noise, dtype)
    E = jnp.exp(A1 @ X_star @ A2.T)
    B = add_noise(E / jnp.sum(E, axis=-1, keepdims=True))
    return Instance(MatrixRescaledRegression(A1, A2, B, reg, ridge), jnp.zeros((d, d), dtype), X_star)
