"""Reparametrised least squares w = u∘u - v∘v: derivatives, the implicit-bias limit argmin Q_α against an
independent primal solve, its α -> 0 and α -> ∞ limits, gradient descent reaching it up to an O(step)
bias, jit / vmap, bad input, and the implicit_bias study."""
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.optimize

import attnopt
from attnopt import experiments
from attnopt.implicit_bias import implicit_bias
from attnopt.problems.registry import make
from attnopt.problems.reparametrized import (
    ReparametrizedLeastSquares,
    ReparametrizedParams,
    balanced_factors,
    hyperbolic_entropy,
)
from attnopt.solvers import get, solve

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Sizes differ, so a transposed X fails.
N, D = 4, 9


def instance(seed=0, alpha=0.1, dtype="float64", **options):
    return make("reparametrized_least_squares", jax.random.PRNGKey(seed), n=N, d=D, alpha=alpha, dtype=dtype, **options)


def null_space_reference(problem, alpha):
    """argmin Q_α(w) s.t. X w = y in the primal: w = X^+ y + N z with N a basis of null(X), minimised
    over z: SciPy's MINPACK hybrid method finds the root of the gradient N^T arcsinh(w / 2α^2), with
    its Jacobian, the Hessian N^T diag(1 / sqrt(4α^4 + w^2)) N; returns w and the final gradient
    relative to the first."""
    X, y = np.asarray(problem.X, float), np.asarray(problem.y, float)
    w0, basis, c = np.linalg.pinv(X) @ y, scipy.linalg.null_space(X), 2 * alpha**2
    w = lambda z: w0 + basis @ z
    gradient = lambda z: basis.T @ np.arcsinh(w(z) / c)
    z0 = np.zeros(basis.shape[1])
    out = scipy.optimize.root(gradient, z0, jac=lambda z: basis.T @ (basis / np.sqrt(c * c + w(z) ** 2)[:, None]),
                              method="hybr", options={"xtol": 1e-14})
    return w(out.x), np.linalg.norm(gradient(out.x)) / np.linalg.norm(gradient(z0))


