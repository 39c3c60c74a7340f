"""The Problem base (autodiff defaults, arguments/rebuild) and the vector problems' own checks.

Derivatives vs autodiff, jit, vmap, NaN/shape input and the domain of every
registered problem are in test_problem_conformance.py.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnopt
from attnopt.problems.base import Problem, nan_outside
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
    (dict(A=jnp.ones((6, 3)) * 1j), "A: complex data is not supported"),
    (dict(reg=0.1j), "reg: complex data is not supported"),
    (dict(A=jnp.ones((6, 0))), "A must not be empty"),
    (dict(A=None), "A must be a real number or array, got NoneType"),
    (dict(b=None), "b must be a real number or array, got NoneType"),
    (dict(A=np.full((6, 3), "a")), "A must be a real number or array, got ndarray of dtype <U1"),
    (dict(A=[[1.0, 2.0, 3.0]] * 5 + [[1.0]]), "A must be a real number or array, got list"),
    (dict(ridge="0.1"), "ridge must be a real number or array, got str"),
    (dict(A=jnp.ones((6, 3), jnp.float16), b=jnp.ones(6, jnp.float16)), "A, b: dtype float16 is not supported"),
    (dict(A=jnp.ones((6, 3), jnp.bfloat16), b=jnp.ones(6, jnp.bfloat16)), "A, b: dtype bfloat16 is not supported"),
]


@pytest.mark.parametrize("cls", [attnopt.SoftmaxRegression, attnopt.ResNetSoftmaxRegression, attnopt.RescaledRegression])
@pytest.mark.parametrize("bad,message", BAD_INPUTS)
def test_bad_input_raises_value_error(cls, bad, message):
    kwargs = dict(A=jnp.ones((6, 3)), b=jnp.ones(6) / 6, reg=0.0, ridge=0.0) | bad
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


def test_a_finite_value_beyond_float32_is_named_as_out_of_range_not_non_finite():
    with jax.enable_x64(False):
        with pytest.raises(ValueError, match=r"^b \(A has 6 rows\) has entries beyond the range of float32 \(largest magnitude 1e\+39"):
            attnopt.SoftmaxRegression(np.ones((6, 3)), np.full(6, 1e39))


def test_float16_generator_is_refused_before_building():
    with pytest.raises(ValueError, match="^dtype must be 'float32' or 'float64'"):
        attnopt.make("softmax", jax.random.PRNGKey(0), dtype="float16")


@pytest.mark.parametrize("option, value, message", [
    ("cond", 0.5, "cond must be a finite number >= 1"),
    ("noise", float("nan"), "noise must be a finite number >= 0"),
    ("n", 0, r"n must be an int in \[1, "),
    ("d", 40, r"d must be <= n \(\d+\), got 40"),
    ("reg", -1.0, "reg must be nonnegative"),
])
def test_generator_options_are_checked_naming_the_option_even_when_traced(option, value, message):
    for generator in ("softmax", "matrix_rescaled"):
        with pytest.raises(ValueError, match=f"^{message}"):
            attnopt.make(generator, jax.random.PRNGKey(0), **{option: value})
        with pytest.raises(ValueError, match=f"^{message}"):  # shapes only, as a config check builds it
            jax.eval_shape(lambda key: attnopt.make(generator, key, **{option: value}), jax.random.PRNGKey(0))


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


def outputs(problem, x):
    v = jnp.ones_like(x)
    return [np.asarray(o) for o in (problem.loss(x), problem.grad(x), problem.hvp(x, v), problem.hessian(x))]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("name", ["rescaled_exp", "rescaled_cosh", "rescaled_sinh", "resnet"])
def test_every_output_is_finite_or_nan_and_in_domain_agrees(name, dtype):
    """Along z from 0 to past the overflow of exp, never inf: each point is inside (all finite) or outside (all NaN).
    Between about 44 and 88 (float32), 355 and 709 (float64), the squares overflow while exp does not."""
    A = jnp.asarray([[1.0], [0.5], [-0.3], [0.2]], dtype)
    problem = PROBLEMS[name][0](A, jnp.full(4, 0.25, dtype), 0.1, 0.0)
    top = 100.0 if dtype == jnp.float32 else 800.0
    inside = 0
    for z in np.linspace(0.0, top, 41):
        x = jnp.asarray([z], dtype)
        outs = outputs(problem, x)
        finite = all(np.all(np.isfinite(o)) for o in outs)
        assert finite or all(np.all(np.isnan(o)) for o in outs), (z, [o for o in outs])
        assert bool(problem.in_domain(x)) == finite, z
        inside += finite
    assert 0.3 * 41 < inside < 41  # both sides of the boundary were visited


def test_resnet_curvature_is_finite_wherever_the_loss_is_float32():
    A = jnp.asarray([[1.0], [0.5], [0.2]], jnp.float32)
    problem = attnopt.ResNetSoftmaxRegression(A, jnp.full(3, 1 / 3, jnp.float32))
    x = jnp.asarray([60.0], jnp.float32)  # e^60 is finite in float32, its square is not
    assert bool(problem.in_domain(x))
    assert all(np.all(np.isfinite(o)) for o in outputs(problem, x))


class Positive(Problem):
    """Defines loss and a domain only: ``1/2 ||x||^2`` for x > 0 (NaN elsewhere)."""

    def loss(self, x):
        return nan_outside(self.in_domain(x), 0.5 * jnp.sum(x * x))

    def in_domain(self, x):
        return jnp.all(x > 0)


def test_autodiff_defaults_are_nan_outside_the_domain():
    problem = Positive()
    for method in (problem.grad, lambda x: problem.hvp(x, x), problem.hessian):
        assert np.all(np.isfinite(method(jnp.array([1.0, 2.0]))))
        assert np.all(np.isnan(method(jnp.array([-1.0, 2.0]))))


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
