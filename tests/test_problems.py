"""The Problem base (autodiff defaults, arguments/rebuild) and the vector problems' own checks.

Derivatives vs autodiff, jit, vmap, NaN/shape input and the domain of every
registered problem are in test_problem_conformance.py.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnopt
from attnopt.problems.base import Problem
from attnopt.problems.links import RESCALED_FUNCTIONS

N, D = 9, 4

# name -> (factory(A, b, reg, ridge), residual(problem, z) used as an independent oracle)
PROBLEMS = {
    "softmax": (
        lambda A, b, reg, ridge: attnopt.SoftmaxRegression(A, b, reg, ridge),
        lambda p, z: jax.nn.softmax(z) - p.b,
    ),
    "resnet": (
        lambda A, b, reg, ridge: attnopt.ResNetSoftmaxRegression(A, b, reg, ridge),
        lambda p, z: (jnp.exp(z) + z) / jnp.sum(jnp.exp(z) + z) - p.b,
    ),
    **{
        f"rescaled_{link}": (
            lambda A, b, reg, ridge, link=link: attnopt.RescaledRegression(A, b, link, reg, ridge),
            lambda p, z, link=link: RESCALED_FUNCTIONS[link][0](z) - jnp.sum(RESCALED_FUNCTIONS[link][0](z)) * p.b,
        )
        for link in ("exp", "cosh", "sinh")
    },
}


def instance(name, seed, reg="vector"):
    kA, kb, kw, kx = jax.random.split(jax.random.PRNGKey(seed), 4)
    A = jax.random.normal(kA, (N, D))
    b = jax.random.uniform(kb, (N,)) / N
    w = jax.random.uniform(kw, (N,)) if reg == "vector" else reg  # a non-uniform weight shows a misplaced one
    problem = PROBLEMS[name][0](A, b, w, 0.3)
    x = 0.5 * jax.random.normal(kx, (D,)) / D**0.5
    return problem, x


class Coupled(Problem):
    """Defines only ``loss``: ``1/4 sum (A u)^4 + 1/2 (w^T G u)^2`` over params {"u": (d,), "w": (m,)}."""

    leaves = ("A", "G")

    def __init__(self, A, G):
        self._set(A=jnp.asarray(A), G=jnp.asarray(G))

    def loss(self, params):
        u, w = params["u"], params["w"]
        return 0.25 * jnp.sum((self.A @ u) ** 4) + 0.5 * (w @ self.G @ u) ** 2


def coupled(seed, d=3, m=2):
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    problem = Coupled(jax.random.normal(k[0], (5, d)), jax.random.normal(k[1], (m, d)))
    return problem, {"u": jax.random.normal(k[2], (d,)), "w": jax.random.normal(k[3], (m,))}


def coupled_derivatives(p, params, v):
    """Closed forms, with s = w^T G u: grad, H v and the Hessian in ravel order [u, w]."""
    u, w = params["u"], params["w"]
    z, s, Gtw, Gu = p.A @ u, w @ p.G @ u, p.G.T @ w, p.G @ u
    grad = {"u": p.A.T @ z**3 + s * Gtw, "w": s * Gu}
    Huu = p.A.T @ (3 * z[:, None] ** 2 * p.A) + jnp.outer(Gtw, Gtw)
    Huw = jnp.outer(Gtw, Gu) + s * p.G.T
    H = jnp.block([[Huu, Huw], [Huw.T, jnp.outer(Gu, Gu)]])
    Hv = H @ jnp.concatenate([v["u"], v["w"]])
    return grad, {"u": Hv[: u.size], "w": Hv[u.size:]}, H


def test_autodiff_defaults_match_closed_forms_under_jit_and_vmap():
    pairs = [coupled(seed) for seed in range(3)]
    v = {"u": jnp.array([1.0, -2.0, 0.5]), "w": jnp.array([0.3, 1.0])}
    methods = lambda p, x: (p.grad(x), p.hvp(x, v), p.hessian(x))
    assert Coupled.hand_derived() == ()
    xs = jax.tree.map(lambda *a: jnp.stack(a), *[x for _, x in pairs])
    batched = jax.jit(jax.vmap(methods))(attnopt.stack([p for p, _ in pairs]), xs)
    for i, (p, x) in enumerate(pairs):
        want = coupled_derivatives(p, x, v)
        for got in (methods(p, x), jax.jit(methods)(p, x), jax.tree.map(lambda a: a[i], batched)):
            assert jax.tree.structure(got) == jax.tree.structure(want)
            for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
                np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)


def test_hand_derived_lists_the_overridden_derivatives():
    class HandGradient(Coupled):
        def grad(self, params):
            return coupled_derivatives(self, params, params)[0]

    assert HandGradient.hand_derived() == ("grad",)
    assert attnopt.SoftmaxRegression.hand_derived() == ("grad", "hvp", "hessian")
    # The autodiff hvp and hessian stay those of the loss, not of the overriding gradient.
    p, x = coupled(0)
    np.testing.assert_allclose(HandGradient.hessian(p, x), Coupled.hessian(p, x), rtol=1e-14)


def test_arguments_and_rebuild():
    problem = attnopt.RescaledRegression(jnp.ones((6, 3)), jnp.ones(6) / 6, "cosh", reg=0.5, ridge=0.1)
    assert set(problem.arguments()) == {"A", "b", "link", "reg", "ridge"} and problem.arguments()["link"] == "cosh"
    sinh = problem.rebuild(link="sinh", ridge=0.2)
    assert sinh.link.name == "sinh" and float(sinh.ridge) == 0.2 and sinh.reg.shape == (6,)
    np.testing.assert_array_equal(sinh.A, problem.A)
    with pytest.raises(ValueError, match="ridge must be nonnegative"):
        problem.rebuild(ridge=-1.0)
    with pytest.raises(ValueError, match=r"no arguments \['bias'\]"):
        problem.rebuild(bias=1.0)
    matrix = attnopt.MatrixRescaledRegression(jnp.ones((4, 2)), jnp.ones((3, 2)), jnp.ones((4, 3)), link="sinh")
    assert matrix.rebuild().link == matrix.link


@pytest.mark.parametrize("name", PROBLEMS)
def test_gauss_newton_is_jacobian_gram(name):
    """GN = J^T J of the stacked residual [link residual(Ax); w∘Ax; sqrt(λ) x], and PSD."""
    problem, x = instance(name, 1)
    residual_fn = PROBLEMS[name][1]

    def residual(y):
        z = problem.A @ y
        return jnp.concatenate([residual_fn(problem, z), problem.reg * z, jnp.sqrt(problem.ridge) * y])

    J = jax.jacobian(residual)(x)
    expected = J.T @ J
    gn = problem.gauss_newton_matrix(x)
    np.testing.assert_allclose(gn, expected, rtol=1e-10, atol=1e-12)
    v = jnp.arange(1.0, D + 1)
    np.testing.assert_allclose(problem.gauss_newton_hvp(x, v), expected @ v, rtol=1e-10, atol=1e-12)
    assert np.linalg.eigvalsh(np.asarray(gn)).min() > 0
    # The loss is 1/2 ||residual||^2, so the residual oracle also pins the loss.
    np.testing.assert_allclose(problem.loss(x), 0.5 * residual(x) @ residual(x), rtol=1e-12)


def test_stack_rejects_mixed_types():
    p, _ = instance("softmax", 0)
    q, _ = instance("rescaled_exp", 0)
    with pytest.raises(ValueError, match="one type"):
        attnopt.stack([p, q])


@pytest.mark.parametrize("name", ["softmax", "rescaled_exp"])
def test_weights_enter_per_row(name):
    """reg w adds exactly 1/2 ||w∘Ax||^2, A^T (w^2∘Ax) and A^T diag(w^2) A to loss, grad and Hessian."""
    weighted, x = instance(name, 4)
    plain, _ = instance(name, 4, reg=0.0)
    A, w2 = weighted.A, weighted.reg**2
    z = A @ x
    np.testing.assert_allclose(weighted.loss(x) - plain.loss(x), 0.5 * w2 @ z**2, rtol=1e-10)
    np.testing.assert_allclose(weighted.grad(x) - plain.grad(x), A.T @ (w2 * z), rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(weighted.hessian(x) - plain.hessian(x), A.T @ (w2[:, None] * A), rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(weighted.hvp(x, x) - plain.hvp(x, x), A.T @ (w2 * z), rtol=1e-10, atol=1e-13)


def test_scalar_reg_broadcasts_and_matches_vector():
    A = jax.random.normal(jax.random.PRNGKey(0), (N, D))
    b = jnp.full(N, 1.0 / N)
    x = jnp.linspace(-0.5, 0.5, D)
    scalar = attnopt.SoftmaxRegression(A, b, reg=0.2)
    vector = attnopt.SoftmaxRegression(A, b, reg=jnp.full(N, 0.2))
    np.testing.assert_allclose(scalar.hessian(x), vector.hessian(x), rtol=1e-14)
    # The regulariser is 1/2 ||w A x||^2: it shifts the loss by exactly that amount.
    plain = attnopt.SoftmaxRegression(A, b)
    np.testing.assert_allclose(scalar.loss(x) - plain.loss(x), 0.5 * 0.2**2 * jnp.sum((A @ x) ** 2), rtol=1e-12)


# NaN entries and wrong ranks of every leaf are in test_problem_conformance.py.
BAD_INPUTS = [
    (dict(b=jnp.ones(4)), r"b \(A has 6 rows\) must have shape \(6,\)"),
    (dict(b=jnp.ones(6).at[2].set(jnp.inf)), "b .* non-finite"),
    (dict(reg=-0.1), "reg must be nonnegative"),
    (dict(reg=jnp.ones(5)), r"reg .* must have shape \(6,\)"),
    (dict(ridge=-1.0), "ridge must be nonnegative"),
    (dict(A=jnp.ones((6, 3)) * 1j), "complex data is not supported"),
    (dict(A=jnp.ones((6, 0))), "A must not be empty"),
]


@pytest.mark.parametrize("cls", [attnopt.SoftmaxRegression, attnopt.ResNetSoftmaxRegression, attnopt.RescaledRegression])
@pytest.mark.parametrize("bad,message", BAD_INPUTS)
def test_bad_input_raises_value_error(cls, bad, message):
    kwargs = dict(A=jnp.ones((6, 3)), b=jnp.ones(6) / 6, reg=0.0, ridge=0.0) | bad
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


def test_nested_lists_are_accepted_like_arrays():
    A = [[1.0, 2.0], [3.0, 4.0], [0.5, -1.0]]
    problem = attnopt.SoftmaxRegression(A, [0.2, 0.3, 0.5])
    np.testing.assert_array_equal(problem.A, np.asarray(A))
    assert np.isfinite(problem.loss(jnp.zeros(2)))


def test_unknown_link_and_wrong_params_shape():
    with pytest.raises(ValueError, match="link must be one of"):
        attnopt.RescaledRegression(jnp.ones((6, 3)), jnp.ones(6), link="tanh")
    problem = attnopt.SoftmaxRegression(jnp.ones((6, 3)), jnp.ones(6) / 6)
    with pytest.raises(ValueError, match=r"x must have shape \(3,\)"):
        problem.grad(jnp.ones(4))


def test_problem_is_frozen():
    problem, _ = instance("softmax", 0)
    with pytest.raises(AttributeError, match="frozen"):
        problem.A = problem.A
    assert problem.replace(ridge=jnp.asarray(2.0)).ridge == 2.0


@pytest.mark.parametrize("link", ["exp", "cosh", "sinh"])
@pytest.mark.parametrize("dtype,big", [(jnp.float32, 100.0), (jnp.float64, 800.0)])
def test_rescaled_overflow_returns_nan_not_finite_garbage(link, dtype, big):
    A = jnp.ones((4, 1), dtype)
    b = jnp.full(4, 0.25, dtype)
    problem = attnopt.RescaledRegression(A, b, link, reg=0.1)
    x = jnp.array([big], dtype)
    assert not bool(problem.in_domain(x))
    for out in (problem.loss(x), problem.grad(x), problem.hvp(x, x), problem.hessian(x)):
        assert np.all(np.isnan(np.asarray(out)))
    inside = jnp.array([big / 10], dtype)
    assert bool(problem.in_domain(inside)) and np.isfinite(problem.loss(inside))


def test_resnet_nonpositive_normaliser_returns_nan():
    # docs/math.md, Softmax + ResNet regression: A = ones((3, 1)), x = -0.6 gives alpha = 3 (e^-0.6 - 0.6) = -0.154.
    problem = attnopt.ResNetSoftmaxRegression(jnp.ones((3, 1)), jnp.full(3, 1 / 3))
    x = jnp.array([-0.6])
    assert not bool(problem.in_domain(x))
    for out in (problem.loss(x), problem.grad(x), problem.hvp(x, x), problem.hessian(x)):
        assert np.all(np.isnan(np.asarray(out)))
    assert np.isfinite(problem.loss(jnp.array([-0.5])))  # alpha = 3 (e^-0.5 - 0.5) > 0


def test_resnet_reduces_to_softmax_structure():
    """With u = e (dropping the +z), the ResNet formulas are section 1's: compare at large z where z/e(z) is negligible."""
    A = jax.random.normal(jax.random.PRNGKey(3), (N, D))
    b = jnp.full(N, 1.0 / N)
    x = jnp.zeros(D)
    shifted = attnopt.ResNetSoftmaxRegression(A, b)
    # Shifting all logits by a constant c: u = e^c e^z + z + c -> softmax as c grows.
    big = 40.0
    A_shift = jnp.concatenate([A, jnp.ones((N, 1))], axis=1)
    x_shift = jnp.concatenate([x, jnp.array([big])])
    resnet = attnopt.ResNetSoftmaxRegression(A_shift, b)
    softmax = attnopt.SoftmaxRegression(A_shift, b)
    np.testing.assert_allclose(resnet.grad(x_shift), softmax.grad(x_shift), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(resnet.hessian(x_shift), softmax.hessian(x_shift), rtol=1e-9, atol=1e-12)
    assert np.isfinite(shifted.loss(x))
