"""Solvers and the driver: convergence, rates, statuses, state stability, compilation."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize
from jax.flatten_util import ravel_pytree

from attnopt.problems.base import Problem
from attnopt.problems.registry import make
from attnopt.problems.regression import RescaledRegression, ResNetSoftmaxRegression, SoftmaxRegression
from attnopt.solvers.approx_newton import sample_count, sketched_hessian
from attnopt.solvers.first_order import from_optax
from attnopt.solvers.loop import solve
from attnopt.solvers.newton import gauss_newton, newton
from attnopt.solvers.newton_cg import newton_cg
from attnopt.solvers.approx_newton import approx_newton
from attnopt.solvers.regularized_newton import regularized_newton
from attnopt.solvers.state import SolverState, Status
from attnopt.solvers.zeroth_order import zeroth_order


def instance(seed=0, **options):
    """A regularised, ill-conditioned softmax regression, large enough that approx_newton samples."""
    defaults = dict(n=400, d=4, cond=10.0, reg=0.3, ridge=1e-3, noise=0.1, scale=2.0)
    return make("softmax", jax.random.key(seed), **{**defaults, **options})


def true_grad_norm(problem, params):
    return float(np.linalg.norm(ravel_pytree(problem.grad(params))[0]))


SOLVERS = {
    # name: (solver, tol, max_steps, instance options); the tolerance is on the gradient norm.
    "newton": (newton(), 1e-10, 50, {}),
    "newton_cg": (newton_cg(), 1e-10, 50, {}),
    "approx_newton": (approx_newton(0.5, seed=1), 1e-10, 100, {}),
    "regularized_newton": (regularized_newton(), 1e-10, 100, {}),
    "lbfgs": (from_optax("lbfgs"), 1e-10, 200, {}),
    "adam": (from_optax("adam", learning_rate=0.05), 1e-6, 2000, {}),
    # Plain descent needs a step below 2 / L (L is about 40 here) and a well-conditioned instance.
    "zeroth_order": (
        zeroth_order(optax.exponential_decay(0.03, 100, 0.5, end_value=0.005), num_directions=8),
        1e-6, 2000, {"cond": 2.0},
    ),
}


@pytest.mark.parametrize("name", SOLVERS)
def test_solver_reaches_tolerance(name):
    solver, tol, max_steps, options = SOLVERS[name]
    inst = instance(**options)
    result = solve(inst.problem, inst.x0, solver, max_steps=max_steps, tol=tol)
    assert Status(int(result.status)) == Status.CONVERGED, Status(int(result.status)).name
    assert bool(result.converged) and 0 < int(result.steps) <= max_steps
    # The driver's test used state.grad; check the true gradient (an SPSA estimate is noisy).
    assert true_grad_norm(inst.problem, result.state.params) <= (10 if name == "zeroth_order" else 1.01) * tol
    reference = solve(inst.problem, inst.x0, newton(), tol=1e-12).state.params
    np.testing.assert_allclose(result.state.params, reference, atol=1e3 * tol)


def test_gauss_newton_zero_residual():
    """On a zero-residual instance Gauss-Newton reaches the planted solution."""
    inst = make("softmax", jax.random.key(3), n=24, d=4, cond=3.0)
    result = solve(inst.problem, inst.x0, gauss_newton(), max_steps=50, tol=1e-12)
    assert bool(result.converged), Status(int(result.status)).name
    np.testing.assert_allclose(result.state.params, inst.solution, atol=1e-9)


@pytest.mark.parametrize("seed", range(2))
def test_gauss_newton_converges_where_its_model_is_far_below_the_hessian(seed):
    """Rescaled exp with |x*| = 3 (large residual): the Gauss-Newton matrix is over 10x below the Hessian.
    Unscaled Gauss-Newton steps overshot, and halving backtracking oscillated until MAX_STEPS."""
    inst = make("rescaled_exp", jax.random.key(seed), n=256, d=8, scale=3.0)
    result = solve(inst.problem, inst.x0, gauss_newton(), max_steps=100, tol=1e-9)
    assert Status(int(result.status)) == Status.CONVERGED, Status(int(result.status)).name
    assert true_grad_norm(inst.problem, result.state.params) <= 1e-9
    x = result.state.params
    H, G = (np.linalg.eigvalsh(np.asarray(m(x))) for m in (inst.problem.hessian, inst.problem.gauss_newton_matrix))
    assert H.min() > 10 * G.max()


def unregularised_instance(seed):
    """n=2048, d=32, |x*| = 6, no regulariser: indefinite Hessians on the way, and m = 1775 < n sampled rows."""
    return make("softmax", jax.random.PRNGKey(seed), n=2048, d=32, scale=6.0)


@pytest.mark.parametrize("seed", [2, 3])
def test_approx_newton_converges_on_unregularised_instance(seed):
    inst = unregularised_instance(seed)
    assert sample_count(2048, 32, 0.5, 4.0) < 2048
    result = solve(inst.problem, inst.x0, approx_newton(0.5), max_steps=200, tol=1e-9)
    assert Status(int(result.status)) == Status.CONVERGED, Status(int(result.status)).name
    assert true_grad_norm(inst.problem, result.state.params) <= 1e-9


def test_approx_newton_samples_where_the_sketch_holds():
    """On a regularised instance the sketch passes its check along most steps (no exact fallback)."""
    inst = make("softmax", jax.random.key(1), n=2000, d=4, cond=10.0, reg=0.3, ridge=1e-3, noise=0.1, scale=2.0)
    solver = approx_newton(0.5)
    state, step = solver.init(inst.problem, inst.x0), jax.jit(solver.step)
    exact = []
    for _ in range(8):
        state = step(inst.problem, state)
        exact.append(bool(state.inner.model[1]))
    assert sum(exact) <= 2, exact
    assert float(jnp.linalg.norm(state.grad)) < 1e-6


@pytest.mark.parametrize("seed", [0, 1])
def test_newton_cg_converges_on_unregularised_instance(seed):
    """Negative curvature at the first CG iterations: unscaled -g steps crawled (||g|| ~ 1e-3 at MAX_STEPS)."""
    inst = unregularised_instance(seed)
    result = solve(inst.problem, inst.x0, newton_cg(), max_steps=200, tol=1e-9)
    assert Status(int(result.status)) == Status.CONVERGED, Status(int(result.status)).name
    assert true_grad_norm(inst.problem, result.state.params) <= 1e-9


@pytest.mark.parametrize("name", ["resnet_softmax", "rescaled_exp", "rescaled_cosh", "rescaled_sinh"])
def test_newton_on_other_vector_problems(name):
    inst = make(name, jax.random.key(4), n=24, d=4, reg=0.1, ridge=1e-3, noise=0.1)
    result = solve(inst.problem, inst.x0, newton(), max_steps=50, tol=1e-10)
    assert bool(result.converged), Status(int(result.status)).name
    assert true_grad_norm(inst.problem, result.state.params) <= 1e-10


def test_newton_trace_is_quadratic():
    inst = instance(n=64, scale=4.0)
    trace = solve(inst.problem, -inst.solution, newton(), max_steps=50, tol=1e-13).trace
    g = np.asarray(trace.grad_norm)
    g = g[np.isfinite(g)]
    # Steps that start in the quadratic region and end above the rounding floor: g+ <= C g^2 with C = 1
    # (a linearly convergent method with rate r fails this once g < r).
    pairs = [(a, b) for a, b in zip(g[:-1], g[1:]) if a < 1 and b > 1e-14]
    assert len(pairs) >= 2, g
    for a, b in pairs:
        assert b <= a**2, g
    assert np.all(np.asarray(trace.loss)[1 : len(g)] <= np.asarray(trace.loss)[: len(g) - 1] + 1e-15)


def test_newton_matches_scipy_trust_exact():
    p = instance(n=48).problem
    x0 = np.zeros(4)
    ref = scipy.optimize.minimize(
        lambda x: float(p.loss(x)), x0, jac=lambda x: np.asarray(p.grad(x)),
        hess=lambda x: np.asarray(p.hessian(x)), method="trust-exact", options={"gtol": 1e-12},
    )
    assert ref.success, ref.message
    result = solve(p, jnp.asarray(x0), newton(), tol=1e-12)
    assert bool(result.converged)
    np.testing.assert_allclose(result.state.params, ref.x, rtol=0, atol=1e-8)


def test_newton_damps_indefinite_hessian():
    """Unregularised softmax regression has indefinite Hessians: Levenberg damping must kick in."""
    inst = make("softmax", jax.random.key(5), n=12, d=3, noise=0.5, scale=3.0)
    p = inst.problem
    x = 2 * jax.random.normal(jax.random.key(3), (3,))
    assert np.linalg.eigvalsh(np.asarray(p.hessian(x))).min() < 0
    state = newton().step(p, newton().init(p, x))
    assert float(state.inner.damping) > 0
    assert float(state.value) < float(p.loss(x))


class _WrongGradient(SoftmaxRegression):
    """A problem whose gradient has the wrong sign: no step along -H^{-1}g can decrease it."""

    def grad(self, x):
        return -super().grad(x)


def test_linesearch_failure_status():
    inst = instance(n=32)
    p = _WrongGradient(inst.problem.A, inst.problem.b, inst.problem.reg, inst.problem.ridge)
    result = solve(p, inst.x0 + 0.3, newton(max_backtracks=10), max_steps=20)
    assert Status(int(result.status)) == Status.LINESEARCH_FAILED
    assert int(result.steps) == 1 and not bool(result.converged)
    np.testing.assert_array_equal(result.state.params, inst.x0 + 0.3)


def test_nonfinite_data():
    inst = instance(n=32)
    for solver in (newton(), from_optax("adam", learning_rate=0.1)):
        result = solve(inst.problem.replace(b=inst.problem.b.at[0].set(jnp.inf)), inst.x0, solver, max_steps=5)
        assert Status(int(result.status)) == Status.NONFINITE
        assert int(result.steps) == 0 and not bool(result.converged)


class _NaNCurvature(SoftmaxRegression):
    """A problem whose curvature is NaN while its loss and gradient are finite."""

    def hessian(self, x):
        return jnp.full((x.size, x.size), jnp.nan)

    def hessian_operator(self, x):
        return lambda v: jnp.full_like(v, jnp.nan)


@pytest.mark.parametrize("solver", [newton(), newton_cg(), regularized_newton()], ids=lambda s: s.name)
def test_nonfinite_curvature_is_nonfinite_not_linesearch_failure(solver):
    inst = instance(n=32)
    p = _NaNCurvature(inst.problem.A, inst.problem.b, inst.problem.reg, inst.problem.ridge)
    result = solve(p, inst.x0 + 0.3, solver, max_steps=5)
    assert Status(int(result.status)) == Status.NONFINITE and not bool(result.converged)
    np.testing.assert_array_equal(result.state.params, inst.x0 + 0.3)


def test_nonfinite_outside_domain():
    """ResNet normaliser <= 0 at the start, and exp overflow during a step."""
    resnet = ResNetSoftmaxRegression(jnp.ones((3, 1)), jnp.full(3, 1 / 3))
    assert Status(int(solve(resnet, jnp.asarray([-0.6]), newton()).status)) == Status.NONFINITE
    A = jnp.asarray([[1.0], [2.0], [3.0]])
    rescaled = RescaledRegression(A, jnp.asarray([0.2, 0.3, 0.5]), "exp", reg=0.1)
    result = solve(rescaled, jnp.asarray([1.0]), from_optax("sgd", learning_rate=1e3), max_steps=50)
    assert Status(int(result.status)) == Status.NONFINITE
    # The loop stopped at the step that overflowed and kept the last finite iterate.
    assert int(result.steps) < 50 and np.isfinite(result.state.value)
    assert np.isfinite(result.trace.loss[int(result.steps)]) and np.isnan(result.trace.loss[int(result.steps) + 1])


def test_trace_layout_and_max_steps():
    inst = instance(n=32)
    result = solve(inst.problem, inst.x0, from_optax("sgd", learning_rate=1e-3), max_steps=7, tol=1e-12)
    assert Status(int(result.status)) == Status.MAX_STEPS and int(result.steps) == 7
    np.testing.assert_array_equal(result.trace.step, np.arange(8))
    for column in (result.trace.loss, result.trace.grad_norm, result.trace.step_size):
        assert column.shape == (8,) and np.all(np.isfinite(column))
    assert np.all(np.isnan(result.trace.line_search))  # sgd has no line search
    assert float(result.trace.step_size[0]) == 0.0
    np.testing.assert_allclose(result.trace.loss[-1], result.state.value)
    np.testing.assert_allclose(result.trace.grad_norm[0], np.linalg.norm(inst.problem.grad(inst.x0)))
    short = solve(inst.problem, inst.x0, newton(), max_steps=7, tol=1e-8)
    steps = int(short.steps)
    assert np.all(np.isnan(short.trace.loss[steps + 1 :])) and np.all(short.trace.step[steps + 1 :] == -1)
    # Newton's line search accepts t in (0, 1]; the start has no step.
    t = np.asarray(short.trace.line_search)
    assert np.isnan(t[0]) and np.all((t[1 : steps + 1] > 0) & (t[1 : steps + 1] <= 1))


def test_optax_and_newton_share_the_state_type():
    inst = instance(n=32)
    for solver in (newton(), from_optax("adam", learning_rate=0.1), from_optax("lbfgs")):
        result = solve(inst.problem, inst.x0, solver, max_steps=5, tol=0.0)
        assert type(result.state) is SolverState
        assert int(optax.tree.get(result.state, "count")) == int(result.steps) == 5
        assert float(optax.tree.get(result.state, "value")) == float(result.state.value)


class _TupleQuadratic(Problem):
    """``1/2 ||K vec(X, y) - c||^2 + 1/2 ||vec||^2`` over params (X (2, 2), y (3,)); a loss only (autodiff for the rest)."""

    leaves = ("K", "c")

    def __init__(self, K, c):
        self._set(K=jnp.asarray(K), c=jnp.asarray(c))

    def _flat(self, params):
        return ravel_pytree(params)[0]

    def loss(self, params):
        v = self._flat(params)
        return 0.5 * jnp.sum((self.K @ v - self.c) ** 2) + 0.5 * v @ v


@pytest.mark.parametrize("solver", [newton(), newton_cg(), from_optax("lbfgs")], ids=lambda s: s.name)
def test_pytree_params(solver):
    K, c = jax.random.normal(jax.random.key(6), (9, 7)), jax.random.normal(jax.random.key(7), (9,))
    p = _TupleQuadratic(K, c)
    x0 = (jnp.zeros((2, 2)), jnp.zeros(3))
    result = solve(p, x0, solver, tol=1e-10)
    assert bool(result.converged)
    expected = np.linalg.solve(K.T @ K + np.eye(7), K.T @ c)
    np.testing.assert_allclose(ravel_pytree(result.state.params)[0], expected, atol=1e-9)
    assert result.state.params[0].shape == (2, 2)


def test_missing_capability_fails_before_any_work_naming_both():
    with pytest.raises(ValueError, match=r"'gauss_newton' cannot run on _TupleQuadratic.*gauss_newton_matrix"):
        solve(_TupleQuadratic(jnp.eye(7), jnp.ones(7)), (jnp.zeros((2, 2)), jnp.zeros(3)), gauss_newton())


def test_sketched_hessian_is_spectral_approximation(eps=0.5):
    """eig(H^{-1/2} H~ H^{-1/2}) in [1 - eps, 1 + eps] on a regularised instance, with m < n rows."""
    inst = make("softmax", jax.random.key(8), n=1000, d=5, cond=10.0, reg=0.3, ridge=1e-3, noise=0.1)
    p, x = inst.problem, 0.5 * inst.solution
    assert sample_count(1000, 5, eps, 4.0) < 1000
    w, V = np.linalg.eigh(np.asarray(p.hessian(x)))
    root = V / np.sqrt(w) @ V.T
    for seed in range(3):
        H_sketch = jax.jit(sketched_hessian, static_argnums=3)(p, x, jax.random.key(seed), eps)
        eigs = np.linalg.eigvalsh(root @ np.asarray(H_sketch) @ root)
        assert 1 - eps <= eigs.min() and eigs.max() <= 1 + eps, eigs
        assert np.abs(eigs - 1).max() > 1e-6  # it is a sample, not the exact matrix


def test_regularized_newton_acceptance_rule():
    inst = instance(n=32)
    p, solver = inst.problem, regularized_newton(gamma=8.0)
    state, step = solver.init(p, inst.x0), jax.jit(solver.step)
    for _ in range(3):
        new = step(p, state)
        assert Status(int(new.status)) == Status.RUNNING
        gamma_used = float(new.inner.gamma) / 2  # accepted: gamma doubled after the try that passed
        assert gamma_used <= float(state.inner.gamma)
        lam = np.linalg.norm(state.grad) / gamma_used
        x_plus = state.params - np.linalg.solve(np.asarray(p.hessian(state.params)) + lam * np.eye(4), state.grad)
        np.testing.assert_allclose(new.params, x_plus, rtol=1e-10, atol=1e-12)
        assert float(state.value - new.value) >= np.linalg.norm(new.grad) ** 2 / (8 * lam)
        state = new


def test_invalid_options():
    inst = instance(n=32)
    with pytest.raises(ValueError, match="max_steps"):
        solve(inst.problem, inst.x0, newton(), max_steps=-1)
    with pytest.raises(ValueError, match="tol"):
        solve(inst.problem, inst.x0, newton(), tol=-1.0)
    with pytest.raises(ValueError, match="eps"):
        approx_newton(1.5)
    with pytest.raises(ValueError, match="c1"):
        newton(c1=0.9)
    with pytest.raises(ValueError, match="solver"):
        solve(inst.problem, inst.x0, optax.adam(0.1))
    with pytest.raises(ValueError, match="max_backtracks"):
        newton(max_backtracks=2**31)
    with pytest.raises(ValueError, match="max_cg_steps"):
        newton_cg(max_cg_steps=2**40)
    with pytest.raises(ValueError, match="learning_rate"):
        zeroth_order(-1.0)
