"""Vector regression problems ``min_x ell(A x; b) + 1/2 ||diag(w) A x||^2 + λ/2 ||x||^2``.

Shapes: A (n, d), b (n,), x (d,); ``reg`` w is a scalar or (n,), ``ridge`` λ a scalar.
The papers write the squared norms without the factor 1/2; attnopt keeps it.
All derivatives are the structured, hand-derived formulas:

    grad    = A^T (∇ell(z) + w^2∘z) + λ x,          z = A x      O(nd)
    hvp     = A^T (B (A v)) + λ v                                   O(nd)
    hessian = A^T B A + λ I,  B = diag(.) + rank 2 + diag(w^2)     O(nd^2)

Where the link leaves its domain (see each class) every method returns NaN.
"""
from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from attnopt import _validate
from attnopt.operators import DiagPlusLowRank
from attnopt.problems.base import Problem, nan_outside
from attnopt.problems.links import RESCALED_FUNCTIONS, ResNetSoftmaxLink, RescaledLink, SoftmaxLink
from attnopt.problems.registry import Instance, conditioned_matrix, noisy, register


class LinkRegression(Problem):
    """Shared implementation; subclasses fix the static ``link``."""

    leaves: ClassVar = ("A", "b", "reg", "ridge")
    static: ClassVar = ("link",)
    link: Any

    def __init__(self, A, b, reg=0.0, ridge=0.0, *, link):
        dtype = _validate.float_dtype(A, b)
        A = _validate.as_array("A", A, dtype, (None, None))
        n, _ = A.shape
        self._set(
            A=A,
            b=_validate.as_array(f"b (A has {n} rows)", b, dtype, (n,)),
            reg=_validate.weights("reg", reg, dtype, (n,)),
            ridge=_validate.scalar("ridge", ridge, dtype),
            link=link,
        )

    @property
    def params_shape(self) -> tuple[int]:
        """(d,), the shape of x."""
        return self.A.shape[-1:]

    def _check_params(self, x):
        _validate.params_shape("x", x, self.params_shape)

    def in_domain(self, x) -> jax.Array:
        """Whether the link formulas are defined at x (bool scalar)."""
        ok = self.link.in_domain(self.A @ x)
        return jnp.asarray(True) if ok is None else ok

    @jax.jit
    def loss(self, x):
        """Scalar loss at x (d,)."""
        self._check_params(x)
        z = self.A @ x
        w2 = self.reg**2
        value = self.link.value(z, self.b) + 0.5 * (w2 @ (z * z)) + 0.5 * self.ridge * (x @ x)
        return nan_outside(self.link.in_domain(z), value)

    @jax.jit
    def grad(self, x):
        """Gradient (d,) at x (d,): ``A^T (∇ell(z) + w^2∘z) + λ x``."""
        self._check_params(x)
        z = self.A @ x
        g = (self.link.grad(z, self.b) + self.reg**2 * z) @ self.A + self.ridge * x
        return nan_outside(self.link.in_domain(z), g)

    @jax.jit
    def curvature(self, x) -> DiagPlusLowRank:
        """``B + diag(w^2)``, the Hessian of the loss in z = A x, as diagonal plus rank 2."""
        z = self.A @ x
        return nan_outside(self.link.in_domain(z), self.link.curvature(z, self.b).add_diag(self.reg**2))

    @jax.jit
    def gauss_newton_curvature(self, x) -> DiagPlusLowRank:
        """PSD Gauss-Newton model of the z-Hessian: ``J^T J + diag(w^2)``."""
        z = self.A @ x
        return nan_outside(self.link.in_domain(z), self.link.gauss_newton(z, self.b).add_diag(self.reg**2))

    def _apply(self, B: DiagPlusLowRank, v):
        """``A^T B A v + λ v`` for v (d,), O(nd)."""
        _validate.params_shape("v", v, self.params_shape)
        return B.mv(self.A @ v) @ self.A + self.ridge * v

    def _assemble(self, B: DiagPlusLowRank):
        """``A^T B A + λ I`` (d, d): one ``A^T diag(.) A`` product plus a rank-2 term, O(nd^2)."""
        return B.sandwich(self.A) + self.ridge * jnp.eye(self.A.shape[-1], dtype=self.A.dtype)

    def hessian_operator(self, x):
        """``v -> H v`` with B computed once at x: for many HVPs at one point (CG), O(nd) each."""
        self._check_params(x)
        B = self.curvature(x)
        return lambda v: self._apply(B, v)

    @jax.jit
    def hvp(self, x, v):
        """Hessian-vector product (d,): ``A^T (B (A v)) + λ v``, O(nd)."""
        return self.hessian_operator(x)(v)

    @jax.jit
    def hessian(self, x):
        """Hessian (d, d): ``A^T B A + λ I`` assembled from B's diagonal-plus-rank-2 form, O(nd^2)."""
        self._check_params(x)
        return self._assemble(self.curvature(x))

    @jax.jit
    def gauss_newton_hvp(self, x, v):
        """``A^T (J^T J + diag(w^2)) A v + λ v`` (always PSD)."""
        self._check_params(x)
        return self._apply(self.gauss_newton_curvature(x), v)

    @jax.jit
    def gauss_newton_matrix(self, x):
        """Gauss-Newton matrix (d, d), PSD."""
        self._check_params(x)
        return self._assemble(self.gauss_newton_curvature(x))


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


