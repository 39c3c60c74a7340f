"""Experiment configs end to end: seeds and sweeps as batched solves, what results.json records,
the table, and what the figure draws. Bad configs are in test_config_errors.py."""
import copy
import json
import math
import pathlib

import jax
import numpy as np
import pytest
from matplotlib.lines import Line2D

import attnopt
from _toml import dumps
from attnopt import cli, experiments, results
from attnopt.problems.registry import make

ROOT = pathlib.Path(__file__).resolve().parents[1]

TINY = {
    "experiment": {"name": "tiny", "seeds": [3, 4], "max_steps": 25, "tol": 1e-9, "dtype": "float64"},
    "problem": {"name": "softmax", "n": 24, "d": 3, "cond": 5.0, "reg": 0.1, "noise": 0.1},
    "solvers": [{"name": "newton"}, {"name": "adam", "label": "adam-fast", "learning_rate": 0.05}],
}


def config_with(**changes):
    """TINY with ``section__key=value`` changes."""
    config = copy.deepcopy(TINY)
    for name, value in changes.items():
        section, key = name.split("__")
        config[section][key] = value
    return config


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """TINY run once through the command line: (folder, config, runs)."""
    folder = tmp_path_factory.mktemp("tiny")
    (folder / "tiny.toml").write_text(dumps(TINY))
    config = experiments.load_config(folder / "tiny.toml")
    runs = experiments.run(config, folder / "out", log=lambda line: None)
    return folder / "out", config, runs


def test_defaults_and_solver_mapping():
    config = experiments.parse_config({"problem": {"name": "softmax"}, "solvers": [{"name": "lbfgs"}]}, "cfg")
    assert (config.name, config.folder, config.seeds, config.max_steps, config.dtype) == ("cfg", "cfg", (0,), 100, "float64")
    assert (config.out_dir, config.record_every, config.step_axis, config.points()) == (None, None, "auto", [{}])
    solver = experiments.make_solver(config.solvers[0])
    assert isinstance(solver, attnopt.solvers.Solver) and solver.name == "lbfgs"
    assert experiments.make_solver(experiments.SolverSpec("n", "newton", {})) == attnopt.solvers.newton()


def test_results_folder_is_the_config_file_name(tmp_path):
    copied = config_with(experiment__name="default")
    (tmp_path / "mine.toml").write_text(dumps(copied))
    config = experiments.load_config(tmp_path / "mine.toml")
    assert config.name == "default"
    assert experiments.output_folder(config) == (pathlib.Path("results/mine"), "out_dir")
    assert experiments.output_folder(config, "elsewhere", "--out") == (pathlib.Path("elsewhere"), "--out")


