"""Link regressions ``min_x sum_rows ell(z_j; t_j) + 1/2 ||w∘Z||^2 + λ/2 ||x||^2`` with ``Z = K x``.

One implementation, :class:`OperatorRegression`, serves every problem of this
form, parametrised by the linear operator K (``attnopt.operators``: the same
``mv``, ``rmv``, ``sandwich``, ``sandwich_mv`` interface for both):

- the vector problems here (:class:`LinkRegression`): K = A (n, d), x (d,),
  Z = A x (n,) is one row, target b (n,), ``reg`` w a scalar or (n,);
- the matrix problems (:mod:`attnopt.problems.matrix`): K = A1 ⊗ A2, X (d1, d2),
  Z = A1 X A2^T (n1, n2), the link applied to each row (vmapped).

``ridge`` λ is a scalar. The papers write the squared norms without the factor
1/2; attnopt keeps it. All derivatives are the structured, hand-derived formulas
(docs/math.md, Softmax regression), (docs/math.md, Rescaled regression) and
(docs/math.md, Softmax + ResNet regression):

    grad    = K^T (∇ell(Z) + w^2∘Z) + λ x                              O(nd)
    hvp     = K^T B K v + λ v                                           O(nd)
    hessian = K^T B K + λ I,  B = blockdiag(diag + rank 2) + diag(w^2)  O(nd^2)

with ∇ell and B per row of Z (B_j = ∇^2 ell(z_j) + diag(w_j^2)); the costs
are for K = A (n, d) (for K = A1 ⊗ A2 see :mod:`attnopt.problems.matrix`).
For K = A, ``K^T y`` is ``y @ A`` and ``K^T B K`` is ``B.sandwich(A)``. Where the link
leaves its domain (see each class) in any row, every method returns NaN.
"""
from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from attnopt import _validate
from attnopt.operators import DenseOperator, DiagPlusLowRank
from attnopt.problems.base import Problem, nan_outside
from attnopt.problems.links import RESCALED_FUNCTIONS, ResNetSoftmaxLink, RescaledLink, SoftmaxLink
from attnopt.problems.registry import Instance, conditioned_matrix, noisy, register


