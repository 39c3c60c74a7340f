"""Matrix (tensor-trick) regression: row-block decomposition, dense-Kronecker reference, Gauss-Newton, bad input.

Derivatives vs autodiff, jit, vmap, NaN/shape input and the domain of every
registered problem are in test_problem_conformance.py; the rectangular sizes
here catch a transposed or swapped Kronecker factor, which the square
generated instances there cannot.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnopt.problems.matrix import MatrixRescaledRegression, MatrixSoftmaxRegression
from attnopt.problems.registry import make
from attnopt.problems.regression import RescaledRegression, SoftmaxRegression

# All sizes differ, so a transposed or swapped Kronecker factor fails.
N1, N2, D1, D2 = 5, 4, 3, 2

# name -> (matrix problem factory, the vector problem on one row block, row residual ell's argument)
PROBLEMS = {
    "softmax": (
        MatrixSoftmaxRegression,
        lambda A, b, reg: SoftmaxRegression(A, b, reg),
        lambda Z, B: jax.nn.softmax(Z, axis=-1) - B,
    ),
    "rescaled": (
        MatrixRescaledRegression,
        lambda A, b, reg: RescaledRegression(A, b, "exp", reg),
        lambda Z, B: jnp.exp(Z) - jnp.sum(jnp.exp(Z), axis=-1, keepdims=True) * B,
    ),
}


def instance(name, seed=0, dtype=jnp.float64, reg="matrix"):
    k1, k2, kb, kw, kx = jax.random.split(jax.random.PRNGKey(seed), 5)
    A1 = jax.random.normal(k1, (N1, D1), dtype)
    A2 = jax.random.normal(k2, (N2, D2), dtype)
    B = jax.random.uniform(kb, (N1, N2), dtype) / N2
    W = jax.random.uniform(kw, (N1, N2), dtype) if reg == "matrix" else reg
    problem = PROBLEMS[name][0](A1, A2, B, W, 0.3)
    X = 0.5 * jax.random.normal(kx, (D1, D2), dtype) / (D1 * D2) ** 0.5  # not symmetric, not square
    return problem, X


def dense_loss(problem, X):
    """The loss written from scratch with the dense Kronecker matrix (an independent oracle)."""
    name = "softmax" if isinstance(problem, MatrixSoftmaxRegression) else "rescaled"
    Z = (jnp.kron(problem.A1, problem.A2) @ X.reshape(-1)).reshape(N1, N2)
    R = PROBLEMS[name][2](Z, problem.B)
    return 0.5 * jnp.sum(R**2) + 0.5 * jnp.sum((problem.reg * Z) ** 2) + 0.5 * problem.ridge * jnp.sum(X**2)


@pytest.mark.parametrize("name", PROBLEMS)
def test_equals_sum_of_row_block_vector_problems(name):
    """L(X) = sum_j of a vector problem on A_j = a1_j^T ⊗ A2, b = B[j], reg = W[j] (+ ridge once)."""
    problem, X = instance(name)
    x, lam = X.reshape(-1), problem.ridge
    rows = [
        PROBLEMS[name][1](jnp.kron(problem.A1[j][None], problem.A2), problem.B[j], problem.reg[j]) for j in range(N1)
    ]
    loss = sum(p.loss(x) for p in rows) + 0.5 * lam * (x @ x)
    grad = sum(p.grad(x) for p in rows) + lam * x
    hess = sum(p.hessian(x) for p in rows) + lam * jnp.eye(D1 * D2)
    gn = sum(p.gauss_newton_matrix(x) for p in rows) + lam * jnp.eye(D1 * D2)
    np.testing.assert_allclose(problem.loss(X), loss, rtol=1e-12)
    np.testing.assert_allclose(problem.grad(X), grad.reshape(D1, D2), rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(problem.hessian(X), hess, rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(problem.gauss_newton_matrix(X), gn, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("name", PROBLEMS)
def test_matches_dense_kronecker_reference(name):
    problem, X = instance(name, seed=3)
    V = jax.random.normal(jax.random.PRNGKey(9), (D1, D2))
    f = lambda x: dense_loss(problem, x.reshape(D1, D2))
    x = X.reshape(-1)
    np.testing.assert_allclose(problem.loss(X), f(x), rtol=1e-12)
    np.testing.assert_allclose(problem.grad(X).reshape(-1), jax.grad(f)(x), rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(problem.hessian(X), jax.hessian(f)(x), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(problem.hvp(X, V).reshape(-1), jax.hessian(f)(x) @ V.reshape(-1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", PROBLEMS)
def test_gauss_newton_is_jacobian_gram(name):
    """GN = J^T J of the stacked residual [link residual(Z); W∘Z; sqrt(λ) X], PSD."""
    problem, X = instance(name, 2)

    def residual(x):
        Z = problem.A1 @ x.reshape(D1, D2) @ problem.A2.T
        R = PROBLEMS[name][2](Z, problem.B)
        return jnp.concatenate([R.reshape(-1), (problem.reg * Z).reshape(-1), jnp.sqrt(problem.ridge) * x])

    J = jax.jacobian(residual)(X.reshape(-1))
    np.testing.assert_allclose(problem.gauss_newton_matrix(X), J.T @ J, rtol=1e-10, atol=1e-12)
    V = jnp.arange(1.0, D1 * D2 + 1).reshape(D1, D2)
    np.testing.assert_allclose(problem.gauss_newton_hvp(X, V).reshape(-1), J.T @ J @ V.reshape(-1), rtol=1e-10)


def test_scalar_reg_broadcasts():
    p_scalar, X = instance("softmax", reg=0.7)
    p_matrix = MatrixSoftmaxRegression(p_scalar.A1, p_scalar.A2, p_scalar.B, jnp.full((N1, N2), 0.7), 0.3)
    assert p_scalar.reg.shape == (N1, N2)
    np.testing.assert_allclose(p_scalar.hessian(X), p_matrix.hessian(X), rtol=1e-14)


def test_rescaled_overflow_gives_nan():
    problem, X = instance("rescaled", dtype=jnp.float32)
    X = X + 200.0  # logits far beyond log(float32 max) ~ 88
    assert not bool(problem.in_domain(X))
    for out in (problem.loss(X), problem.grad(X), problem.hessian(X)):
        assert np.all(np.isnan(out))
    assert bool(instance("rescaled")[0].in_domain(instance("rescaled")[1]))


def test_bad_inputs():
    A1, A2, B = jnp.ones((N1, D1)), jnp.ones((N2, D2)), jnp.ones((N1, N2))
    with pytest.raises(ValueError, match=r"B \(rows of A1 x rows of A2\) must have shape \(5, 4\)"):
        MatrixSoftmaxRegression(A1, A2, B.T)
    with pytest.raises(ValueError, match=r"reg must be nonnegative"):
        MatrixSoftmaxRegression(A1, A2, B, reg=-1.0)
    with pytest.raises(ValueError, match=r"reg \(a scalar or an array\) must have shape \(5, 4\)"):
        MatrixSoftmaxRegression(A1, A2, B, reg=jnp.ones(N1))
    with pytest.raises(ValueError, match=r"ridge must be nonnegative"):
        MatrixSoftmaxRegression(A1, A2, B, ridge=-0.1)
    with pytest.raises(ValueError, match=r"link must be one of"):
        MatrixRescaledRegression(A1, A2, B, link="tanh")
    problem = MatrixSoftmaxRegression(A1, A2, B)
    with pytest.raises(ValueError, match=r"X must have shape \(3, 2\)"):
        problem.loss(jnp.ones((D2, D1)))
    with pytest.raises(ValueError, match=r"V must have shape \(3, 2\)"):
        problem.hvp(jnp.ones((D1, D2)), jnp.ones(D1 * D2))


@pytest.mark.parametrize("name", ["matrix_softmax", "matrix_rescaled"])
def test_generators_plant_a_zero_residual_solution(name):
    inst = make(name, jax.random.PRNGKey(0), n=6, d=3, reg=0.0)
    assert inst.x0.shape == inst.solution.shape == (3, 3)
    assert float(inst.problem.loss(inst.solution)) < 1e-25
    assert float(jnp.linalg.norm(inst.problem.grad(inst.solution))) < 1e-12
    assert float(inst.problem.loss(inst.x0)) > 1e-6
