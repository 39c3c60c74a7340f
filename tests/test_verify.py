"""check_derivatives must catch wrong formulas, not only bless right ones, and compare only hand-derived ones."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnopt
from attnopt.operators import DiagPlusLowRank
from attnopt.problems.base import Problem
from attnopt.problems.links import SoftmaxLink


@dataclasses.dataclass(frozen=True)
class DroppedRank2(SoftmaxLink):
    """Section 1's curvature without its rank-2 term."""

    def curvature(self, z, b):
        B = super().curvature(z, b)
        return B._replace(M=jnp.zeros_like(B.M))


@dataclasses.dataclass(frozen=True)
class WrongSign(SoftmaxLink):
    """Gradient with the sign of the s f term flipped."""

    def grad(self, z, b):
        f = jax.nn.softmax(z)
        c = f - b
        return f * c + (c @ f) * f


@dataclasses.dataclass(frozen=True)
class TransposedRank2(SoftmaxLink):
    """A non-symmetric rank-2 term (p f^T twice instead of p f^T + f p^T)."""

    def curvature(self, z, b):
        B = super().curvature(z, b)
        return DiagPlusLowRank(B.diag, B.U, B.M.at[0, 1].set(-2.0).at[1, 0].set(0.0))


def planted(link):
    A = jax.random.normal(jax.random.PRNGKey(0), (10, 4))
    b = jax.random.uniform(jax.random.PRNGKey(1), (10,)) / 10
    return attnopt.LinkRegression(A, b, 0.1, 0.1, link=link), jnp.linspace(-0.4, 0.4, 4)


def test_correct_link_passes():
    report = attnopt.check_derivatives(*planted(SoftmaxLink()))
    assert report.ok
    assert max(report.errors.values()) < 1e-12


@pytest.mark.parametrize(
    "link,bad",
    [(DroppedRank2(), {"hvp", "hessian"}), (WrongSign(), {"grad"}), (TransposedRank2(), {"hvp", "hessian"})],
)
def test_planted_wrong_formula_is_reported(link, bad):
    report = attnopt.check_derivatives(*planted(link))
    assert not report.ok
    failing = {q for q, e in report.errors.items() if e > report.rtol}
    assert failing == bad
    assert "NO" in str(report)


def test_tolerances_follow_dtype_and_can_be_overridden():
    problem, x = planted(SoftmaxLink())
    f32 = attnopt.check_derivatives(
        jax.tree.map(lambda a: a.astype(jnp.float32), problem), x.astype(jnp.float32)
    )
    assert f32.dtype == "float32" and f32.rtol > attnopt.check_derivatives(problem, x).rtol
    assert f32.ok
    # A tolerance below float32 round-off must fail the same float32 check.
    strict = attnopt.check_derivatives(
        jax.tree.map(lambda a: a.astype(jnp.float32), problem), x.astype(jnp.float32), rtol=1e-14, atol=0.0
    )
    assert not strict.ok


def test_report_table_names_every_quantity():
    text = str(attnopt.check_derivatives(*planted(SoftmaxLink()), name="planted"))
    for word in ("planted", "grad", "hvp", "hessian", "float64", "yes"):
        assert word in text


def test_explicit_direction_is_used():
    problem, x = planted(DroppedRank2())
    # With v = 0 both HVPs are exactly zero, so only the Hessian exposes the dropped term.
    report = attnopt.check_derivatives(problem, x, v=jnp.zeros(4))
    assert report.errors["hvp"] == 0.0
    assert report.errors["hessian"] > report.rtol
    np.testing.assert_array_equal(np.isfinite(list(report.errors.values())), True)


class LossOnly(Problem):
    """Defines only ``loss``: ``1/4 ||A x||_4^4``; grad, hvp and hessian come from autodiff."""

    leaves = ("A",)

    def __init__(self, A):
        self._set(A=jnp.asarray(A))

    def loss(self, x):
        return 0.25 * jnp.sum((self.A @ x) ** 4)


class HalvedGradient(LossOnly):
    """A hand gradient off by a factor 1/2; hvp and hessian stay autodiff."""

    def grad(self, x):
        z = self.A @ x
        return 0.5 * (z**3 @ self.A)


def test_loss_only_problem_has_nothing_to_compare():
    problem, x = LossOnly(jnp.arange(6.0).reshape(3, 2) / 6), jnp.array([0.5, -1.0])
    report = attnopt.check_derivatives(problem, x, name="loss_only")
    assert report.errors == {} and report.autodiff == ("grad", "hvp", "hessian")
    assert report.ok
    text = str(report)
    assert "nothing to compare: loss_only uses autodiff for grad, hvp, hessian" in text
    assert text.count("autodiff") == 4 and "yes" not in text


def test_only_hand_derived_quantities_are_compared():
    problem, x = HalvedGradient(jnp.arange(6.0).reshape(3, 2) / 6), jnp.array([0.5, -1.0])
    report = attnopt.check_derivatives(problem, x)
    assert set(report.errors) == {"grad"} and report.autodiff == ("hvp", "hessian")
    assert report.errors["grad"] > 0.1 and not report.ok
    row = str(report).splitlines()[-1]
    assert row.split()[-4:] == ["autodiff", "autodiff", "1e-10", "NO"] and "nothing to compare" not in str(report)


def test_float32_formulas_are_judged_against_float64_autodiff():
    """At this point of a float32 ResNet instance (logits up to about 30), float32 autodiff's curvature is
    off by O(1) while the hand-derived one matches float64 autodiff of the same float32 data."""
    inst = attnopt.make("resnet_softmax", jax.random.PRNGKey(0), dtype="float32", scale=3.0)
    x = inst.x0 + 8.0 * jax.random.normal(jax.random.PRNGKey(10), inst.x0.shape, jnp.float32)
    report = attnopt.check_derivatives(inst.problem, x)
    assert report.reference == "float64" and report.ok, str(report)
    same = attnopt.check_derivatives(inst.problem, x, reference="same")
    assert same.reference == "float32" and same.errors["hessian"] > 0.1 and not same.ok
    assert "float64" in str(report).splitlines()[-1]
    with pytest.raises(ValueError, match="reference must be"):
        attnopt.check_derivatives(inst.problem, x, reference="float128")