class OperatorRegression(Problem):
    """Shared implementation of the link regressions over a linear operator K.

    A subclass lists its fields, sets the data in ``__init__`` and then calls
    :meth:`_set_regularisers`, and defines ``operator`` (K, mapping params of
    ``in_shape`` to logits Z of ``out_shape``) and ``target`` (like Z). The
    link acts on the last axis of Z, vmapped over any leading (row) axes.
    ``names`` are the params' and directions' names in error messages.
    """

    static: ClassVar = ("link",)
    names: ClassVar = ("x", "v")
    lower_bound: ClassVar = 0.0  # a sum of squares
    link: Any

    def _set_regularisers(self, dtype, reg, ridge, link):
        """Validate and set ``reg`` (a scalar or like Z, stored like Z), ``ridge`` (scalar) and the static ``link``."""
        self._set(
            reg=_validate.weights("reg", reg, dtype, self.operator.out_shape),
            ridge=_validate.scalar("ridge", ridge, dtype),
            link=link,
        )

    @property
    def params_shape(self) -> tuple[int, ...]:
        """The shape of the params, ``operator.in_shape``."""
        return self.operator.in_shape

    def _rows(self, fn):
        """``fn`` of one row of Z, vmapped over Z's leading (row) axes."""
        for _ in self.operator.out_shape[1:]:
            fn = jax.vmap(fn)
        return fn

    def _logits(self, x):
        _validate.params_shape(self.names[0], x, self.params_shape)
        return self.operator.mv(x)

    def _domain(self, Z):
        ok = self._rows(self.link.in_domain)(Z, self.target)
        return None if ok is None else jnp.all(ok)

    def in_domain(self, x) -> jax.Array:
        """Whether the link formulas are defined in every row of Z = K x (bool scalar)."""
        ok = self._domain(self._logits(x))
        return jnp.asarray(True) if ok is None else ok

    @jax.jit
    def loss(self, x):
        """Scalar loss at x: ``sum_j ell(z_j; t_j) + 1/2 ||w∘Z||^2 + λ/2 ||x||^2``."""
        Z = self._logits(x)
        value = (
            jnp.sum(self._rows(self.link.value)(Z, self.target))
            + 0.5 * jnp.sum(self.reg**2 * Z * Z)
            + 0.5 * self.ridge * jnp.sum(x * x)
        )
        return nan_outside(self._domain(Z), value)

    @jax.jit
    def grad(self, x):
        """Gradient, like x: ``K^T G + λ x``, row j of G = ∇ell(z_j) + w_j^2∘z_j."""
        Z = self._logits(x)
        G = self._rows(self.link.grad)(Z, self.target) + self.reg**2 * Z
        return nan_outside(self._domain(Z), self.operator.rmv(G) + self.ridge * x)

    @jax.jit
    def curvature(self, x) -> DiagPlusLowRank:
        """``B = ∇^2 ell + diag(w^2)``, the Hessian of the loss in Z, diagonal plus rank 2 per row.

        One row (vector problems): diag (n,), U (n, 2), M (2, 2); else stacked
        over the rows, e.g. diag (n1, n2), U (n1, n2, 2), M (n1, 2, 2).
        """
        Z = self._logits(x)
        return nan_outside(self._domain(Z), self._rows(self.link.curvature)(Z, self.target).add_diag(self.reg**2))

    @jax.jit
    def gauss_newton_curvature(self, x) -> DiagPlusLowRank:
        """PSD Gauss-Newton model of the Z-Hessian, ``J^T J + diag(w^2)`` per row, laid out like :meth:`curvature`."""
        Z = self._logits(x)
        return nan_outside(self._domain(Z), self._rows(self.link.gauss_newton)(Z, self.target).add_diag(self.reg**2))

    def _apply(self, B: DiagPlusLowRank, v):
        """``K^T B K v + λ v`` for v like x, O(nd)."""
        _validate.params_shape(self.names[1], v, self.params_shape)
        return self.operator.sandwich_mv(B, v) + self.ridge * v

    def _assemble(self, B: DiagPlusLowRank):
        """``K^T B K + λ I`` (N, N), N = size of x, row-major: assembled from B's structure."""
        size = self.operator.shape[1]
        return self.operator.sandwich(B) + self.ridge * jnp.eye(size, dtype=self.dtype)

    def hessian_operator(self, x):
        """``v -> H v`` with B computed once at x: for many HVPs at one point (CG), O(nd) each."""
        B = self.curvature(x)
        return lambda v: self._apply(B, v)

    @jax.jit
    def hvp(self, x, v):
        """Hessian-vector product, like x: ``K^T (B (K v)) + λ v``, O(nd)."""
        return self.hessian_operator(x)(v)

    @jax.jit
    def hessian(self, x):
        """Hessian (N, N), N = size of x, row-major: ``K^T B K + λ I``."""
        return self._assemble(self.curvature(x))

    @jax.jit
    def gauss_newton_hvp(self, x, v):
        """``K^T (J^T J + diag(w^2)) K v + λ v``, like x (always PSD)."""
        return self._apply(self.gauss_newton_curvature(x), v)

    @jax.jit
    def gauss_newton_matrix(self, x):
        """Gauss-Newton matrix (N, N), row-major, PSD."""
        return self._assemble(self.gauss_newton_curvature(x))


class LinkByName:
    """Mixin for problems whose ``__init__`` takes the link by name (``link="exp"``)."""

    def arguments(self) -> dict[str, Any]:
        """The constructor arguments, with the link given by its name."""
        return super().arguments() | {"link": self.link.name}


class LinkRegression(OperatorRegression):
    """Vector link regression, K = A: x (d,), Z = A x (n,); subclasses fix the static ``link``."""

    leaves: ClassVar = ("A", "b", "reg", "ridge")

    def __init__(self, A, b, reg=0.0, ridge=0.0, *, link):
        dtype = _validate.float_dtype(A=A, b=b)
        A = _validate.as_array("A", A, dtype, (None, None))
        n, _ = A.shape
        self._set(A=A, b=_validate.as_array(f"b (A has {n} rows)", b, dtype, (n,)))
        self._set_regularisers(dtype, reg, ridge, link)

    @property
    def operator(self) -> DenseOperator:
        """K = A: maps x (d,) to the logits z = A x (n,)."""
        return DenseOperator(self.A)

    @property
    def target(self) -> jax.Array:
        """b (n,)."""
        return self.b


