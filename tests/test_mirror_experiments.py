"""The l_p mirror-descent experiments: one vmapped sweep over p, alignment with the l_p SVMs."""
import jax
import numpy as np

from attnopt.maxmargin.lp import bregman
from attnopt.maxmargin.experiments import local_converge_data
from attnopt.maxmargin.mirror_experiments import _md_runs, joint_md, local_md, record_W
from attnopt.solvers import mirror_descent, solve


def test_sweep_over_p_equals_one_solve_per_p_from_the_shared_start():
    problems, *_ = local_converge_data(3, 2, 3, 4, 3, "float64")
    W0 = jax.random.normal(jax.random.key(1), (2, 3, 3))
    ps = (1.5, 2.0, 3.0)
    runs = _md_runs(problems, W0, ps, learning_rate=0.1, steps=40, record_every=10, metrics=record_W)
    for i, p in enumerate(ps):
        for k in range(2):
            problem = jax.tree.map(lambda x: x[k], problems)
            single = solve(problem, W0[k], mirror_descent(0.1, p), max_steps=40, tol=0.0)
            np.testing.assert_allclose(runs.state.params[i, k], single.state.params, rtol=1e-12, atol=1e-12)
            np.testing.assert_array_equal(runs.trace.metrics["W"][i, k, 0], W0[k])


def test_joint_md_aligns_w_and_v_with_the_lp_svms_of_the_selection_for_each_p():
    results, figure = joint_md(budgets=[500, 500, 3000])
    assert [run["p"] for run in results["runs"]] == [1.75, 2.0, 3.0]
    for run in results["runs"]:
        assert run["W_svm_feasible"] and run["v_svm_feasible"]
        assert run["cos_W"] > 0.99 and run["cos_v"] > 0.99, run
        assert 0 <= run["bregman_W"] < 0.01
        # the reported divergence is the one of the reported solutions
        W_svm, W = np.asarray(run["W_svm"]), np.asarray(run["W_final"])
        np.testing.assert_allclose(run["bregman_W"], float(bregman(W_svm, W, run["p"])), rtol=1e-9)
    assert len(figure.axes) >= 3


def test_local_md_is_closest_to_its_own_lp_svm():
    """The published table: each l_p-MD run ends nearest (in its own Bregman divergence) to the l_p W-SVM."""
    results, _ = local_md(instances=8, steps=800, record_every=100)
    table = np.asarray(results["bregman_median_table"])
    assert np.all(table >= 0)
    np.testing.assert_array_equal(np.argmin(table, axis=1), np.arange(3))
    assert 0 <= results["selections_agree"] <= results["tokens_agree"] <= 1
    for run in results["runs"]:
        assert run["feasible"] == 8 and run["max_kkt_residual"] < 1e-8