def relative(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_derivatives_match_autodiff(dtype):
    problem, x0, _ = instance(dtype=dtype)
    x = ReparametrizedParams(*(leaf + 0.5 * jax.random.normal(k, leaf.shape, leaf.dtype)
                               for leaf, k in zip(x0, jax.random.split(jax.random.PRNGKey(10)))))
    report = attnopt.check_derivatives(problem, x)
    assert set(report.errors) == {"grad", "hvp", "hessian"}
    assert report.rtol == (1e-10 if dtype == "float64" else 1e-4) and report.ok, str(report)
    assert problem.hessian(x).shape == (2 * D, 2 * D) and problem.hessian(x).dtype == jnp.dtype(dtype)


@pytest.mark.parametrize("alpha", [1e-3, 1.0, 1e2])
def test_planted_solution_is_the_balanced_factorisation_of_w_star(alpha):
    problem, x0, solution = instance(4, alpha=alpha)
    u, v = solution
    w_star = problem.weights(solution)
    assert int(jnp.sum(w_star != 0)) == 3 and float(problem.loss(solution)) <= 1e-24 * max(1.0, alpha**4)
    np.testing.assert_allclose(u * v, alpha**2, rtol=1e-14)
    np.testing.assert_array_equal(problem.weights(x0), 0.0)
    # the factorisation inverts u∘u - v∘v for any w, including where |w| dwarfs α^2 (no cancellation)
    w = jnp.asarray([-1e3, -1.0, -1e-9, 0.0, 1e-9, 1.0, 1e3])
    factors = balanced_factors(w, alpha)
    assert bool(jnp.all(factors.u >= 0) & jnp.all(factors.v >= 0))
    np.testing.assert_allclose(factors.u * factors.v, alpha**2, rtol=1e-14)
    np.testing.assert_allclose(factors.u**2 - factors.v**2, w, rtol=1e-13, atol=1e-15 * max(1.0, alpha**2))


@pytest.mark.parametrize("alpha", [0.03, 0.3, 3.0])
def test_limit_matches_an_independent_primal_solve(alpha):
    problem = instance(1).problem
    limit = problem.implicit_bias_limit(alpha)
    assert bool(limit.converged)
    reference, stationarity = null_space_reference(problem, alpha)
    assert stationarity <= 1e-10
    assert relative(limit.w, reference) <= 1e-8
    # and no other solution of X w = y has a smaller Q_α (Q_α is convex: compare along segments too)
    others = jnp.stack([problem.min_l1(), problem.min_l2(), problem.weights(instance(1).solution)])
    segments = limit.w + jnp.asarray([1e-3, 0.1, 1.0])[:, None, None] * (others - limit.w)
    assert bool(jnp.all(hyperbolic_entropy(segments, alpha) >= hyperbolic_entropy(limit.w, alpha)))


def test_limit_is_feasible_and_stationary_from_alpha_1e_3_to_1e2():
    alphas = jnp.geomspace(1e-3, 1e2, 11)
    for seed in range(3):
        problem = instance(seed).problem
        limits = jax.vmap(problem.implicit_bias_limit)(alphas)
        assert bool(jnp.all(limits.converged)) and float(jnp.max(limits.residual)) <= 1e-12
        X = np.asarray(problem.X)
        project = np.eye(D) - np.linalg.pinv(X) @ X  # onto null(X): the stationarity residual of ∇Q_α ∈ range(X^T)
        for alpha, w in zip(np.asarray(alphas), np.asarray(limits.w)):
            gradient = np.arcsinh(w / (2 * alpha**2))
            assert np.linalg.norm(project @ gradient) <= 1e-11 * np.linalg.norm(gradient)
            np.testing.assert_allclose(X @ w, np.asarray(problem.y), rtol=0, atol=1e-12 * np.linalg.norm(problem.y))
        # float32: the same limits to float32 accuracy
        single = ReparametrizedLeastSquares(problem.X.astype(jnp.float32), problem.y.astype(jnp.float32))
        limits32 = jax.vmap(single.implicit_bias_limit)(alphas.astype(jnp.float32))
        assert limits32.w.dtype == jnp.float32 and bool(jnp.all(limits32.converged))
        for w32, w in zip(np.asarray(limits32.w), np.asarray(limits.w)):
            assert relative(w32, w) <= 1e-4


@pytest.mark.parametrize("seed", range(3))
def test_limit_tends_to_the_min_l1_and_min_l2_solutions(seed):
    problem = instance(seed).problem
    l1, l2 = problem.min_l1(), problem.min_l2()
    limits = jax.vmap(problem.implicit_bias_limit)(jnp.asarray([1e-1, 1e-2, 1e-4, 1e-8, 1e-12, 10.0, 100.0]))
    assert bool(jnp.all(limits.converged))
    small, large = limits.w[:5], limits.w[5:]
    excess = np.asarray(jnp.sum(jnp.abs(small), axis=1) / jnp.sum(jnp.abs(l1)) - 1)  # ||w_α||_1 / min - 1
    distance = np.array([relative(w, l1) for w in small])
    assert np.all(excess >= -1e-12) and np.all(np.diff(distance) < 0)
    assert excess[-1] <= 1e-2 * excess[0] and distance[-1] <= 0.1 * distance[0]
    # Large α: Q_α(w) = sum w^2/(4α^2) - w^4/(192 α^6) + ..., so the limit leaves X^+ y by O(α^-4).
    gaps = [relative(w, l2) for w in large]
    assert gaps[0] <= 1e-4 and 0.5e4 <= gaps[0] / gaps[1] <= 2e4


def test_min_l1_and_min_l2_are_the_minimum_norm_solutions():
    problem, _, solution = instance(3)
    w_star = problem.weights(solution)
    X, y = np.asarray(problem.X), np.asarray(problem.y)
    l1, l2 = np.asarray(problem.min_l1()), np.asarray(problem.min_l2())
    np.testing.assert_allclose(l2, np.linalg.pinv(X) @ y, rtol=1e-12)
    np.testing.assert_allclose(X @ l1, y, atol=1e-12)
    # every other solution of X w = y: random ones, w*, and the limits are no shorter in l1 (in l2 than l2)
    basis = scipy.linalg.null_space(X)
    others = [l2 + basis @ z for z in np.random.default_rng(0).normal(size=(200, D - N))]
    limits = jax.vmap(problem.implicit_bias_limit)(jnp.geomspace(1e-3, 1e2, 11))
    others += [np.asarray(w_star)] + list(np.asarray(limits.w))
    assert min(np.abs(w).sum() for w in others) >= np.abs(l1).sum() - 1e-12
    assert min(np.linalg.norm(w) for w in others) >= np.linalg.norm(l2) - 1e-12


def test_gradient_descent_reaches_the_limit_up_to_a_bias_proportional_to_the_step():
    alpha = 0.1
    problem, x0, _ = instance(0, alpha=alpha)
    limit = np.asarray(problem.implicit_bias_limit(alpha).w)
    rates = jnp.asarray([2e-3, 1e-3])
    run = lambda eta: solve(problem, x0, get("sgd", learning_rate=eta), max_steps=400_000, tol=1e-12)
    runs = jax.vmap(run)(rates)
    assert bool(jnp.all(runs.converged))
    w = np.asarray(jax.vmap(problem.weights)(runs.state.params))
    np.testing.assert_allclose(w @ np.asarray(problem.X).T, np.broadcast_to(problem.y, (2, N)), atol=1e-11)
    gaps = [relative(wk, limit) for wk in w]
    assert gaps[0] <= 1e-2 and 1.8 <= gaps[0] / gaps[1] <= 2.2
    # the bias is first order in the step: Richardson extrapolation 2 w(η/2) - w(η) removes most of it
    assert relative(2 * w[1] - w[0], limit) <= 0.1 * gaps[1]


def test_jit_and_vmap_over_stacked_instances_and_alphas():
    problems = [instance(seed).problem for seed in range(3)]
    batch = attnopt.stack(problems)
    alphas = jnp.asarray([1e-3, 0.1, 10.0])
    batched = jax.jit(jax.vmap(lambda p, a: p.implicit_bias_limit(a)))(batch, alphas)
    l1 = jax.jit(jax.vmap(lambda p: p.min_l1()))(batch)
    l2 = jax.vmap(lambda p: p.min_l2())(batch)
    for i, (problem, alpha) in enumerate(zip(problems, alphas)):
        np.testing.assert_allclose(batched.w[i], problem.implicit_bias_limit(alpha).w, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(l1[i], problem.min_l1(), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(l2[i], problem.min_l2(), rtol=1e-12, atol=1e-14)


def test_bad_input_raises_value_error_naming_it():
    problem = instance(0).problem
    X, y = np.asarray(problem.X), np.asarray(problem.y)
    with_nan = X.copy()
    with_nan[0, 0] = np.nan
    square, repeated_row = np.vstack([X, X[:1]])[:, :N + 1], np.vstack([X[:-1], X[:1]])
    cases = {"X": [X.T, square, with_nan, repeated_row], "y": [y[:-1], np.append(y[:-1], np.inf)]}
    for name, values in cases.items():
        for value in values:
            with pytest.raises(ValueError, match=rf"^{name}\b"):
                ReparametrizedLeastSquares(**({"X": X, "y": y} | {name: value}))
    with pytest.raises(ValueError, match=re.escape("params[1] (v)")):
        problem.loss((jnp.ones(D), jnp.ones(D + 1)))
    with pytest.raises(ValueError, match="pair"):
        problem.grad(jnp.ones(D))
    for alpha in (0.0, -1.0, np.inf, np.nan, jnp.ones(2)):
        with pytest.raises(ValueError, match="^alpha"):
            problem.implicit_bias_limit(alpha)
    traced = jax.vmap(problem.implicit_bias_limit)(jnp.asarray([-1.0, 1.0]))
    assert not bool(traced.converged[0]) and bool(jnp.all(jnp.isnan(traced.w[0]))) and bool(traced.converged[1])
    for options, name in (({"n": D}, "n"), ({"alpha": 0.0}, "alpha"), ({"nonzeros": D + 1}, "nonzeros"),
                          ({"dtype": "float16"}, "dtype")):
        with pytest.raises(ValueError, match=rf"^{name}\b"):
            make("reparametrized_least_squares", jax.random.PRNGKey(0), **({"n": N, "d": D} | options))


def test_implicit_bias_study_and_config():
    results, figure = implicit_bias(alphas=[1e-2, 1.0, 100.0], instances=2, max_steps=200_000)
    rows = results["per_alpha"]
    assert results["gd_converged"] == results["runs"] == 6 and results["limit_converged"]
    assert all(r["gd_max_residual"] <= 1e-8 and r["gd_to_limit"]["p90"] <= 1e-2 for r in rows)
    to_l1 = [r["gd_to_min_l1"]["median"] for r in rows]
    to_l2 = [r["gd_to_min_l2"]["median"] for r in rows]
    assert to_l1[0] < to_l1[-1] and to_l2[0] > to_l2[1] > to_l2[2] and to_l2[2] <= 1e-6
    assert len(figure.axes) == 2
    config = experiments.load_config(ROOT / "configs" / "implicit_bias.toml")
    assert config.kind == "implicit_bias" and config.settings["max_steps"] >= 10**6
    for bad, name in (({"alphas": [1.0, -1.0]}, r"alphas\[1\]"), ({"n": 12, "d": 12}, "n"),
                      ({"learning_rate": 2.5}, "learning_rate"), ({"max_steps": 0}, "max_steps")):
        with pytest.raises(ValueError, match=f"^{name}"):
            implicit_bias(**bad)