class SoftmaxRegression(LinkRegression):
    """Softmax regression ``1/2 ||softmax(A x) - b||^2 + 1/2 ||diag(w) A x||^2 + λ/2 ||x||^2``.

    Args:
      A: (n, d) data matrix.
      b: (n,) target.
      reg: w, a nonnegative scalar or (n,) vector.
      ridge: λ >= 0.
    """

    def __init__(self, A, b, reg=0.0, ridge=0.0):
        super().__init__(A, b, reg, ridge, link=SoftmaxLink())


class RescaledRegression(LinkByName, LinkRegression):
    """Rescaled regression ``1/2 ||u - <u, 1> b||^2 + regularisers``, u = φ(A x).

    Args:
      A: (n, d); b: (n,); link: "exp", "cosh" or "sinh" (φ); reg, ridge as in
      :class:`SoftmaxRegression`. Without a regulariser the problem is not well
      posed (L -> 0 as u -> 0). If φ(A x) overflows (|A x| beyond about 88 in
      float32, 709 in float64) every method returns NaN.
    """

    def __init__(self, A, b, link="exp", reg=0.0, ridge=0.0):
        super().__init__(A, b, reg, ridge, link=RescaledLink(link))


class ResNetSoftmaxRegression(LinkRegression):
    """Softmax + ResNet regression ``1/2 ||u / <u, 1> - b||^2 + regularisers``, u = exp(A x) + A x.

    Args as in :class:`SoftmaxRegression`. The normaliser α = <u, 1> can be
    zero or negative (e^z + z < 0 for z < -0.567); where α <= 0 (or overflows)
    every method returns NaN.
    """

    def __init__(self, A, b, reg=0.0, ridge=0.0):
        super().__init__(A, b, reg, ridge, link=ResNetSoftmaxLink())


def _planted(key, n, d, cond, scale, noise, dtype):
    """A (n, d) of condition number ``cond``, a planted x* with O(scale) logits, and the function that
    applies the multiplicative ``noise`` to a target; checks the options (ValueError naming one)."""
    _validate.generator_options(n=n, d=d, cond=cond, scale=scale, noise=noise, dtype=dtype)
    _validate.at_most("d", d, "n", n)
    k_p, k_n = jax.random.split(key)
    k_a, k_x = jax.random.split(k_p)
    A = conditioned_matrix(k_a, n, d, cond, dtype)
    return A, scale * jax.random.normal(k_x, (d,), dtype) / jnp.sqrt(d), lambda target: noisy(k_n, target, noise)


@register("softmax")
def softmax_instance(key, n=16, d=6, cond=1.0, reg=0.0, ridge=0.0, noise=0.0, scale=1.0, dtype="float64"):
    """SoftmaxRegression with b = softmax(A x*) (times multiplicative noise), x0 = 0."""
    A, x_star, add_noise = _planted(key, n, d, cond, scale, noise, dtype)
    b = add_noise(jax.nn.softmax(A @ x_star))
    return Instance(SoftmaxRegression(A, b, reg, ridge), jnp.zeros(d, dtype), x_star)


@register("resnet_softmax")
def resnet_instance(key, n=16, d=6, cond=1.0, reg=0.0, ridge=0.0, noise=0.0, scale=1.0, dtype="float64"):
    """ResNetSoftmaxRegression with b = u*/<u*, 1>, u* = exp(A x*) + A x* (noisy), x0 = 0."""
    A, x_star, add_noise = _planted(key, n, d, cond, scale, noise, dtype)
    u = jnp.exp(A @ x_star) + A @ x_star
    b = add_noise(u / jnp.sum(u))
    return Instance(ResNetSoftmaxRegression(A, b, reg, ridge), jnp.zeros(d, dtype), x_star)


def _rescaled_generator(link):
    def rescaled_instance(key, n=16, d=6, cond=1.0, reg=0.1, ridge=0.0, noise=0.0, scale=1.0, dtype="float64"):
        A, x_star, add_noise = _planted(key, n, d, cond, scale, noise, dtype)
        u = RESCALED_FUNCTIONS[link][0](A @ x_star)
        b = add_noise(u / jnp.sum(u))
        return Instance(RescaledRegression(A, b, link, reg, ridge), jnp.zeros(d, dtype), x_star)

    rescaled_instance.__doc__ = (
        f"RescaledRegression (link {link}) with b = u*/<u*, 1>, u* = {link}(A x*) (noisy), x0 = 0."
    )
    return register(f"rescaled_{link}")(rescaled_instance)


for _link in RESCALED_FUNCTIONS:
    _rescaled_generator(_link)
