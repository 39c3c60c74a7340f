"""Trust-region Newton: the subproblem solvers, the radius rule, lazy Hessians, and solves on hard instances."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.flatten_util import ravel_pytree

from attnopt.problems.base import Problem, stack
from attnopt.problems.registry import make
from attnopt.problems.regression import SoftmaxRegression
from attnopt.solvers.loop import solve
from attnopt.solvers.newton import newton
from attnopt.solvers.newton_cg import truncated_cg
from attnopt.solvers.state import Status
from attnopt.solvers.trust_region import eigen_step, trust_region


def grad_norm(problem, params):
    return float(np.linalg.norm(ravel_pytree(problem.grad(params))[0]))


def model(H, g, p):
    return g @ p + 0.5 * p @ H @ p


def assert_global_minimiser(H, g, p, radius, boundary, rtol):
    """Moré-Sorensen: p minimises m over the ball iff (H + σ I) p = -g, σ >= 0, σ (Δ - ||p||) = 0, H + σ I PSD."""
    H, g, p = (np.asarray(a, np.float64) for a in (H, g, p))
    scale = np.abs(np.linalg.eigvalsh(H)).max() + np.linalg.norm(g) / radius
    sigma = -(p @ (H @ p + g)) / (p @ p) if p @ p > 0 else 0.0
    residual = np.linalg.norm(H @ p + sigma * p + g)
    assert residual <= rtol * (np.linalg.norm(g) + scale * np.linalg.norm(p)), residual
    assert sigma >= -rtol * scale and np.linalg.eigvalsh(H + sigma * np.eye(len(g)))[0] >= -rtol * scale
    assert np.linalg.norm(p) <= radius * (1 + rtol)
    if boundary:
        assert abs(np.linalg.norm(p) - radius) <= rtol * radius
    else:
        assert sigma <= rtol * scale


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(1, 6), seed=st.integers(0, 2**31 - 1), log_scale=st.floats(-4, 3),
    log_radius=st.floats(-3, 3), hard=st.booleans(),
)
def test_eigen_step_is_the_global_minimiser(size, seed, log_scale, log_radius, hard):
    rng = np.random.default_rng(seed)
    M = rng.normal(size=(size, size))
    H = (M + M.T) * 10.0**log_scale
    lam, Q = np.linalg.eigh(H)
    g = rng.normal(size=size)
    if hard:  # g orthogonal to the eigenvector of the smallest eigenvalue
        g -= Q[:, 0] * (Q[:, 0] @ g)
    radius = 10.0**log_radius
    p, boundary = eigen_step(jnp.asarray(lam), jnp.asarray(Q), jnp.asarray(g), radius)
    assert_global_minimiser(H, g, p, radius, bool(boundary), rtol=1e-6)


def test_eigen_step_hard_case_and_float32():
    H = np.diag([-1.0, 1.0, 2.0])
    g = np.array([0.0, 1.0, 1.0])  # no component on the negative eigenvector; ||p(σ=1)|| = 0.60 < Δ
    for dtype, rtol in ((jnp.float64, 1e-8), (jnp.float32, 1e-4)):
        lam, Q = jnp.linalg.eigh(jnp.asarray(H, dtype))
        p, boundary = eigen_step(lam, Q, jnp.asarray(g, dtype), 2.0)
        assert p.dtype == dtype and bool(boundary)
        assert abs(float(p[0])) > 1.5  # the step follows the negative curvature
        assert_global_minimiser(H, g, p, 2.0, True, rtol)
    # Positive definite and a large radius: the Newton step, interior.
    lam, Q = jnp.linalg.eigh(jnp.asarray(H + 2 * np.eye(3)))
    p, boundary = eigen_step(lam, Q, jnp.asarray(g), 10.0)
    np.testing.assert_allclose(p, -np.linalg.solve(H + 2 * np.eye(3), g), rtol=1e-12)
    assert not bool(boundary)


@pytest.mark.parametrize("seed", range(4))
def test_steihaug_cg_stays_in_the_ball_and_beats_the_cauchy_point(seed):
    rng = np.random.default_rng(seed)
    M = rng.normal(size=(8, 8))
    H, g = (M + M.T) / 2, rng.normal(size=8)
    for radius in (0.01, 0.3, 100.0):
        cg = truncated_cg(lambda v: jnp.asarray(H) @ v, jnp.asarray(g), 8, radius)
        p = np.asarray(cg.p)
        assert np.linalg.norm(p) <= radius * (1 + 1e-12)
        assert bool(cg.boundary) == bool(np.isclose(np.linalg.norm(p), radius, rtol=1e-10))
        np.testing.assert_allclose(cg.residual, H @ p + g, atol=1e-10)
        curvature = g @ H @ g
        t = radius / np.linalg.norm(g)
        if curvature > 0:
            t = min(t, (g @ g) / curvature)
        assert model(H, g, p) <= model(H, g, -t * g) + 1e-12


def hard_instance(seed):
    """The issue's hard softmax regression (cond 100, reg 1e-3, noise 0.3, |x*| about 6), at n=1024, d=16."""
    return make("softmax", jax.random.PRNGKey(seed), n=1024, d=16, cond=100.0, reg=1e-3, noise=0.3, scale=6.0)