def test_run_writes_json_and_png_that_belong_together(tiny_run):
    out, config, runs = tiny_run
    saved = results.load(out)  # checks the PNG's SHA-256 against the JSON
    assert set(saved["files"]) == {"convergence.png"}
    assert (out / "convergence.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert saved["config"]["problem"] == TINY["problem"] and saved["config"]["experiment"]["seeds"] == [3, 4]
    machine = saved["provenance"]
    assert machine["jax"] == jax.__version__ and machine["cpu"] and machine["devices"]
    assert machine["git"] is None or len(machine["git"]["commit"]) == 40
    assert [r["label"] for r in saved["runs"]] == ["newton", "adam-fast"]
    for run, record in zip(runs, saved["runs"]):
        assert record["status"] == list(run.status) and record["steps"] == list(run.steps)
        assert record["summary"]["loss"]["median"] == pytest.approx(np.median(run.loss))
        assert len(record["params"]) == 2 and all(len(p) == 3 for p in record["params"])
        assert len(record["distance"]) == 2 and record["optimum"] is None  # reg > 0: the optimum is not known
        for seed, trace in zip((3, 4), record["trace"]):
            inst = make("softmax", jax.random.PRNGKey(seed), n=24, d=3, cond=5.0, reg=0.1, noise=0.1)
            assert trace["loss"][0] == pytest.approx(float(inst.problem.loss(inst.x0)), rel=1e-12)
            assert len(trace["loss"]) == len(trace["step"]) == record["steps"][(3, 4).index(seed)] + 1
    newton, adam = runs
    assert newton.status == ("CONVERGED", "CONVERGED") and max(newton.grad_norm) <= 1e-9
    assert adam.status == ("MAX_STEPS", "MAX_STEPS") and adam.steps == (25, 25)


def test_sweep_batches_equal_shapes_and_matches_single_solves():
    sweep = config_with(problem__n=[24, 30], problem__cond=[2.0, 10.0])
    sweep["solvers"] = [{"name": "newton"}]
    runs = experiments.solve_all(experiments.parse_config(sweep, "sweep"), log=lambda line: None)
    assert [r.point for r in runs] == [{"n": n, "cond": c} for n in (24, 30) for c in (2.0, 10.0)]
    assert all(r.batch == 4 for r in runs)  # per size: both conditionings and both seeds in one vmapped solve
    run = runs[1]  # n = 24, cond = 10, seed 4
    inst = make("softmax", jax.random.PRNGKey(4), n=24, d=3, cond=10.0, reg=0.1, noise=0.1)
    alone = attnopt.solve(inst.problem, inst.x0, attnopt.solvers.newton(), max_steps=25, tol=1e-9)
    assert run.steps[1] == int(alone.steps) and run.status[1] == attnopt.Status(int(alone.status)).name
    np.testing.assert_allclose(run.params[1], alone.state.params, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(run.distance[1], np.linalg.norm(alone.state.params - inst.solution)
                               / np.linalg.norm(inst.solution), rtol=1e-10)


def test_stationary_point_above_the_known_optimum_is_flagged():
    # Noiseless planted instance without regularisers: the optimum is 0. A loose tolerance stops Newton early,
    # at a point whose gradient is small but whose loss is far above 0: CONVERGED, but not a global minimum.
    loose = config_with(problem__reg=0.0, problem__noise=0.0, experiment__tol=1e-2)
    loose["solvers"] = [{"name": "newton"}]
    runs = experiments.solve_all(experiments.parse_config(loose, "loose"), log=lambda line: None)
    (newton,) = runs
    assert newton.optimum == 0.0 and set(newton.status) == {"CONVERGED"}
    tolerance = math.sqrt(np.finfo(np.float64).eps)
    for flag, loss, start in zip(newton.global_minimum, newton.loss, newton.initial_loss):
        assert flag == (loss <= tolerance * max(1.0, start))
    assert False in newton.global_minimum
    table = experiments.summary_table(runs)
    assert "global min" in table and "stationary point" in table
    figure = experiments.plot_convergence(runs, tol=1e-2)
    rings = [l for ax in figure.axes for l in ax.lines if l.get_markeredgecolor() == "red"]
    assert rings, "a converged run above the known optimum must carry a red ring"


def lines(ax):
    return [l for l in ax.lines if isinstance(l, Line2D)]


def test_figure_keeps_the_best_run_s_last_point_and_marks_status_and_tolerance(tiny_run):
    _, config, runs = tiny_run
    figure = experiments.plot_convergence(runs, tol=config.tol, step_axis="auto")
    loss_ax, _, grad_ax, time_ax = figure.axes[0], figure.axes[1], figure.axes[2], figure.axes[3]
    medians = [l for l in lines(loss_ax) if len(l.get_xdata()) > 1 and l.get_linestyle() == "-"]
    assert len(medians) == len(runs)
    for line, run in zip(medians, runs):
        last_step = max(max(t["step"]) for t in run.trace)
        assert line.get_xdata()[-1] == last_step
        assert np.isfinite(line.get_ydata()[-1]) and line.get_ydata()[-1] > 0  # the best run keeps its last point too
        markers = [l for l in lines(loss_ax) if len(l.get_xdata()) == 1 and l.get_color() == line.get_color()]
        assert markers and markers[0].get_marker() == experiments._MARKERS[run.status[0]]
    assert loss_ax.get_xscale() == "symlog"  # newton stops within a few steps, adam runs 25
    assert any(np.allclose(l.get_ydata(), config.tol) for l in lines(grad_ax))
    times = sorted(float(c.get_xdata()[0]) for c in time_ax.lines if c.get_marker() in experiments._MARKERS.values())
    assert times == sorted(r.wall_s for r in runs)
    assert "wall time" in time_ax.get_xlabel()
    linear = experiments.plot_convergence(runs, step_axis="linear")
    assert linear.axes[0].get_xscale() == "linear"


def test_table_gives_median_and_quartiles_across_seeds(tiny_run):
    _, _, runs = tiny_run
    table = experiments.summary_table(runs)
    newton = runs[0]
    q25, median, q75 = np.percentile(newton.loss, [25, 50, 75])
    row = next(line for line in table.splitlines() if line.startswith("newton"))
    assert f"{median:.6g} [{q25:.3g}, {q75:.3g}]" in row
    assert "CONVERGED 2/2" in row and "median [25%, 75%]" in table


@pytest.mark.slow
def test_sweep_config_with_8_seeds_runs_and_draws_medians_with_bands(tmp_path, capsys):
    path = ROOT / "configs" / "softmax_sweep.toml"
    config = experiments.load_config(path)
    assert len(config.seeds) == 8 and config.swept() == ["d"] and len(config.points()) == 2
    assert cli.main(["run", str(path), "--out", str(tmp_path / "out")]) == 0
    saved = results.load(tmp_path / "out")
    assert len(saved["runs"]) == 2 * len(config.solvers)
    figure_runs = [r for r in saved["runs"] if r["solver"] == "newton"]
    assert all(r["statuses"] == {"CONVERGED": 8} and r["global_minimum"] == [True] * 8 for r in figure_runs)
    assert "median [25%, 75%]" in capsys.readouterr().out


def test_generator_table_lists_the_registry_and_is_in_the_docs():
    table = experiments.generator_table()
    for name in attnopt.problems.registry.GENERATORS:
        row = next(line for line in table.splitlines() if line.startswith(f"| `{name}` |"))
        assert all(f"`{option} = " in row for option in attnopt.problems.registry.options(name) if option != "dtype")
    assert table in (ROOT / "docs" / "problems.md").read_text()


def test_readme_lists_every_generator_as_the_registry_renders_it():
    assert experiments.generator_table() in (ROOT / "README.md").read_text()


def test_results_json_is_strict_json(tiny_run):
    out, _, _ = tiny_run
    json.loads((out / "results.json").read_text(), parse_constant=lambda name: pytest.fail(f"{name} in results.json"))


@pytest.mark.slow
def test_attention_planted_flags_newton_s_spurious_stationary_point():
    """Noiseless planted attention: Newton converges to a stationary point with loss about 1e-3 (optimum 0)."""
    raw = experiments.tomllib.loads((ROOT / "configs" / "attention_planted.toml").read_text())
    raw["solvers"] = [{"name": "newton"}]
    (newton,) = experiments.solve_all(experiments.parse_config(raw, "attention_planted"), log=lambda line: None)
    assert newton.status == ("CONVERGED",) and newton.optimum == 0.0 and newton.loss[0] > 1e-6
    assert newton.global_minimum == (False,)


# ---------------------------------------------------------------- max-margin studies (attnopt.maxmargin.experiments)


def test_svm_rank_counts_infeasible_instances_once_for_both_norms():
    """Near the feasibility boundary (small d) the SVMs are badly scaled; both norms must agree on
    feasibility, solve to KKT 1e-10, and the figure must show the infeasible counts."""
    from attnopt.maxmargin.experiments import svm_rank

    results, figure = svm_rank(sizes=[[5, 5]], dims=[2, 3, 4, 8], instances=5)
    (entry,) = results["sizes"]
    assert entry["feasibility_disagreements"] == 0 and 0 < sum(entry["infeasible"]) < 4 * 5
    assert max(entry["fro_max_kkt_residual"], entry["nuc_max_kkt_residual"]) <= 1e-10
    ranges = zip(entry["d"], entry["infeasible"], entry["fro_rank_range"], entry["nuc_rank_range"])
    for d, infeasible, fro, nuc in ranges:
        assert (fro is None) == (nuc is None) == (infeasible == 5)
        assert fro is None or 1 <= nuc[0] <= fro[1] <= min(5, d)
    rank_fro, rank_nuc, counts = figure.axes
    assert list(counts.lines[0].get_ydata()) == entry["infeasible"]
    assert "10^{-6}" in rank_nuc.get_ylabel()


def test_local_converge_solves_each_distinct_svm_once_and_reports_both_norms():
    from attnopt.maxmargin.experiments import local_converge

    results, figure = local_converge(instances=3, steps=200, report_steps=[100, 200])
    assert 3 <= results["distinct_svms"] <= 6
    for name in ("W", "KQ"):
        run = results["parametrisations"][name]
        assert run["feasible_fro"] == run["feasible_nuc"] == 3
        assert max(run["max_kkt_residual_fro"], run["max_kkt_residual_nuc"]) <= 1e-10
        for norm in ("fro", "nuc"):
            summary = run[f"corr_{norm}"]["200"]
            assert -1 <= summary["p10"] <= summary["median"] <= summary["p90"] <= 1
    corr_W, corr_KQ, saturation = figure.axes
    assert corr_W.get_xscale() == saturation.get_xscale() == "log"
    assert [t.get_text() for t in corr_W.get_legend().get_texts()][:2] == ["Frobenius W-SVM", "nuclear-norm W-SVM"]
