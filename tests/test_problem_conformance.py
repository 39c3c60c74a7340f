"""Conformance of every registered problem: derivatives vs autodiff, jit, vmap, bad input, domain.

The table is ``attnopt.problems.registry.GENERATORS``: registering a generator
puts its problem under every test here. Family-specific checks (dense
Kronecker references, Gauss-Newton as a Jacobian Gram, block layouts, planted
solutions) live in the family's own test file.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import attnopt
from attnopt.problems import registry
from attnopt.problems.base import stack

NAMES = sorted(registry.GENERATORS)

# Generator options that switch on every term of the loss, where a generator has them.
ALL_TERMS = {"reg": 0.3, "ridge": 0.2}


def instance(name, seed=0, scale=0.3, dtype="float64"):
    """(problem, params, direction) from generator ``name`` in ``dtype``: params = start + scale * N(0, 1)."""
    known = registry.options(name)
    key = jax.random.PRNGKey(seed)
    options = {k: v for k, v in ALL_TERMS.items() if k in known}
    if "dtype" in known:
        options["dtype"] = dtype
    inst = registry.make(name, key, **options)
    problem, x0 = inst.problem, inst.x0
    if "dtype" not in known:
        problem = problem.rebuild(**{k: getattr(problem, k).astype(dtype) for k in problem.leaves})
        x0 = jax.tree.map(lambda a: a.astype(dtype), x0)
    k_x, k_v = jax.random.split(jax.random.fold_in(key, 1))
    flat, unravel = ravel_pytree(x0)
    x = unravel(flat + scale * jax.random.normal(k_x, flat.shape, flat.dtype))
    v = unravel(jax.random.normal(k_v, flat.shape, flat.dtype))
    return problem, x, v


def outputs(problem, x, v):
    return problem.loss(x), problem.grad(x), problem.hvp(x, v), problem.hessian(x)


def assert_trees_close(got, want, rtol, atol=0.0):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", NAMES)
def test_derivatives_match_autodiff_float64(name):
    points = [instance(name, seed, scale) for seed, scale in ((0, 0.3), (1, 1.0))]
    hand_derived = points[0][0].hand_derived()
    if not hand_derived:
        pytest.skip(f"{type(points[0][0]).__name__} takes grad, hvp and hessian from autodiff")
    for problem, x, v in points:
        report = attnopt.check_derivatives(problem, x, v, name=name)
        assert report.rtol == 1e-10 and set(report.errors) == set(hand_derived)
        assert report.ok, str(report)


@pytest.mark.parametrize("name", NAMES)
def test_derivatives_match_autodiff_float32(name):
    problem, x, v = instance(name, dtype="float32")
    for out in jax.tree.leaves(outputs(problem, x, v)):
        assert out.dtype == jnp.float32
    report = attnopt.check_derivatives(problem, x, v, name=name)
    assert report.dtype == "float32" and report.rtol == attnopt.verify.TOLERANCES[jnp.dtype("float32")][0]
    assert report.ok, str(report)


@pytest.mark.parametrize("name", NAMES)
def test_jit_with_problem_as_argument_equals_eager(name):
    problem, x, v = instance(name, 2)
    jitted = jax.jit(outputs)(problem, x, v)
    with jax.disable_jit():
        eager = outputs(problem, x, v)
    assert_trees_close(jitted, eager, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name", NAMES)
def test_vmap_over_stacked_instances_equals_each(name):
    triples = [instance(name, seed) for seed in range(3)]
    batch = stack([p for p, _, _ in triples])
    xs, vs = (jax.tree.map(lambda *a: jnp.stack(a), *[t[i] for t in triples]) for i in (1, 2))
    batched = jax.vmap(outputs)(batch, xs, vs)
    for i, (p, x, v) in enumerate(triples):
        assert_trees_close(jax.tree.map(lambda a: a[i], batched), outputs(p, x, v), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name", NAMES)
def test_bad_leaf_raises_value_error_naming_it(name):
    problem, _, _ = instance(name)
    same = problem.rebuild()
    assert jax.tree.structure(same) == jax.tree.structure(problem)
    for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(problem)):
        np.testing.assert_array_equal(a, b)
    arguments = problem.arguments()
    for leaf in problem.leaves:
        assert leaf in arguments, f"{leaf} is not an argument of {type(problem).__name__}"
        value = getattr(problem, leaf)
        nan = value.astype(jnp.promote_types(value.dtype, jnp.float32)).at[(0,) * value.ndim].set(jnp.nan)
        wrong_shape = jnp.stack([value, value], axis=-1)
        for bad in (nan, wrong_shape):
            with pytest.raises(ValueError) as err:
                problem.rebuild(**{leaf: bad})
            assert re.search(rf"\b{re.escape(leaf)}\b", str(err.value)), (leaf, str(err.value))


@pytest.mark.parametrize("name", NAMES)
def test_far_point_is_all_finite_or_all_nan(name):
    """Far from the data's scale every output is finite, or every one is NaN (never partly); in_domain agrees."""
    problem, x, v = instance(name)
    for point in (x, jax.tree.map(lambda a: 1e3 * a, x)):
        outs = [np.asarray(o) for o in jax.tree.leaves(outputs(problem, point, v))]
        finite = all(np.all(np.isfinite(o)) for o in outs)
        assert finite or all(np.all(np.isnan(o)) for o in outs), [np.isfinite(o).mean() for o in outs]
        if hasattr(problem, "in_domain"):
            assert bool(problem.in_domain(point)) == finite
        if point is x:
            assert finite, "the test point itself must be inside the domain"