class RescaledRegression(LinkRegression):
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


def _planted(key, n, d, cond, scale, dtype):
    """A (n, d) of condition number ``cond`` and a planted x* with O(scale) logits."""
    k_a, k_x = jax.random.split(key)
    A = conditioned_matrix(k_a, n, d, cond, dtype)
    return A, scale * jax.random.normal(k_x, (d,), dtype) / jnp.sqrt(d)


@register("softmax")
def softmax_instance(key, n=16, d=6, cond=1.0, reg=0.0, ridge=0.0, noise=0.0, scale=1.0, dtype="float64"):
    """SoftmaxRegression with b = softmax(A x*) (times multiplicative noise), x0 = 0."""
    k_p, k_n = jax.random.split(key)
    A, x_star = _planted(k_p, n, d, cond, scale, dtype)
    b = noisy(k_n, jax.nn.softmax(A @ x_star), noise)
    return Instance(SoftmaxRegression(A, b, reg, ridge), jnp.zeros(d, dtype), x_star)


@register("resnet_softmax")
def resnet_instance(key, n=16, d=6, cond=1.0, reg=0.0, ridge=0.0, noise=0.0, scale=1.0, dtype="float64"):
    """ResNetSoftmaxRegression with b = u*/<u*, 1>, u* = exp(A x*) + A x* (noisy), x0 = 0."""
    k_p, k_n = jax.random.split(key)
    A, x_star = _planted(k_p, n, d, cond, scale, dtype)
    u = jnp.exp(A @ x_star) + A @ x_star
    b = noisy(k_n, u / jnp.sum(u), noise)
    return Instance(ResNetSoftmaxRegression(A, b, reg, ridge), jnp.zeros(d, dtype), x_star)


def _rescaled_generator(link):
    def rescaled_instance(key, n=16, d=6, cond=1.0, reg=0.1, ridge=0.0, noise=0.0, scale=1.0, dtype="float64"):
        """RescaledRegression with b = u*/<u*, 1>, u* = φ(A x*) (noisy), x0 = 0."""
        k_p, k_n = jax.random.split(key)
        A, x_star = _planted(k_p, n, d, cond, scale, dtype)
        u = RESCALED_FUNCTIONS[link][0](A @ x_star)
        b = noisy(k_n, u / jnp.sum(u), noise)
        return Instance(RescaledRegression(A, b, link, reg, ridge), jnp.zeros(d, dtype), x_star)

    return register(f"rescaled_{link}")(rescaled_instance)


for _link in RESCALED_FUNCTIONS:
    _rescaled_generator(_link)
