"""Vector problems: hand-derived derivatives against autodiff, jit, vmap, dtypes, bad input, domain."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import attnopt
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


def instance(name, seed, dtype=jnp.float64, n=N, d=D, scale=0.5):
    kA, kb, kw, kx = jax.random.split(jax.random.PRNGKey(seed), 4)
    A = jax.random.normal(kA, (n, d), dtype)
    b = jax.random.uniform(kb, (n,), dtype) / n
    reg = jax.random.uniform(kw, (n,), dtype)  # a vector weight exercises the broadcast
    problem = PROBLEMS[name][0](A, b, reg, 0.3)
    x = scale * jax.random.normal(kx, (d,), dtype) / d**0.5
    return problem, x


@pytest.mark.parametrize("name", PROBLEMS)
@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.1, 1.5))
def test_derivatives_match_autodiff_float64(name, seed, scale):
    problem, x = instance(name, seed, scale=scale)
    report = attnopt.check_derivatives(problem, x)
    assert report.rtol == 1e-10
    assert report.ok, str(report)


@pytest.mark.parametrize("name", PROBLEMS)
def test_derivatives_match_autodiff_float32(name):
    problem, x = instance(name, 0, jnp.float32)
    assert problem.loss(x).dtype == jnp.float32
    assert problem.hessian(x).dtype == jnp.float32
    report = attnopt.check_derivatives(problem, x)
    assert report.dtype == "float32" and report.rtol > 1e-8
    assert report.ok, str(report)


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


@pytest.mark.parametrize("name", PROBLEMS)
def test_jit_with_problem_as_argument(name):
    problem, x = instance(name, 2)
    v = jnp.ones(D)
    jitted = jax.jit(lambda p, y: (p.loss(y), p.grad(y), p.hvp(y, v), p.hessian(y)))
    for got, want in zip(jitted(problem, x), (problem.loss(x), problem.grad(x), problem.hvp(x, v), problem.hessian(x))):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", PROBLEMS)
def test_vmap_over_stacked_instances(name):
    pairs = [instance(name, s) for s in range(3)]
    batch = attnopt.stack([p for p, _ in pairs])
    xs = jnp.stack([x for _, x in pairs])
    assert batch.A.shape == (3, N, D) and batch.reg.shape == (3, N) and batch.ridge.shape == (3,)
    v = jnp.linspace(-1, 1, D)
    fns = {
        "loss": lambda p, y: p.loss(y),
        "grad": lambda p, y: p.grad(y),
        "hvp": lambda p, y: p.hvp(y, v),
        "hessian": lambda p, y: p.hessian(y),
    }
    for fn in fns.values():
        batched = jax.vmap(fn)(batch, xs)
        for i, (p, x) in enumerate(pairs):
            np.testing.assert_allclose(batched[i], fn(p, x), rtol=1e-12, atol=1e-14)


def test_stack_rejects_mixed_types():
    p, _ = instance("softmax", 0)
    q, _ = instance("rescaled_exp", 0)
    with pytest.raises(ValueError, match="one type"):
        attnopt.stack([p, q])


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


BAD_INPUTS = [
    (dict(A=jnp.ones(5)), "A must have shape"),
    (dict(b=jnp.ones(4)), r"b \(A has 6 rows\) must have shape \(6,\)"),
    (dict(A=jnp.ones((6, 3)).at[0, 0].set(jnp.nan)), "A contains non-finite"),
    (dict(b=jnp.ones(6).at[2].set(jnp.inf)), "b .* non-finite"),
    (dict(reg=-0.1), "reg must be nonnegative"),
    (dict(reg=jnp.ones(5)), r"reg .* must have shape \(6,\)"),
    (dict(reg=jnp.ones((6, 1))), r"reg .* must have shape \(6,\)"),
    (dict(ridge=-1.0), "ridge must be nonnegative"),
    (dict(ridge=jnp.ones(2)), r"ridge must have shape \(\)"),
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
    # MATH.md: A = ones((3, 1)), x = -0.6 gives alpha = 3 (e^-0.6 - 0.6) = -0.154.
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
