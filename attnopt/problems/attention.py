"""Single-layer attention regression ``L(X, Y) = 1/2 ||row_softmax(A1 X A2^T) A3 Y - B||_F^2``.

Shapes: A1 (n, d1) queries, A2 (n2, d2) keys, A3 (n2, d3) values, B (n, m)
target; params X (d1, d2) (plays Q K^T) and Y (d3, m) (plays V). The papers
take all of A1, A2, A3, B (n, d) and X, Y (d, d), and write the squared norm
without the factor 1/2; attnopt keeps it. With
(docs/math.md, Attention regression L(X, Y))

    F = row_softmax(A1 X A2^T) (n, n2),  P = F A3,  H = A3 Y,  C = F H - B,  Q = C H^T
    S(M) = F∘M - rowsum(F∘M)∘F   (each row's softmax Jacobian S_j = diag(f_j) - f_j f_j^T applied to M)

the derivatives are

    grad_X = A1^T S(Q) A2,   grad_Y = P^T C
    HVP in (V, W): dF = S(A1 V A2^T), dH = A3 W, dC = dF H + F dH, dQ = dC H^T + C dH^T,
      dgrad_X = A1^T [S(dQ) + dF∘Q - rowsum(dF∘Q)∘F - rowsum(F∘Q)∘dF] A2
      dgrad_Y = A3^T (dF^T C + F^T dC)

and the Hessian (see :meth:`AttentionRegression.hessian` for its layout) has
blocks

    XX = sum_j (a1_j a1_j^T) ⊗ (A2^T B_j A2),
         B_j = S_j H H^T S_j + diag(q∘f - s f) - (q∘f) f^T - f (q∘f)^T + 2 s f f^T
         (f, q rows j of F and Q, s = <q, f>)
    XY[(a, b), (c, e)] = sum_j A1[j, a] (P[j, c] (A2^T S_j H)[b, e] + C[j, e] (A2^T S_j A3)[b, c])
    YY = P^T P ⊗ I_m

each assembled with matrix products in O(n n2 d^2 + n d^4), never forming a
Kronecker product. L is an exact quadratic in Y: :meth:`AttentionRegression.solve_y`
gives its minimiser, the least-squares solution of ``P Y = B``.
"""
from __future__ import annotations

from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from attnopt import _validate
from attnopt.operators import DiagPlusLowRank, KroneckerOperator, symmetric_rank2
from attnopt.problems.base import Problem
from attnopt.problems.registry import Instance, conditioned_matrix, register


class AttentionParams(NamedTuple):
    """The parameters ``(X, Y)`` of :class:`AttentionRegression`; a plain tuple works too."""

    X: jax.Array
    Y: jax.Array


def softmax_jvp(F: jax.Array, M: jax.Array) -> jax.Array:
    """``F∘M - rowsum(F∘M)∘F``: each row's softmax Jacobian ``diag(f) - f f^T`` applied to the row of M."""
    FM = F * M
    return FM - jnp.sum(FM, axis=-1, keepdims=True) * F


def softmax_jacobians_times(F: jax.Array, M: jax.Array) -> jax.Array:
    """``S_j M`` for every row j of F (n, n2) and M (n2, k): (n, n2, k), ``S_j = diag(f_j) - f_j f_j^T``."""
    return F[:, :, None] * (M[None] - (F @ M)[:, None, :])


