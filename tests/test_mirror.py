"""l_p mirror descent: p = 2 is normalized GD, the mirror maps invert, the optax form equals the solver."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attnopt.problems.registry import make
from attnopt.solvers import from_optax, mirror_descent, mirror_descent_transform, normalized_gd, solve
from attnopt.solvers.mirror import dual_norm, inverse_mirror_map, mirror_map


def cross_attention():
    return make("cross_attention", jax.random.key(0), n=4, T=5, d=3)


def test_p2_equals_normalized_gd():
    inst = cross_attention()
    md = solve(inst.problem, inst.x0, mirror_descent(0.1, 2.0), max_steps=200, tol=0.0)
    ngd = solve(inst.problem, inst.x0, normalized_gd(0.1), max_steps=200, tol=0.0)
    np.testing.assert_allclose(md.trace.loss, ngd.trace.loss, rtol=1e-12)
    np.testing.assert_allclose(md.state.params, ngd.state.params, rtol=1e-11, atol=1e-13)


@settings(max_examples=25, deadline=None)
@given(p=st.floats(1.1, 6.0), seed=st.integers(0, 1000))
def test_mirror_maps_are_inverses_and_dual_norm_is_the_q_norm(p, seed):
    w = jax.random.normal(jax.random.key(seed), (7,)) * 3
    np.testing.assert_allclose(inverse_mirror_map(mirror_map(w, p), p), w, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(mirror_map(inverse_mirror_map(w, p), p), w, rtol=1e-12, atol=1e-14)
    q = p / (p - 1)
    np.testing.assert_allclose(dual_norm(w, p), np.sum(np.abs(np.asarray(w)) ** q) ** (1 / q), rtol=1e-12)


def test_normalized_step_has_unit_dual_norm_in_the_dual_space():
    """psi'(w+) - psi'(w) = -eta g / ||g||_q: the mirror-space step has q-norm eta."""
    w, g, p = jnp.asarray([0.3, -1.2, 2.0]), jnp.asarray([1.0, 0.5, -4.0]), 3.0
    from attnopt.solvers.mirror import mirror_step

    w_next = mirror_step(w, g, 0.1, p, 0.0, True)
    np.testing.assert_allclose(dual_norm(mirror_map(w_next, p) - mirror_map(w, p), p), 0.1, rtol=1e-12)


def test_optax_transform_equals_the_solver_and_takes_a_schedule():
    inst = cross_attention()
    solver = solve(inst.problem, inst.x0, mirror_descent(0.05, 3.0), max_steps=50, tol=0.0)
    chained = solve(inst.problem, inst.x0, from_optax(mirror_descent_transform(0.05, 3.0)), max_steps=50, tol=0.0)
    np.testing.assert_allclose(chained.state.params, solver.state.params, rtol=1e-12)
    decay = solve(inst.problem, inst.x0, from_optax(mirror_descent_transform(optax.exponential_decay(0.05, 10, 0.5), 3.0)),
                  max_steps=50, tol=0.0)
    steps = np.asarray(decay.trace.step_size)
    assert steps[-1] < steps[1]


def test_sweep_over_p_is_one_program():
    inst = cross_attention()
    ps = jnp.asarray([1.75, 2.0, 3.0])
    batched = jax.vmap(lambda p: solve(inst.problem, inst.x0, mirror_descent(0.1, p), max_steps=30, tol=0.0))(ps)
    for k, p in enumerate([1.75, 2.0, 3.0]):
        single = solve(inst.problem, inst.x0, mirror_descent(0.1, p), max_steps=30, tol=0.0)
        np.testing.assert_allclose(batched.state.params[k], single.state.params, rtol=1e-10)


def test_bad_options():
    for kwargs, match in [({"p": 1.0}, "p must be"), ({"learning_rate": 0.0}, "learning_rate"), ({"eps": -1.0}, "eps")]:
        with pytest.raises(ValueError, match=match):
            mirror_descent(**kwargs)
    with pytest.raises(ValueError, match="normalized"):
        mirror_descent(normalized="yes")
