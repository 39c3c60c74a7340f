"""What `attnopt.solve` and the solver constructors accept: int32-range counts, and x0 of another dtype."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnopt
from attnopt import solvers

PROBLEM = attnopt.SoftmaxRegression(
    jax.random.normal(jax.random.PRNGKey(0), (12, 3)), jnp.full(12, 1 / 12), reg=0.1
)


@pytest.mark.parametrize("name, build", [
    ("max_steps", lambda: attnopt.solve(PROBLEM, jnp.zeros(3), solvers.newton(), max_steps=2**31)),
    ("record_every", lambda: attnopt.solve(PROBLEM, jnp.zeros(3), solvers.newton(), record_every=2**31)),
    ("max_backtracks", lambda: solvers.newton(max_backtracks=2**31)),
    ("max_cg_steps", lambda: solvers.newton_cg(max_cg_steps=2**31)),
    ("num_directions", lambda: solvers.zeroth_order(num_directions=2**31)),
])
def test_counts_beyond_int32_are_refused_naming_the_option(name, build):
    with pytest.raises(ValueError, match=rf"^{name} must be in \["):
        build()


def test_x0_of_another_dtype_is_cast_to_the_problem_s():
    want = attnopt.solve(PROBLEM, jnp.zeros(3), solvers.newton(), tol=1e-12)
    for x0 in (jnp.zeros(3, jnp.float32), [0.0, 0.0, 0.0], np.zeros(3, np.int32)):
        got = attnopt.solve(PROBLEM, x0, solvers.newton(), tol=1e-12)
        assert got.state.params.dtype == jnp.float64
        np.testing.assert_array_equal(got.state.params, want.state.params)
    single = jax.tree.map(lambda a: a.astype(jnp.float32), PROBLEM)
    assert attnopt.solve(single, jnp.zeros(3, jnp.float64), solvers.newton()).state.params.dtype == jnp.float32
