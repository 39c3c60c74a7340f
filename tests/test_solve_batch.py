"""Batched solving: vmap of solve and every solve_batch plan equal one-at-a-time solves; sharded equals vmapped."""
import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import pytest

from attnopt.problems.base import stack
from attnopt.problems.registry import make
from attnopt.problems.regression import SoftmaxRegression
from attnopt.solvers.first_order import from_optax
from attnopt.solvers.loop import auto_chunk_size, solve, solve_batch
from attnopt.solvers.newton import newton
from attnopt.solvers.trust_region import trust_region


def instances(count, **options):
    opts = dict(n=24, d=3, cond=5.0, reg=0.2, ridge=1e-3, noise=0.1, scale=2.0, **options)
    return [make("softmax", jax.random.key(seed), **opts) for seed in range(count)]


@pytest.mark.parametrize("solver", [newton(), from_optax("adam", learning_rate=0.05)], ids=lambda s: s.name)
def test_vmapped_solve_equals_single_solves(solver):
    insts = instances(3)
    # Different starts, so that the instances stop after different numbers of steps.
    x0s = jnp.stack([0.3 * k * jnp.ones(3) for k in range(3)])
    run = lambda p, x: solve(p, x, solver, max_steps=60, tol=1e-9)
    batched = jax.vmap(run)(stack([i.problem for i in insts]), x0s)
    for k, inst in enumerate(insts):
        single = run(inst.problem, x0s[k])
        chex.assert_trees_all_close(jax.tree.map(lambda leaf: leaf[k], batched), single, rtol=1e-12, atol=1e-14)
    if solver.name != "adam":  # the starts differ, so Newton instances stop after different step counts
        assert len(set(batched.steps.tolist())) > 1


def test_vmap_over_starts_only_and_over_tolerances():
    problem = instances(1)[0].problem
    x0s = jnp.stack([0.4 * k * jnp.ones(3) for k in range(3)])
    tols = jnp.array([1e-3, 1e-6, 1e-10])
    over_x0 = jax.vmap(lambda x: solve(problem, x, newton(), max_steps=40, tol=1e-9))(x0s)
    over_tol = jax.vmap(lambda t: solve(problem, x0s[2], newton(), max_steps=40, tol=t))(tols)
    for k in range(3):
        chex.assert_trees_all_close(
            jax.tree.map(lambda leaf: leaf[k], over_x0), solve(problem, x0s[k], newton(), max_steps=40, tol=1e-9),
            rtol=1e-12, atol=1e-14,
        )
        chex.assert_trees_all_close(
            jax.tree.map(lambda leaf: leaf[k], over_tol), solve(problem, x0s[2], newton(), max_steps=40, tol=tols[k]),
            rtol=1e-12, atol=1e-14,
        )
    assert over_tol.steps[0] < over_tol.steps[2]  # a looser tolerance stops earlier


@pytest.mark.parametrize("chunk_size", [None, 1, 2, 16, "auto"])
@pytest.mark.parametrize("solver", [newton(), trust_region()], ids=lambda s: s.name)
def test_solve_batch_plans_equal_single_solves(chunk_size, solver):
    """Every execution plan (lockstep, groups, one at a time, the automatic choice) gives each
    instance its single solve; 5 instances with different step counts, 16 > 5 is one group."""
    insts = instances(5)
    problems = stack([i.problem for i in insts])
    x0s = jnp.stack([0.3 * k * jnp.ones(3) for k in range(5)])
    batched = solve_batch(problems, x0s, solver, max_steps=40, tol=1e-10, chunk_size=chunk_size)
    assert len(set(batched.steps.tolist())) > 1
    for k, inst in enumerate(insts):
        single = solve(inst.problem, x0s[k], solver, max_steps=40, tol=1e-10)
        chex.assert_trees_all_close(jax.tree.map(lambda leaf: leaf[k], batched), single, rtol=1e-10, atol=1e-13)
    with pytest.raises(ValueError, match="chunk_size"):
        solve_batch(problems, x0s, solver, chunk_size=0)


def test_auto_plan_by_platform_and_size():
    def plan(n, d, platform="cpu"):
        problem = SoftmaxRegression(jnp.ones((n, d)), jnp.full(n, 1 / n))
        return auto_chunk_size(stack([problem, problem]), jnp.zeros((2, d)), platform)

    assert plan(64, 8, "gpu") is None and plan(64, 8, "tpu") is None  # accelerators: lockstep
    sizes = [plan(64, 8), plan(256, 16), plan(1024, 32), plan(4096, 64)]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > 1 and sizes[-1] == 1, sizes
    assert all(1 <= s <= 16 for s in sizes)


def test_solve_batch_checks_batch_axis():
    insts = instances(2)
    with pytest.raises(ValueError, match="batch"):
        solve_batch(stack([i.problem for i in insts]), jnp.zeros((3, 3)), newton())


SHARDED = textwrap.dedent(
    """
    import jax, jax.numpy as jnp
    from attnopt.problems.base import stack
    from attnopt.problems.registry import make
    from attnopt.solvers.loop import auto_chunk_size, solve, solve_batch
    from attnopt.solvers.newton import newton

    assert jax.config.jax_enable_x64 and len(jax.devices()) == 4, jax.devices()
    opts = dict(n=24, d=3, cond=5.0, reg=0.2, ridge=1e-3, noise=0.1, scale=2.0)
    insts = [make("softmax", jax.random.key(seed), **opts) for seed in range(6)]  # 6: padded to 8
    problems = stack([i.problem for i in insts])
    x0s = jnp.stack([0.2 * k * jnp.ones(3) for k in range(6)])
    sharded = solve_batch(problems, x0s, newton(), max_steps=40, tol=1e-10)
    vmapped = jax.jit(jax.vmap(lambda p, x: solve(p, x, newton(), max_steps=40, tol=1e-10)))(problems, x0s)
    assert sharded.steps.shape == (6,) and bool(jnp.all(sharded.converged))
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(vmapped)):
        assert a.shape == b.shape and bool(jnp.allclose(a, b, rtol=1e-12, atol=1e-14, equal_nan=True)), (a, b)
    print("devices", len(sharded.state.params.sharding.device_set), flush=True)
    """
)


def test_sharded_batch_equals_vmapped_batch():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_ENABLE_X64="1", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "devices 4" in out.stdout, out.stdout
