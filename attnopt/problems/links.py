"""Link losses ``ell(z; b)`` of the vector problems, with hand-derived derivatives.

A link is a static (hashable) object whose pure methods take the logits
z (n,) and the target b (n,):

- ``value(z, b)``: the scalar ``ell`` (with the factor 1/2);
- ``grad(z, b)``: ``d ell / dz``, (n,);
- ``curvature(z, b)``: ``d^2 ell / dz^2 = B`` as :class:`DiagPlusLowRank` (rank 2);
- ``gauss_newton(z, b)``: ``J^T J`` with J the Jacobian of the residual, PSD, rank 2;
- ``in_domain(z, b)``: False where the formulas leave their domain (overflow of
  ``exp`` or of the squares the formulas form, a non-positive normaliser);
  ``None`` if they never do.

Formulas: (docs/math.md, Softmax regression),
(docs/math.md, Rescaled regression) and
(docs/math.md, Softmax + ResNet regression). A problem maps x to z = A x (or a
matrix of logits, row by row) and adds its regularisers.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from attnopt.operators import DiagPlusLowRank, symmetric_rank2


def jacobian_gram(phi1: jax.Array, r: jax.Array) -> DiagPlusLowRank:
    """``J^T J`` for ``J = (I - r 1^T) diag(phi1)``:
    ``diag(phi1^2) - phi1 (phi1∘r)^T - (phi1∘r) phi1^T + ||r||^2 phi1 phi1^T``."""
    U, M = symmetric_rank2(phi1, phi1 * r, r @ r)
    return DiagPlusLowRank(phi1 * phi1, U, M)


@dataclasses.dataclass(frozen=True)
class SoftmaxLink:
    """``ell = 1/2 ||softmax(z) - b||^2`` (docs/math.md, Softmax regression).

    grad = f∘c - s f;  B = diag(p - s f) + γ f f^T - p f^T - f p^T with
    f = softmax(z), c = f - b, s = <c, f>, p = f∘(2f - b), γ = <3f - 2b, f>.
    """

    name: str = "softmax"

    def _parts(self, z, b):
        f = jax.nn.softmax(z)
        c = f - b
        return f, c, c @ f

    def value(self, z, b):
        _, c, _ = self._parts(z, b)
        return 0.5 * (c @ c)

    def grad(self, z, b):
        f, c, s = self._parts(z, b)
        return f * c - s * f

    def curvature(self, z, b):
        f, _, s = self._parts(z, b)
        p = f * (2 * f - b)
        U, M = symmetric_rank2(f, p, (3 * f - 2 * b) @ f)
        return DiagPlusLowRank(p - s * f, U, M)

    def gauss_newton(self, z, b):
        f, _, _ = self._parts(z, b)
        return jacobian_gram(f, f)

    def in_domain(self, z, b):
        return None


RESCALED_FUNCTIONS = {
    # name: (phi, phi', phi'')
    "exp": (jnp.exp, jnp.exp, jnp.exp),
    "cosh": (jnp.cosh, jnp.sinh, jnp.cosh),
    "sinh": (jnp.sinh, jnp.cosh, jnp.sinh),
}


@dataclasses.dataclass(frozen=True)
class RescaledLink:
    """``ell = 1/2 ||u - <u, 1> b||^2`` with u = φ(z), φ in {exp, cosh, sinh} (docs/math.md, Rescaled regression).

    grad = φ'∘q;  B = diag(φ'∘φ' + φ''∘q) - (φ'∘b) φ'^T - φ' (φ'∘b)^T + ||b||^2 φ' φ'^T
    with c = u - <u, 1> b, q = c - <b, c> 1.

    Domain: the formulas form products of two of φ, φ', φ'' and <u, 1> b, so
    ``in_domain`` asks ``((1 + ||b||_1) (sum|φ| + sum|φ'| + sum|φ''|))^2`` to be finite:
    for exp about z < 43 (float32) or z < 354 (float64), half the overflow point of φ.
    Outside it the problem returns NaN.
    """

    name: str = "exp"

    def __post_init__(self):
        if self.name not in RESCALED_FUNCTIONS:
            raise ValueError(f"link must be one of {sorted(RESCALED_FUNCTIONS)}, got {self.name!r}")

    def _parts(self, z, b):
        phi, dphi, d2phi = RESCALED_FUNCTIONS[self.name]
        u = phi(z)
        c = u - jnp.sum(u) * b
        q = c - b @ c
        return c, q, dphi(z), d2phi(z)

    def value(self, z, b):
        c, _, _, _ = self._parts(z, b)
        return 0.5 * (c @ c)

    def grad(self, z, b):
        _, q, d1, _ = self._parts(z, b)
        return d1 * q

    def curvature(self, z, b):
        _, q, d1, d2 = self._parts(z, b)
        U, M = symmetric_rank2(d1, d1 * b, b @ b)
        return DiagPlusLowRank(d1 * d1 + d2 * q, U, M)

    def gauss_newton(self, z, b):
        _, _, d1, _ = self._parts(z, b)
        return jacobian_gram(d1, b)

    def in_domain(self, z, b):
        total = sum(jnp.sum(jnp.abs(fn(z))) for fn in RESCALED_FUNCTIONS[self.name])
        return jnp.isfinite(jnp.square(total * (1 + jnp.sum(jnp.abs(b)))))


@dataclasses.dataclass(frozen=True)
class ResNetSoftmaxLink:
    """``ell = 1/2 ||u / <u, 1> - b||^2`` with u = exp(z) + z (docs/math.md, Softmax + ResNet regression).

    With α = <u, 1>, f = u/α, c = f - b, s = <c, f>, h = c - s 1, u' = e + 1,
    p' = u'∘(2f - b), γ = <3f - 2b, f>:
    grad = u'∘h / α;  B = [diag(u'∘u') - u' p'^T - p' u'^T + γ u' u'^T] / α^2 + diag(e∘h) / α.

    Domain: the normaliser α must be positive and finite (e^z + z < 0 for
    z < -0.567, so α <= 0 happens), and the squares of ``u/α`` and ``u'/α`` that the
    formulas form must be finite; outside it the problem returns NaN. The curvature
    divides u' by α before squaring, so it is finite wherever the loss is.
    """

    name: str = "resnet_softmax"

    def _parts(self, z, b):
        e = jnp.exp(z)
        alpha = jnp.sum(e + z)
        f = (e + z) / alpha
        c = f - b
        h = c - c @ f
        return e, alpha, f, c, h

    def value(self, z, b):
        _, _, _, c, _ = self._parts(z, b)
        return 0.5 * (c @ c)

    def grad(self, z, b):
        e, alpha, _, _, h = self._parts(z, b)
        return (e + 1) / alpha * h

    def curvature(self, z, b):
        e, alpha, f, _, h = self._parts(z, b)
        r = (e + 1) / alpha  # u'/α: dividing before squaring keeps the curvature finite wherever the loss is
        U, M = symmetric_rank2(r, r * (2 * f - b), (3 * f - 2 * b) @ f)
        return DiagPlusLowRank(r * r + e / alpha * h, U, M)

    def gauss_newton(self, z, b):
        e, alpha, f, _, _ = self._parts(z, b)
        return jacobian_gram((e + 1) / alpha, f)

    def in_domain(self, z, b):
        e = jnp.exp(z)
        alpha = jnp.sum(e + z)
        ratio = (jnp.sum(jnp.abs(e + z)) + jnp.sum(e + 1)) / jnp.where(alpha > 0, alpha, 1)
        return jnp.isfinite(alpha) & (alpha > 0) & jnp.isfinite(jnp.square(ratio * (1 + jnp.sum(jnp.abs(b)))))