def indefinite_instance(seed):
    """Unregularised: indefinite Hessians along the way (the issue's approx_newton stall)."""
    return make("softmax", jax.random.PRNGKey(seed), n=2048, d=32, scale=6.0)


@pytest.mark.parametrize("subproblem", ["exact", "cg"])
@pytest.mark.parametrize("seed", [1, 2])
def test_reaches_tolerance_on_indefinite_instance(subproblem, seed):
    inst = indefinite_instance(seed)
    H0 = inst.problem.hessian(inst.x0 + 0.1 * inst.solution)
    assert np.linalg.eigvalsh(np.asarray(H0))[0] < 0
    result = solve(inst.problem, inst.x0, trust_region(subproblem), max_steps=200, tol=1e-9)
    assert Status(int(result.status)) == Status.CONVERGED, Status(int(result.status)).name
    assert grad_norm(inst.problem, result.state.params) <= 1e-9
    H = np.linalg.eigvalsh(np.asarray(inst.problem.hessian(result.state.params)))
    assert H[0] > -1e-9 * H[-1]  # a minimiser, not a saddle


@pytest.mark.parametrize("options", [{}, {"max_reuse": 0}, {"subproblem": "cg"}], ids=str)
@pytest.mark.parametrize("seed", range(2))
def test_reaches_tolerance_on_attention_regression(options, seed):
    inst = make("attention", jax.random.key(seed), start="near")
    result = solve(inst.problem, inst.x0, trust_region(**options), max_steps=200, tol=1e-9)
    assert Status(int(result.status)) == Status.CONVERGED, Status(int(result.status)).name
    assert grad_norm(inst.problem, result.state.params) <= 1e-9
    assert result.state.params[0].shape == inst.x0[0].shape


def test_hard_instance_and_lazy_hessians():
    """Same solution with and without lazy Hessians; with them, fewer Hessians than steps."""
    inst = hard_instance(4)
    fresh = solve(inst.problem, inst.x0, trust_region(max_reuse=0), max_steps=200, tol=1e-10)
    lazy = solve(inst.problem, inst.x0, trust_region(max_reuse=8), max_steps=200, tol=1e-10)
    for result in (fresh, lazy):
        assert bool(result.converged) and grad_norm(inst.problem, result.state.params) <= 1e-10
    np.testing.assert_allclose(lazy.state.params, fresh.state.params, atol=1e-6)
    # Count Hessians by stepping: age 1 means the step built its model.
    solver = trust_region(max_reuse=8)
    state, step = solver.init(inst.problem, inst.x0), jax.jit(solver.step)
    ages = []
    while float(jnp.linalg.norm(state.grad)) > 1e-10 and len(ages) < 200:
        state = step(inst.problem, state)
        ages.append(int(state.inner.age))
    assert max(ages) > 1 and sum(a == 1 for a in ages) < len(ages)
    assert all(a <= 9 for a in ages)


def test_radius_rule_and_rho_in_inner_state():
    inst = hard_instance(3)
    solver = trust_region(max_reuse=0)
    state, step = solver.init(inst.problem, inst.x0), jax.jit(solver.step)
    assert float(state.inner.radius) == 1.0 and np.isnan(float(state.inner.rho))
    seen = set()
    for _ in range(12):
        new = step(inst.problem, state)
        assert Status(int(new.status)) == Status.RUNNING
        rho, radius, length = float(new.inner.rho), float(state.inner.radius), float(new.step_size)
        assert rho > 1e-4 and float(new.value) <= float(state.value) + 1e-15
        if int(new.inner.trials) == 1:  # no rejection in between: the rule applies to the step taken
            assert length <= radius * (1 + 1e-8)
            if rho < 0.25:
                expected, case = length / 4, "shrink"
            elif rho > 0.75 and np.isclose(length, radius, rtol=1e-6):
                expected, case = 2 * radius, "expand"
            else:
                expected, case = radius, "keep"
            np.testing.assert_allclose(float(new.inner.radius), expected, rtol=1e-6)
            seen.add(case)
        else:
            assert float(new.inner.radius) < radius
            seen.add("rejected")
        state = new
    assert {"expand", "rejected"} <= seen, seen