class AttentionRegression(Problem):
    """``L(X, Y) = 1/2 ||row_softmax(A1 X A2^T) A3 Y - B||_F^2``.

    Args:
      A1: (n, d1) query inputs.
      A2: (n2, d2) key inputs.
      A3: (n2, d3) value inputs (same rows as A2).
      B: (n, m) target.

    Params: a pair ``(X, Y)`` with X (d1, d2), Y (d3, m), as an
    :class:`AttentionParams` or a plain tuple; ``grad`` and ``hvp`` return the
    same structure.
    """

    leaves: ClassVar = ("A1", "A2", "A3", "B")
    lower_bound: ClassVar = 0.0  # a sum of squares

    def __init__(self, A1, A2, A3, B):
        dtype = _validate.float_dtype(A1=A1, A2=A2, A3=A3, B=B)
        A1 = _validate.as_array("A1", A1, dtype, (None, None))
        A2 = _validate.as_array("A2", A2, dtype, (None, None))
        n, n2 = A1.shape[0], A2.shape[0]
        self._set(
            A1=A1,
            A2=A2,
            A3=_validate.as_array(f"A3 (A2 has {n2} rows)", A3, dtype, (n2, None)),
            B=_validate.as_array(f"B (A1 has {n} rows)", B, dtype, (n, None)),
        )

    @property
    def operator(self) -> KroneckerOperator:
        """``A1 ⊗ A2``: maps X to the logits ``A1 X A2^T``."""
        return KroneckerOperator(self.A1, self.A2)

    @property
    def params_shape(self) -> AttentionParams:
        """The shapes ``((d1, d2), (d3, m))`` of X and Y."""
        return AttentionParams(self.operator.in_shape, (self.A3.shape[1], self.B.shape[1]))

    def split_params(self, params, name="params"):
        """(X, Y) from a pair, shape-checked, and a function rebuilding params' structure."""
        leaves, treedef = jax.tree.flatten(params)
        if len(leaves) != 2:
            raise ValueError(f"{name} must be a pair (X, Y), got a pytree with {len(leaves)} leaves")
        shapes = self.params_shape
        _validate.params_shape(f"{name}[0] (X)", leaves[0], shapes.X)
        _validate.params_shape(f"{name}[1] (Y)", leaves[1], shapes.Y)
        return leaves[0], leaves[1], lambda X, Y: jax.tree.unflatten(treedef, [X, Y])

    def softmax(self, X) -> jax.Array:
        """``F = row_softmax(A1 X A2^T)``, (n, n2)."""
        return jax.nn.softmax(self.operator.mv(X), axis=-1)

    def _forward(self, X, Y):
        F = self.softmax(X)
        H = self.A3 @ Y
        return F, H, F @ H - self.B

    @jax.jit
    def loss(self, params):
        """Scalar loss ``1/2 ||F A3 Y - B||_F^2``."""
        X, Y, _ = self.split_params(params)
        _, _, C = self._forward(X, Y)
        return 0.5 * jnp.sum(C * C)

    @jax.jit
    def grad(self, params):
        """Gradient, like params: ``(A1^T S(C H^T) A2, (F A3)^T C)``."""
        X, Y, like = self.split_params(params)
        F, H, C = self._forward(X, Y)
        return like(self.operator.rmv(softmax_jvp(F, C @ H.T)), self.A3.T @ (F.T @ C))

    @jax.jit
    def hvp(self, params, v):
        """Hessian-vector product in direction v = (V, W), like params, O(n n2 d)."""
        X, Y, like = self.split_params(params)
        V, W, _ = self.split_params(v, "v")
        F, H, C = self._forward(X, Y)
        Q = C @ H.T
        dF = softmax_jvp(F, self.operator.mv(V))
        dH = self.A3 @ W
        dC = dF @ H + F @ dH
        dQ = dC @ H.T + C @ dH.T
        dFQ = dF * Q
        dG = (
            softmax_jvp(F, dQ)
            + dFQ
            - jnp.sum(dFQ, axis=-1, keepdims=True) * F
            - jnp.sum(F * Q, axis=-1, keepdims=True) * dF
        )
        return like(self.operator.rmv(dG), self.A3.T @ (dF.T @ C + F.T @ dC))

    @staticmethod
    def _x_curvature(F, Q, SH) -> DiagPlusLowRank:
        """Per-row z-Hessians B_j of the X block from F, Q = C H^T and SH[j] = S_j H, stacked:
        diag (n, n2), U (n, n2, m + 2) = [S_j H, f, q∘f], M (n, m + 2, m + 2)."""
        s = jnp.sum(F * Q, axis=-1)
        U2, M2 = jax.vmap(symmetric_rank2)(F, Q * F, 2 * s)  # 2 s f f^T - f (q∘f)^T - (q∘f) f^T
        m = SH.shape[-1]
        eye = jnp.broadcast_to(jnp.eye(m, dtype=SH.dtype), (F.shape[0], m, m))
        return DiagPlusLowRank(
            Q * F - s[:, None] * F,
            jnp.concatenate([SH, U2], axis=-1),
            jax.vmap(jax.scipy.linalg.block_diag)(eye, M2),
        )

    @jax.jit
    def hessian_x(self, params):
        """The XX block (d1*d2, d1*d2) of the Hessian, row-major vec of X, O(n n2 d^2 + n d^4)."""
        X, Y, _ = self.split_params(params)
        F, H, C = self._forward(X, Y)
        return self.operator.sandwich(self._x_curvature(F, C @ H.T, softmax_jacobians_times(F, H)))

    @jax.jit
    def hessian(self, params):
        """Hessian (d1*d2 + d3*m, d1*d2 + d3*m) in ``ravel_pytree`` order of (X, Y).

        Layout ``[[XX, XY], [XY^T, YY]]``: the first d1*d2 rows and columns are
        X, the last d3*m are Y, each block row-major (``X.reshape(-1)``,
        ``Y.reshape(-1)``). YY = ``(F A3)^T (F A3) ⊗ I_m``.
        """
        X, Y, _ = self.split_params(params)
        F, H, C = self._forward(X, Y)
        P = F @ self.A3
        SH = softmax_jacobians_times(F, H)
        XX = self.operator.sandwich(self._x_curvature(F, C @ H.T, SH))
        SA3 = softmax_jacobians_times(F, self.A3)
        A2SH = jnp.einsum("kb,jke->jbe", self.A2, SH)
        A2SA3 = jnp.einsum("kb,jkc->jbc", self.A2, SA3)
        XY = jnp.einsum("ja,jc,jbe->abce", self.A1, P, A2SH) + jnp.einsum("ja,je,jbc->abce", self.A1, C, A2SA3)
        XY = XY.reshape(XX.shape[0], -1)
        YY = jnp.kron(P.T @ P, jnp.eye(self.B.shape[1], dtype=P.dtype))
        return jnp.block([[XX, XY], [XY.T, YY]])

    @jax.jit
    def solve_y(self, X):
        """``argmin_Y L(X, Y)``: the minimum-norm least-squares solution of ``(F A3) Y = B``, (d3, m)."""
        _validate.params_shape("X", X, self.params_shape.X)
        return jnp.linalg.lstsq(self.softmax(X) @ self.A3, self.B)[0]


