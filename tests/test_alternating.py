"""The alternating solver on planted attention regression: convergence, the block variant, state type, vmap, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnopt
from attnopt.problems.attention import AttentionParams
from attnopt.problems.registry import make
from attnopt.solvers.alternating import alternating
from attnopt.solvers.loop import solve
from attnopt.solvers.state import SolverState, Status


def planted(seed=0, n=8, d=3, **options):
    return make("attention", jax.random.PRNGKey(seed), n=n, d=d, start="near", start_noise=0.1, **options)


def test_reaches_the_planted_zero_loss_quadratically():
    inst = planted()
    result = solve(inst.problem, inst.x0, alternating(), max_steps=30, tol=1e-10)
    assert int(result.status) == Status.CONVERGED
    assert float(result.state.value) < 1e-10
    assert float(inst.problem.loss(result.state.params)) < 1e-10
    assert isinstance(result.state.params, AttentionParams)
    loss = np.asarray(result.trace.loss[: int(result.steps) + 1])
    assert np.all(np.diff(loss) <= 1e-15)
    # superlinear at the end: the last ratios of successive losses shrink fast
    tail = loss[loss > 1e-28][-4:]
    ratios = tail[1:] / tail[:-1]
    assert ratios[-1] < 1e-3 and ratios[-1] < ratios[0]


def test_init_solves_for_y():
    inst = planted(1)
    state = alternating().init(inst.problem, inst.x0)
    np.testing.assert_allclose(state.params.Y, inst.problem.solve_y(inst.x0.X), rtol=1e-12)
    assert float(jnp.linalg.norm(state.grad.Y)) < 1e-10


def test_block_variant_decreases_the_loss():
    """The papers' scheme (H_XX alone) descends but is much slower than the reduced Newton step."""
    inst = planted(2)
    solver = alternating(hessian="block")
    assert solver.name == "alternating_block"
    block = solve(inst.problem, inst.x0, solver, max_steps=10, tol=1e-10)
    reduced = solve(inst.problem, inst.x0, alternating(), max_steps=10, tol=1e-10)
    loss = np.asarray(block.trace.loss)
    assert np.all(np.diff(loss) <= 1e-15) and loss[-1] < loss[0]
    assert float(reduced.state.value) < float(block.state.value)


def test_state_type_matches_newton_and_survives_cond():
    inst = planted(3)
    solver = alternating()
    state = solver.init(inst.problem, inst.x0)
    assert type(state) is SolverState
    # init keeps X0 and replaces Y by the exact least-squares solve.
    np.testing.assert_array_equal(state.params[0], inst.x0[0])
    np.testing.assert_allclose(state.params[1], inst.problem.solve_y(inst.x0[0]), rtol=1e-12, atol=1e-14)
    stepped = jax.jit(lambda s: jax.lax.cond(True, lambda t: solver.step(inst.problem, t), lambda t: t, s))(state)
    assert jax.tree.structure(stepped) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(stepped), jax.tree.leaves(state)):
        assert a.shape == b.shape and a.dtype == b.dtype


def test_vmap_equals_single_solves():
    insts = [planted(seed) for seed in range(2)]
    problems = attnopt.stack([i.problem for i in insts])
    x0s = jax.tree.map(lambda *a: jnp.stack(a), *[i.x0 for i in insts])
    batched = jax.vmap(lambda p, x: solve(p, x, alternating(), max_steps=15, tol=1e-10))(problems, x0s)
    for k, inst in enumerate(insts):
        single = solve(inst.problem, inst.x0, alternating(), max_steps=15, tol=1e-10)
        assert int(batched.steps[k]) == int(single.steps)
        np.testing.assert_allclose(batched.state.params.X[k], single.state.params.X, rtol=1e-8, atol=1e-10)


def test_errors():
    with pytest.raises(ValueError, match="hessian must be one of"):
        alternating(hessian="full")
    with pytest.raises(ValueError, match="c1 must be"):
        alternating(c1=0.7)
    matrix = make("matrix_softmax", jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"alternating.*MatrixSoftmaxRegression.*solve_y"):
        solve(matrix.problem, matrix.x0, alternating())
    inst = planted()
    with pytest.raises(ValueError, match=r"pair \(X, Y\)"):
        alternating().init(inst.problem, (inst.x0.X,))
