"""Max-margin claims checked numerically: NGD aligns with the ATT-SVM, K, Q runs are low rank, the
regularization path converges in direction to the max-margin solution; every config parses."""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from attnopt import experiments
from attnopt.maxmargin import attention_svm, numerical_rank
from attnopt.maxmargin.experiments import local_converge_data, single_input
from attnopt.maxmargin.path import regularization_path
from attnopt.problems.maxmargin import PromptAttention
from attnopt.solvers import normalized_gd, solve

ROOT = pathlib.Path(__file__).resolve().parents[1]


def single_input_problem():
    X = jnp.asarray([[[-0.1, 1.0, 1.0], [1.0, 0.0, 0.9], [0.0, 0.0, 0.9]]])
    return PromptAttention(X, jnp.ones(1), v=jnp.asarray([0.0, 0.0, 1.0]), W=jnp.diag(jnp.asarray([1.0, 1.0, 0.0])))


def test_single_input_ngd_aligns_with_the_global_svm_in_float64():
    results, figure = single_input(steps=1000)
    original = results["variants"]["original"]
    svm = {s["token"]: s for s in original["svm"]}
    # The ATT-SVM of token 0 by enumerating active sets: p.(k0 - k1) >= 1 and p.(k0 - k2) >= 1 (keys W^T x).
    k = np.array([[-0.1, 1.0], [1.0, 0.0], [0.0, 0.0]])
    C = k[0] - k[1:]
    candidates = [C[list(a)].T @ np.linalg.solve(C[list(a)] @ C[list(a)].T, np.ones(len(a))) for a in ([0], [1], [0, 1])]
    best = min((p for p in candidates if np.all(C @ p >= 1 - 1e-12)), key=lambda p: p @ p)
    np.testing.assert_allclose(svm[0]["half_norm_squared"], 0.5 * best @ best, rtol=1e-10)
    assert svm[0]["locally_optimal"]
    for run in original["runs"]:
        assert run["token"] == 0 and run["corr_final"] > 0.99
    # With the last token zeroed, token 1 becomes locally optimal and the far negative starts go there.
    zero_last = results["variants"]["zero_last"]
    assert {s["token"]: s["locally_optimal"] for s in zero_last["svm"]}[1]
    assert {r["token"] for r in zero_last["runs"]} == {0, 1}
    assert all(r["corr_final"] > 0.99 for r in zero_last["runs"])
    assert len(figure.axes) == 4


def test_kq_iterates_have_markedly_lower_rank_than_w_iterates():
    W_problems, KQ_problems, (K0, Q0), W0 = local_converge_data(3, 2, 6, 8, 10, "float64")
    first = lambda tree: jax.tree.map(lambda x: x[0], tree)
    W_run = solve(first(W_problems), W0[0], normalized_gd(0.1), max_steps=1000, tol=0.0)
    KQ_run = solve(first(KQ_problems), (K0[0], Q0[0]), normalized_gd(0.1), max_steps=1000, tol=0.0)
    W_final = W_run.state.params
    KQ_final = KQ_run.state.params[0] @ KQ_run.state.params[1].T
    assert int(numerical_rank(KQ_final, 1e-3)) + 2 <= int(numerical_rank(W_final, 1e-3))


def test_regularization_path_matches_a_constrained_reference_and_converges_to_the_svm():
    problem = single_input_problem()
    path = regularization_path(problem, jnp.geomspace(0.1, 1000.0, 25))
    assert bool(jnp.all(path.converged)) and float(jnp.max(path.kkt_residual)) <= 1e-10
    np.testing.assert_allclose(jnp.linalg.norm(path.params, axis=1), path.radii, rtol=1e-12)
    assert bool(jnp.all(path.multiplier >= 0))
    for R in (1.0, 5.0):
        ours = regularization_path(problem, jnp.asarray([R]))
        reference = scipy.optimize.minimize(
            lambda p: float(problem.loss(jnp.asarray(p))), np.array([0.1, 0.1, 0.0]),
            jac=lambda p: np.asarray(problem.grad(jnp.asarray(p))), method="SLSQP",
            constraints=[{"type": "ineq", "fun": lambda p: R**2 - p @ p, "jac": lambda p: -2 * p}],
            options={"ftol": 1e-15, "maxiter": 500},
        )
        assert reference.success
        np.testing.assert_allclose(ours.params[0, :2], reference.x[:2], atol=1e-6)
        assert float(ours.loss[0]) <= reference.fun + 1e-12
    svm = attention_svm(problem, jnp.asarray([0]))
    direction = np.asarray(svm.solution) / float(svm.objective)
    corr = np.asarray(path.params) @ direction / np.asarray(path.radii)
    assert corr[-1] > 0.999 and corr[-1] > corr[len(corr) // 2] > corr[0]


def test_regularization_path_bad_radii():
    problem = single_input_problem()
    for radii in ([], [1.0, 0.5], [0.0, 1.0], [1.0, np.inf]):
        with pytest.raises(ValueError, match="radii"):
            regularization_path(problem, jnp.asarray(radii))


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.stem)
def test_every_config_parses(path):
    config = experiments.load_config(path)
    assert config.name == path.stem
