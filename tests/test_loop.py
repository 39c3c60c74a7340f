"""The driver: stopping rules, statuses and messages, metrics, record_every, sweeps compiled once."""
import contextlib
import logging

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import attnopt
from attnopt.problems.registry import make
from attnopt.solvers import SolveError, Status, from_optax, get, newton, normalized_gd, solve, zeroth_order


def instance(seed=0, **options):
    return make("softmax", jax.random.key(seed), **{**dict(n=16, d=3, reg=0.2, ridge=1e-3, noise=0.1), **options})


@contextlib.contextmanager
def count_compilations(name="_solve"):
    """Count XLA compilations of the jitted function ``name`` (jax's public compile logging)."""
    seen = []

    class Handler(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith(f"Compiling jit({name})"):
                seen.append(record)

    handler = Handler()
    logger = logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        with jax.log_compiles():
            yield seen
    finally:
        logger.removeHandler(handler)


def status(result):
    return Status(int(result.status))


def test_zero_tolerances_run_the_whole_budget():
    inst = instance()
    result = solve(inst.problem, inst.x0, newton(), max_steps=12, tol=0.0)
    # Newton reaches a zero gradient long before step 12; tol=0 must still run every step.
    assert status(result) == Status.COMPLETED and int(result.steps) == 12 and not bool(result.converged)
    assert np.all(result.trace.step == np.arange(13))
    solve(inst.problem, inst.x0, newton(), max_steps=12, tol=0.0, throw=True)  # COMPLETED is not a failure


def test_cauchy_tolerance_stops_a_method_whose_gradient_never_vanishes():
    """Normalized GD with a fixed step never gets ||g|| small; with a decaying rate its iterates settle."""
    inst = instance()
    schedule = {"name": "exponential_decay", "init_value": 0.5, "transition_steps": 1, "decay_rate": 0.7}
    solver = get("sgd", learning_rate=schedule)
    result = solve(inst.problem, inst.x0, solver, max_steps=500, tol=0.0, rtol=1e-6)
    assert status(result) == Status.CONVERGED and int(result.steps) < 500
    k = int(result.steps)
    change = abs(float(result.trace.loss[k] - result.trace.loss[k - 1]))
    assert change <= 1e-6 * abs(float(result.trace.loss[k])) + 1e-300
    assert float(result.trace.step_size[k]) <= 1e-6 * float(np.linalg.norm(result.state.params))
    # The previous step did not pass the test (it stopped at the first step that did).
    assert float(result.trace.step_size[k - 1]) > 1e-6 * float(np.linalg.norm(result.state.params)) or abs(
        float(result.trace.loss[k - 1] - result.trace.loss[k - 2])) > 1e-6 * abs(float(result.trace.loss[k - 1]))


def test_status_messages_and_throw():
    inst = instance()
    for code in Status:
        assert isinstance(code.message, str) and code.message
    result = solve(inst.problem, inst.x0, normalized_gd(0.1), max_steps=5, tol=1e-12)
    assert status(result) == Status.MAX_STEPS
    with pytest.raises(SolveError, match="MAX_STEPS: the step budget ran out"):
        solve(inst.problem, inst.x0, normalized_gd(0.1), max_steps=5, tol=1e-12, throw=True)
    with pytest.raises(SolveError, match="NONFINITE"):
        solve(inst.problem, inst.x0.at[0].set(jnp.nan), newton(), throw=True)
    with pytest.raises(ValueError, match="throw=True"):
        jax.jit(lambda x: solve(inst.problem, x, newton(), throw=True).status)(inst.x0)


def test_metrics_are_recorded_at_every_recorded_step():
    inst = instance()
    target = jnp.ones(3) / jnp.sqrt(3.0)

    def metrics(problem, x):
        return {"norm": jnp.linalg.norm(x), "corr": x @ target / jnp.linalg.norm(x), "x": x, "loss": problem.loss(x)}

    result = solve(inst.problem, inst.x0 + 0.1, normalized_gd(0.05), max_steps=30, tol=0.0, metrics=metrics)
    m = result.trace.metrics
    assert m["x"].shape == (31, 3) and m["norm"].shape == (31,)
    np.testing.assert_allclose(m["loss"], result.trace.loss, rtol=1e-14)
    np.testing.assert_allclose(m["x"][-1], result.state.params, rtol=1e-14)
    np.testing.assert_allclose(m["norm"], np.linalg.norm(m["x"], axis=1), rtol=1e-13)
    # Normalized steps have length eta.
    np.testing.assert_allclose(np.linalg.norm(np.diff(m["x"], axis=0), axis=1), 0.05, rtol=1e-10)


def test_record_every_keeps_the_trace_short_and_the_last_step():
    inst = instance()
    metrics = lambda problem, x: {"x0": x[0]}
    full = solve(inst.problem, inst.x0, normalized_gd(0.05), max_steps=23, tol=0.0, metrics=metrics)
    thin = solve(inst.problem, inst.x0, normalized_gd(0.05), max_steps=23, tol=0.0, metrics=metrics, record_every=5)
    assert thin.trace.loss.shape == (6,)  # steps 0, 5, 10, 15, 20 and the last step 23
    np.testing.assert_array_equal(thin.trace.step, [0, 5, 10, 15, 20, 23])
    np.testing.assert_allclose(thin.trace.loss, full.trace.loss[thin.trace.step], rtol=1e-14)
    np.testing.assert_allclose(thin.trace.metrics["x0"], full.trace.metrics["x0"][thin.trace.step], rtol=1e-14)
    chex.assert_trees_all_close(thin.state, full.state, rtol=1e-14)
    # A solve that stops early leaves the unused entries empty.
    early = solve(inst.problem, inst.x0, newton(), max_steps=40, tol=1e-10, record_every=4)
    steps = int(early.steps)
    recorded = early.trace.step[early.trace.step >= 0]
    assert recorded[-1] == steps and np.all(np.isnan(early.trace.loss[len(recorded):]))
    # The default trace of a huge budget stays bounded.
    huge = solve(inst.problem, inst.x0, newton(), max_steps=10**8, tol=1e-10)
    assert huge.trace.loss.shape[0] <= attnopt.solvers.MAX_TRACE + 1 and bool(huge.converged)


def test_same_solver_built_twice_and_new_hyperparameters_compile_once():
    inst = instance()
    with count_compilations() as compiled:
        for lr in (0.1, 0.2, 0.3):
            solve(inst.problem, inst.x0, from_optax("adam", learning_rate=lr), max_steps=7, tol=0.0)
        for c1 in (1e-4, 1e-3):
            solve(inst.problem, inst.x0, newton(c1=c1), max_steps=7)
    assert len(compiled) == 2  # one adam, one newton


def test_sweep_of_16_learning_rates_by_8_seeds_is_one_compiled_call():
    inst = instance(n=12, d=3)
    lrs = jnp.repeat(jnp.geomspace(0.01, 0.5, 16), 8)
    seeds = jnp.tile(jnp.arange(8), 16)

    def run(lr, seed):
        return solve(inst.problem, inst.x0, zeroth_order(lr, seed=seed, num_directions=4), max_steps=40, tol=0.0)

    with count_compilations() as compiled:
        grid = jax.vmap(run)(lrs, seeds)
    assert len(compiled) == 1
    assert grid.state.params.shape == (128, 3)
    with count_compilations() as compiled:
        singles = [run(lr, seed) for lr, seed in zip(lrs.tolist(), seeds.tolist())]
    assert len(compiled) == 1  # 128 single solves, one compilation
    keyless = lambda result: result._replace(state=result.state._replace(inner=None))  # PRNG keys do not compare
    for k in range(128):
        chex.assert_trees_all_close(
            jax.tree.map(lambda leaf: leaf[k], keyless(grid)), keyless(singles[k]), rtol=1e-8, atol=1e-10
        )
    # The seeds matter (different directions) and so do the rates.
    assert not np.allclose(grid.state.params[0], grid.state.params[1])
    assert not np.allclose(grid.state.params[0], grid.state.params[8])


def test_vmap_over_learning_rate_of_an_optax_solver():
    inst = instance()
    lrs = jnp.asarray([0.01, 0.1])
    batched = jax.vmap(lambda lr: solve(inst.problem, inst.x0, from_optax("adam", learning_rate=lr), max_steps=20))(lrs)
    for k, lr in enumerate([0.01, 0.1]):
        single = solve(inst.problem, inst.x0, from_optax("adam", learning_rate=lr), max_steps=20)
        chex.assert_trees_all_close(jax.tree.map(lambda leaf: leaf[k], batched), single, rtol=1e-10)


def test_solvers_by_name():
    names = attnopt.solvers.names()
    for name in ("newton", "newton_cg", "normalized_gd", "chain", "adam", "adamw", "sgd", "lbfgs"):
        assert name in names
    assert get("newton", c1=1e-3) == newton(c1=1e-3)
    inst = instance()
    sgd = get("sgd", learning_rate=0.1, momentum=0.9)
    ours = solve(inst.problem, inst.x0, sgd, max_steps=10, tol=0.0)
    # The same transformation driven by hand with optax.
    tx, x = optax.sgd(0.1, momentum=0.9), inst.x0
    state = tx.init(x)
    for _ in range(10):
        updates, state = tx.update(inst.problem.grad(x), state, x)
        x = optax.apply_updates(x, updates)
    np.testing.assert_allclose(ours.state.params, x, rtol=1e-12)
    chained = get([{"name": "clip_by_global_norm", "max_norm": 0.01}, {"name": "sgd", "learning_rate": 1.0}])
    steps = solve(inst.problem, inst.x0, chained, max_steps=5, tol=0.0).trace.step_size[1:]
    assert np.all(np.asarray(steps) <= 0.01 + 1e-12)
    with pytest.raises(ValueError, match="unknown solver 'adamx'.*newton.*adamw"):
        get("adamx")
    with pytest.raises(ValueError, match="unknown option"):
        get("newton", learning_rate=0.1)
    with pytest.raises(ValueError, match="learning_rat"):
        get("adam", learning_rat=0.1)


def test_schedule_that_branches_on_a_value_still_runs():
    """optax's exponential_decay branches in Python on decay_rate: such options stay static."""
    solver = get("sgd", learning_rate={"name": "exponential_decay", "init_value": 0.1, "transition_steps": 5,
                                        "decay_rate": 0.5})
    assert not solver.sweepable
    assert get("adam", learning_rate=0.1).sweepable
    inst = instance()
    assert status(solve(inst.problem, inst.x0, solver, max_steps=5, tol=0.0)) == Status.COMPLETED


@pytest.mark.parametrize("x0", [[0, 0, 0], np.zeros(3, np.float32), np.zeros(3, np.int32)], ids=["list", "f32", "int"])
def test_start_is_cast_to_the_problem_dtype(x0):
    inst = instance()
    result = solve(inst.problem, x0, newton(), tol=1e-10)
    assert result.state.params.dtype == jnp.float64 and bool(result.converged)


def test_bad_arguments():
    inst = instance()
    for kwargs, match in [
        (dict(max_steps=-1), "max_steps"), (dict(max_steps=2**31), "max_steps"), (dict(tol=-1.0), "tol"),
        (dict(rtol=-1.0), "rtol"), (dict(record_every=0), "record_every"), (dict(metrics=3), "metrics"),
    ]:
        with pytest.raises(ValueError, match=match):
            solve(inst.problem, inst.x0, newton(), **kwargs)
