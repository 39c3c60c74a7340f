"""Conformance of every registered solver (and a sample of optax aliases): registering a solver puts it here.

State stability under lax.cond, float32 and float64 end to end, vmap equals single solves, NaN start.
"""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnopt.problems.base import stack
from attnopt.problems.registry import make
from attnopt.solvers import SolverState, Status, capabilities, get, registry, solve

# Options for solvers that cannot be built from defaults alone.
OPTIONS = {
    "chain": {"transforms": [{"name": "clip_by_global_norm", "max_norm": 1.0}, {"name": "sgd", "learning_rate": 0.1}]},
    "normalized_gd": {"learning_rate": 0.02},
    "mirror_descent": {"learning_rate": 0.02, "p": 1.75},
    **{name: {"learning_rate": 0.05} for name in ("adam", "adamw", "sgd")},
}
NAMES = tuple(registry._CONSTRUCTORS) + ("adam", "adamw", "sgd", "lbfgs")


def build(name):
    return get(name, **OPTIONS.get(name, {}))


def instance(name, seed=0, dtype="float64"):
    """A problem the solver can run on: attention regression for variable projection, else softmax regression."""
    if capabilities.HasVariableProjection in build(name).needs:
        return make("attention", jax.random.key(seed), n=6, d=2, start="near", dtype=dtype)
    return make("softmax", jax.random.key(seed), n=40, d=3, reg=0.2, ridge=1e-3, noise=0.1, scale=2.0, dtype=dtype)


def without_keys(tree):
    """PRNG key arrays do not compare; replace them by their data."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x, tree)


def test_every_registered_solver_is_covered():
    assert set(registry._CONSTRUCTORS) <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_step_keeps_state_structure_under_cond(name):
    """Like optax's state-stability test: ``step`` under ``lax.cond`` keeps structure, shapes, dtypes (float32)."""
    solver, inst = build(name), instance(name, dtype="float32")
    state = solver.init(inst.problem, inst.x0)
    stepped = jax.jit(lambda p, s, take: jax.lax.cond(take, lambda s: solver.step(p, s), lambda s: s, s))(
        inst.problem, state, True
    )
    chex.assert_trees_all_equal_structs(state, stepped)
    chex.assert_trees_all_equal_shapes_and_dtypes(state, stepped)
    assert type(stepped) is SolverState
    # No float64 outside the solver-specific slot (optax's own lbfgs state holds some under x64).
    assert all(leaf.dtype != jnp.float64 for leaf in jax.tree.leaves(stepped._replace(inner=None)))
    assert int(stepped.count) == 1
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(stepped.params), jax.tree.leaves(state.params)))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", NAMES)
def test_end_to_end(name, dtype):
    solver, inst = build(name), instance(name, dtype=dtype)
    result = solve(inst.problem, inst.x0, solver, max_steps=30, tol=0.0)
    assert Status(int(result.status)) in (Status.COMPLETED, Status.LINESEARCH_FAILED), Status(int(result.status)).name
    assert all(leaf.dtype == jnp.dtype(dtype) for leaf in jax.tree.leaves(result.state.params))
    assert result.trace.loss.dtype == jnp.dtype(dtype)
    assert np.isfinite(float(result.state.value))
    assert float(result.state.value) < float(inst.problem.loss(inst.x0))


@pytest.mark.parametrize("name", NAMES)
def test_vmap_equals_single_solves(name):
    solver = build(name)
    insts = [instance(name, seed) for seed in range(2)]
    problems = stack([i.problem for i in insts])
    x0s = jax.tree.map(lambda *xs: jnp.stack(xs), *[i.x0 for i in insts])
    run = lambda p, x: solve(p, x, solver, max_steps=15, tol=1e-9)
    batched = without_keys(jax.vmap(run)(problems, x0s))
    for k, inst in enumerate(insts):
        single = without_keys(run(inst.problem, inst.x0))
        chex.assert_trees_all_close(jax.tree.map(lambda leaf: leaf[k], batched), single, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_nan_start_is_nonfinite(name):
    solver, inst = build(name), instance(name)
    x0 = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), inst.x0)
    result = solve(inst.problem, x0, solver, max_steps=5)
    assert Status(int(result.status)) == Status.NONFINITE and int(result.steps) == 0 and not bool(result.converged)