@register("attention")
def attention_instance(
    key, n=8, d=3, cond=1.0, noise=0.0, scale=1.0, start="zeros", start_noise=0.1, dtype="float64"
):
    """AttentionRegression with a planted (X*, Y*): B = row_softmax(A1 X* A2^T) A3 Y* + noise.

    A1, A2, A3 (n, d) have condition number ``cond``; X* (d, d) gives logits
    of size about ``scale``; Y* (d, d) gives O(1) outputs; the noise is
    Gaussian with standard deviation ``noise`` times the RMS of the clean B.
    The start is (0, 0) for ``start="zeros"``, or for ``start="near"``
    (X* + start_noise * RMS(X*) * N(0, 1), 0), a local start (the loss has
    spurious local minima, which solvers from (0, 0) often find).
    """
    if start not in ("zeros", "near"):
        raise ValueError(f"start must be 'zeros' or 'near', got {start!r}")
    k1, k2, k3, kx, ky, kn, ks = jax.random.split(key, 7)
    A1, A2, A3 = (conditioned_matrix(k, n, d, cond, dtype) for k in (k1, k2, k3))
    X_star = scale * jax.random.normal(kx, (d, d), dtype) / d
    Y_star = jax.random.normal(ky, (d, d), dtype) / jnp.sqrt(d).astype(dtype)
    clean = jax.nn.softmax(A1 @ X_star @ A2.T, axis=-1) @ A3 @ Y_star
    B = clean + noise * _rms(clean) * jax.random.normal(kn, clean.shape, dtype)
    zeros = jnp.zeros((d, d), dtype)
    X0 = zeros if start == "zeros" else X_star + start_noise * _rms(X_star) * jax.random.normal(ks, (d, d), dtype)
    return Instance(AttentionRegression(A1, A2, A3, B), AttentionParams(X0, zeros), AttentionParams(X_star, Y_star))


def _rms(x):
    return jnp.sqrt(jnp.mean(x * x))
