"""Attention regression L(X, Y): a dense-Kronecker oracle, Hessian block layout, the Y solve, bad input.

Derivatives vs autodiff, jit, vmap, NaN/shape input and the domain of every
registered problem are in test_problem_conformance.py; the sizes here all
differ, so a transposed factor or a swapped block fails.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import attnopt
from attnopt.problems.attention import AttentionParams, AttentionRegression
from attnopt.problems.registry import make

# All sizes differ, so a transposed factor or a swapped block fails.
N, N2, D1, D2, D3, M = 6, 5, 3, 2, 4, 3


def instance(seed=0, scale=0.7):
    k = jax.random.split(jax.random.PRNGKey(seed), 6)
    problem = AttentionRegression(
        jax.random.normal(k[0], (N, D1)),
        jax.random.normal(k[1], (N2, D2)),
        jax.random.normal(k[2], (N2, D3)),
        jax.random.normal(k[3], (N, M)),
    )
    params = AttentionParams(
        scale * jax.random.normal(k[4], (D1, D2)), jax.random.normal(k[5], (D3, M)) / D3**0.5
    )
    return problem, params


def dense_loss(problem, flat):
    """L written from scratch on the ravelled (X, Y), with the dense Kronecker matrix (an independent oracle)."""
    x, y = flat[: D1 * D2], flat[D1 * D2:]
    Z = (jnp.kron(problem.A1, problem.A2) @ x).reshape(N, N2)
    E = jnp.exp(Z - Z.max(axis=1, keepdims=True))
    R = (E / E.sum(axis=1, keepdims=True)) @ problem.A3 @ y.reshape(D3, M) - problem.B
    return 0.5 * jnp.sum(R * R)


@pytest.mark.parametrize("seed,scale", [(3, 0.7), (1, 2.0)])
def test_matches_dense_reference_and_block_layout(seed, scale):
    problem, params = instance(seed, scale)
    flat, unravel = ravel_pytree(params)
    f = lambda z: dense_loss(problem, z)
    H = jax.hessian(f)(flat)
    nx = D1 * D2
    np.testing.assert_allclose(problem.loss(params), f(flat), rtol=1e-12)
    np.testing.assert_allclose(ravel_pytree(problem.grad(params))[0], jax.grad(f)(flat), rtol=1e-10, atol=1e-13)
    ours = problem.hessian(params)
    assert ours.shape == (nx + D3 * M,) * 2
    np.testing.assert_allclose(ours, H, rtol=1e-10, atol=1e-12 * np.abs(H).max())
    np.testing.assert_allclose(problem.hessian_x(params), H[:nx, :nx], rtol=1e-10, atol=1e-12 * np.abs(H).max())
    P = jax.nn.softmax(problem.A1 @ params.X @ problem.A2.T, axis=-1) @ problem.A3
    np.testing.assert_allclose(ours[nx:, nx:], np.kron(P.T @ P, np.eye(M)), rtol=1e-12, atol=1e-14)
    v = unravel(jax.random.normal(jax.random.PRNGKey(7), flat.shape))
    np.testing.assert_allclose(ravel_pytree(problem.hvp(params, v))[0], H @ ravel_pytree(v)[0], rtol=1e-10, atol=1e-12)


def test_params_structure_is_preserved():
    problem, params = instance()
    as_tuple = tuple(params)
    g_tuple, g_named = problem.grad(as_tuple), problem.grad(params)
    assert type(g_tuple) is tuple and isinstance(g_named, AttentionParams)
    assert type(problem.hvp(as_tuple, as_tuple)) is tuple
    np.testing.assert_allclose(g_tuple[0], g_named.X, rtol=1e-15)
    assert g_named.X.shape == (D1, D2) and g_named.Y.shape == (D3, M)


def test_solve_y_is_the_least_squares_minimiser():
    problem, params = instance(4)
    Y = problem.solve_y(params.X)
    P = np.asarray(jax.nn.softmax(problem.A1 @ params.X @ problem.A2.T, axis=-1) @ problem.A3)
    np.testing.assert_allclose(Y, np.linalg.lstsq(P, np.asarray(problem.B), rcond=None)[0], rtol=1e-9, atol=1e-11)
    assert float(jnp.linalg.norm(problem.grad((params.X, Y))[1])) < 1e-12
    assert problem.loss((params.X, Y)) < problem.loss(params)


def test_solve_y_and_hessian_x_under_jit_and_vmap():
    pairs = [instance(seed) for seed in range(3)]
    problems = attnopt.stack([p for p, _ in pairs])
    params = jax.tree.map(lambda *a: jnp.stack(a), *[x for _, x in pairs])
    fn = lambda p, x: (p.solve_y(x.X), p.hessian_x(x))
    batched = jax.jit(jax.vmap(fn))(problems, params)
    for i, (p, x) in enumerate(pairs):
        for b, s in zip(batched, fn(p, x)):
            np.testing.assert_allclose(b[i], s, rtol=1e-10, atol=1e-12)


def test_bad_inputs():
    A1, A2, A3, B = jnp.ones((N, D1)), jnp.ones((N2, D2)), jnp.ones((N2, D3)), jnp.ones((N, M))
    with pytest.raises(ValueError, match=r"A3 \(A2 has 5 rows\) must have shape \(5, \?\)"):
        AttentionRegression(A1, A2, jnp.ones((N, D3)), B)
    with pytest.raises(ValueError, match=r"B \(A1 has 6 rows\) must have shape \(6, \?\)"):
        AttentionRegression(A1, A2, A3, jnp.ones((N2, M)))
    problem = AttentionRegression(A1, A2, A3, B)
    X, Y = jnp.zeros((D1, D2)), jnp.zeros((D3, M))
    with pytest.raises(ValueError, match=r"params\[0\] \(X\) must have shape \(3, 2\)"):
        problem.loss((X.T, Y))
    with pytest.raises(ValueError, match=r"params\[1\] \(Y\) must have shape \(4, 3\)"):
        problem.grad((X, Y.T))
    with pytest.raises(ValueError, match=r"must be a pair \(X, Y\)"):
        problem.loss((X, Y, Y))
    with pytest.raises(ValueError, match=r"v\[0\] \(X\) must have shape"):
        problem.hvp((X, Y), (Y, Y))
    with pytest.raises(ValueError, match=r"X must have shape \(3, 2\)"):
        problem.solve_y(Y)


def test_generator_plants_a_zero_residual_solution():
    inst = make("attention", jax.random.PRNGKey(0), n=7, d=3)
    assert isinstance(inst.x0, AttentionParams) and float(jnp.abs(inst.x0.X).max()) == 0.0
    assert float(inst.problem.loss(inst.solution)) < 1e-28
    assert float(inst.problem.loss(inst.x0)) > 1e-3
    noisy = make("attention", jax.random.PRNGKey(0), n=7, d=3, noise=0.1)
    assert float(noisy.problem.loss(noisy.solution)) > 1e-6
    near = make("attention", jax.random.PRNGKey(0), n=7, d=3, start="near", start_noise=0.1)
    distance = float(jnp.linalg.norm(near.x0.X - near.solution.X) / jnp.linalg.norm(near.solution.X))
    assert 0.0 < distance < 0.5
    with pytest.raises(ValueError, match="start must be"):
        make("attention", jax.random.PRNGKey(0), start="far")
