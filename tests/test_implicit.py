"""Gradients through a solve (implicit function theorem) against finite differences and unrolled Newton."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from attnopt.problems.registry import make
from attnopt.solvers import Status, alternating, newton, normalized_gd, solve


def softmax_case():
    inst = make("softmax", jax.random.key(0), n=12, d=3, reg=0.3, ridge=1e-2, noise=0.2, scale=2.0)
    return inst.problem, inst.x0, "b", newton()


def matrix_case():
    inst = make("matrix_softmax", jax.random.key(1), n=5, d=2, reg=0.3, ridge=1e-2, noise=0.2, scale=2.0)
    return inst.problem, inst.x0, "B", newton()


def attention_case():
    inst = make("attention", jax.random.key(2), n=6, d=2, noise=0.05, start="near")
    return inst.problem, inst.x0, "B", alternating()


CASES = {"softmax": softmax_case, "matrix": matrix_case, "attention": attention_case}


def solution(problem, x0, solver):
    return solve(problem, x0, solver, max_steps=100, tol=1e-12).state


def objective(problem, x0, field, solver, weights):
    """A scalar function of the solution and of the optimal value, of the data field."""

    def f(data):
        state = solution(problem.replace(**{field: data}), x0, solver)
        return ravel_pytree(state.params)[0] @ weights + 0.5 * state.value

    return f


def unrolled(problem, x0, field, weights, steps=25):
    """The same function through plain Newton steps x <- x - H^{-1} g, differentiated by autodiff.
    Starts from the converged point, so the unrolled iteration is at its fixed point."""
    x_star = solution(problem, x0, newton()).params

    def f(data):
        p = problem.replace(**{field: data})
        flat, unravel = ravel_pytree(x_star)
        for _ in range(steps):
            flat = flat - jnp.linalg.solve(p.hessian(unravel(flat)), ravel_pytree(p.grad(unravel(flat)))[0])
        return flat @ weights + 0.5 * p.loss(unravel(flat))

    return f


@pytest.mark.parametrize("case", CASES)
def test_gradient_matches_finite_differences(case):
    problem, x0, field, solver = CASES[case]()
    data = getattr(problem, field)
    size = ravel_pytree(solution(problem, x0, solver).params)[0].size
    weights = jax.random.normal(jax.random.key(9), (size,), data.dtype)
    f = objective(problem, x0, field, solver, weights)
    grad = np.asarray(jax.grad(f)(data))
    assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 1e-6
    rng = np.random.default_rng(0)
    for _ in range(3):
        direction = rng.standard_normal(data.shape)
        central = lambda h: (float(f(data + h * direction)) - float(f(data - h * direction))) / (2 * h)
        fd = (4 * central(5e-6) - central(1e-5)) / 3  # Richardson: O(h^4) truncation error
        np.testing.assert_allclose(np.sum(grad * direction), fd, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("case", ["softmax", "matrix"])
def test_gradient_matches_unrolled_newton(case):
    problem, x0, field, solver = CASES[case]()
    data = getattr(problem, field)
    size = ravel_pytree(x0)[0].size
    weights = jax.random.normal(jax.random.key(10), (size,), data.dtype)
    ours = jax.grad(objective(problem, x0, field, solver, weights))(data)
    reference = jax.grad(unrolled(problem, x0, field, weights))(data)
    np.testing.assert_allclose(ours, reference, rtol=1e-8, atol=1e-12)


def test_jacobian_and_vmap_compose():
    problem, x0, field, solver = softmax_case()
    jac = jax.jacrev(lambda b: solution(problem.replace(b=b), x0, solver).params)(problem.b)
    assert jac.shape == (3, 12) and np.all(np.isfinite(jac))
    bs = jnp.stack([problem.b, jnp.roll(problem.b, 1), problem.b * 1.1])
    weights = jnp.arange(1.0, 4.0)
    f = objective(problem, x0, field, solver, weights)
    batched = jax.vmap(jax.grad(f))(bs)
    for k in range(3):
        np.testing.assert_allclose(batched[k], jax.grad(f)(bs[k]), rtol=1e-10, atol=1e-14)


def test_nonconverged_solve_gives_nan_gradient():
    problem, x0, field, _ = softmax_case()

    def f(b):
        result = solve(problem.replace(b=b), x0, newton(), max_steps=1, tol=1e-12)
        return jnp.sum(result.state.params), result.status

    grad, status = jax.grad(f, has_aux=True)(problem.b)
    assert Status(int(status)) == Status.MAX_STEPS
    assert np.all(np.isnan(grad))
    # A whole-budget run (tol = 0) is not a converged point either.
    g = jax.grad(lambda b: jnp.sum(solve(problem.replace(b=b), x0, normalized_gd(0.1), max_steps=3, tol=0.0).state.params))
    assert np.all(np.isnan(g(problem.b)))