class _Saddle(Problem):
    """``1/2 (x_2^2 - x_1^2) + 1/4 x_1^4``: a saddle at 0 (gradient exactly 0), minima at x_1 = ±1."""

    leaves = ("scale",)

    def __init__(self, scale=1.0):
        self._set(scale=jnp.asarray(scale, jnp.float64))

    def loss(self, x):
        return self.scale * (0.5 * (x[1] ** 2 - x[0] ** 2) + 0.25 * x[0] ** 4)


def test_leaves_a_saddle_point_where_newton_stays():
    x0 = jnp.zeros(2)
    tr = solve(_Saddle(), x0, trust_region(), max_steps=30, tol=0.0)
    assert abs(abs(float(tr.state.params[0])) - 1) < 1e-8 and abs(float(tr.state.params[1])) < 1e-8
    stuck = solve(_Saddle(), x0, newton(), max_steps=5, tol=0.0)
    np.testing.assert_array_equal(stuck.state.params, x0)


def test_vmap_equals_single_solves_and_float32():
    insts = [hard_instance(seed) for seed in (0, 3)]
    run = jax.jit(jax.vmap(lambda p, x: solve(p, x, trust_region(), max_steps=100, tol=1e-9)))
    batched = run(stack([i.problem for i in insts]), jnp.stack([i.x0 for i in insts]))
    # ρ of the last steps is a ratio of rounding-level differences, and batched products round differently.
    without_rho = lambda r: r._replace(state=r.state._replace(inner=r.state.inner._replace(rho=None)))
    for k, inst in enumerate(insts):
        single = solve(inst.problem, inst.x0, trust_region(), max_steps=100, tol=1e-9)
        mine = jax.tree.map(lambda leaf: leaf[k], batched)
        chex.assert_trees_all_close(without_rho(mine), without_rho(single), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(mine.state.inner.rho, single.state.inner.rho, rtol=1e-2)
    assert int(batched.steps[0]) != int(batched.steps[1])
    inst = make("softmax", jax.random.key(0), n=256, d=8, cond=10.0, reg=0.1, noise=0.1, scale=3.0, dtype="float32")
    for subproblem in ("exact", "cg"):
        result = solve(inst.problem, inst.x0, trust_region(subproblem), max_steps=100, tol=1e-5)
        assert bool(result.converged) and result.state.params.dtype == jnp.float32


class _NaNCurvature(SoftmaxRegression):
    def hessian(self, x):
        return jnp.full((x.size, x.size), jnp.nan)

    def hessian_operator(self, x):
        return lambda v: jnp.full_like(v, jnp.nan)


@pytest.mark.parametrize("subproblem", ["exact", "cg"])
def test_nonfinite_curvature_is_nonfinite(subproblem):
    p = make("softmax", jax.random.key(0), n=64, d=4, reg=0.1, noise=0.1).problem
    p = _NaNCurvature(p.A, p.b, 0.1)
    result = solve(p, jnp.full(4, 0.3), trust_region(subproblem), max_steps=5)
    assert Status(int(result.status)) == Status.NONFINITE
    np.testing.assert_array_equal(result.state.params, jnp.full(4, 0.3))


@pytest.mark.parametrize(
    "options, name",
    [
        ({"subproblem": "lanczos"}, "subproblem"),
        ({"radius": 0.0}, "radius"),
        ({"radius": 2.0, "max_radius": 1.0}, "max_radius"),
        ({"eta": 0.5}, "eta"),
        ({"max_trials": 0}, "max_trials"),
        ({"max_reuse": -1}, "max_reuse"),
        ({"max_reuse": 1.5}, "max_reuse"),
        ({"subproblem": "cg", "max_reuse": 2}, "max_reuse"),
        ({"max_cg_steps": 3}, "max_cg_steps"),
        ({"subproblem": "cg", "max_cg_steps": 0}, "max_cg_steps"),
    ],
)
def test_invalid_options_name_the_argument(options, name):
    with pytest.raises(ValueError, match=name):
        trust_region(**options)
