"""Experiment configs: validation before any work, and an end-to-end run writing JSON and PNG."""
import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnopt.solvers
from attnopt import experiments
from attnopt.problems.registry import make

TINY = {
    "experiment": {"name": "tiny", "seed": 3, "max_steps": 25, "tol": 1e-9, "dtype": "float64"},
    "problem": {"name": "softmax", "n": 24, "d": 3, "cond": 5.0, "reg": 0.1, "noise": 0.1},
    "solvers": [
        {"name": "newton"},
        {"name": "adam", "label": "adam-fast", "learning_rate": 0.05},
    ],
}

TINY_TOML = """
[experiment]
name = "tiny"
seed = 3
max_steps = 25
tol = 1e-9

[problem]
name = "softmax"
n = 24
d = 3
cond = 5.0
reg = 0.1
noise = 0.1

[[solvers]]
name = "newton"

[[solvers]]
name = "adam"
label = "adam-fast"
learning_rate = 0.05
"""


def with_change(path, value):
    """TINY with ``value`` set at ``path`` (a tuple of keys/indices); ``...`` deletes the key."""
    config = copy.deepcopy(TINY)
    *parents, last = path
    node = config
    for key in parents:
        node = node[key]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return config


@pytest.fixture
def no_solve(monkeypatch):
    """Make any solve fail loudly: validation must finish before the first one."""

    def forbidden(*args, **kwargs):
        raise AssertionError("solve ran before the config was validated")

    monkeypatch.setattr(attnopt.solvers, "solve", forbidden)


BAD = [
    # (path, value, the key the message must name)
    (("experimnt",), {}, "experimnt"),
    (("experiment", "max_step"), 10, "experiment.max_step"),
    (("experiment", "max_steps"), "100", "experiment.max_steps"),
    (("experiment", "max_steps"), 0, "experiment.max_steps"),
    (("experiment", "seed"), True, "experiment.seed"),
    (("experiment", "tol"), "small", "experiment.tol"),
    (("experiment", "dtype"), "float16", "experiment.dtype"),
    (("experiment", "name"), "a/b", "experiment.name"),
    (("problem",), ..., "problem"),
    (("problem", "name"), "sofmax", "problem.name"),
    (("problem", "name"), ..., "problem.name"),
    (("problem", "m"), 24, "problem.m"),
    (("problem", "n"), 24.5, "problem.n"),
    (("problem", "dtype"), "float32", "problem.dtype"),
    (("solvers",), [], "solvers"),
    (("solvers",), {"name": "newton"}, "solvers"),
    (("solvers", 1, "name"), "adamx", r"solvers\[1\].name"),
    (("solvers", 0, "c2"), 0.5, r"solvers\[0\].c2"),
    (("solvers", 0, "c1"), "tiny", r"solvers\[0\].c1"),
    (("solvers", 0, "c1"), 0.9, r"solvers\[0\]: c1"),
    (("solvers", 1, "learning_rat"), 0.1, r"solvers\[1\].learning_rat"),
    (("solvers", 1, "learning_rate"), "fast", r"solvers\[1\].learning_rate"),
    (("solvers", 1, "learning_rate"), ..., r"solvers\[1\].learning_rate"),
    (("solvers", 1, "nesterov"), 1, r"solvers\[1\].nesterov"),
    (("solvers", 1, "label"), "newton", r"solvers\[1\].label"),
    (("problem", "d"), 99, "problem: conditioned_matrix needs n >= d"),  # a value only the generator rejects
]


@pytest.mark.parametrize("path, value, key", BAD, ids=[f"{'.'.join(map(str, p))}={v!r}" for p, v, _ in BAD])
def test_bad_config_names_the_key(no_solve, path, value, key):
    with pytest.raises(ValueError, match=rf"^{key}\b"):
        experiments.parse_config(with_change(path, value))


def test_option_that_a_config_cannot_give_is_named(no_solve):
    config = with_change(("solvers", 1), {"name": "lbfgs", "linesearch": 1})
    with pytest.raises(ValueError, match=r"solvers\[1\].linesearch: cannot be set from a config"):
        experiments.parse_config(config)


def test_bad_toml_file_fails_before_any_solve(no_solve, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(TINY_TOML.replace("learning_rate = 0.05", "learning_rate = 0.05\nbeta1 = 0.9"))
    with pytest.raises(ValueError, match=r"^solvers\[1\]\.beta1: unknown option"):
        experiments.run(experiments.load_config(path), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_invalid_toml_syntax_is_a_value_error(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[experiment\nname = 1")
    with pytest.raises(ValueError, match="invalid TOML"):
        experiments.load_config(path)


def test_defaults_and_solver_mapping():
    config = experiments.parse_config({"problem": {"name": "softmax"}, "solvers": [{"name": "lbfgs"}]}, "cfg")
    assert (config.name, config.seed, config.max_steps, config.dtype, config.out_dir) == ("cfg", 0, 100, "float64", None)
    solver = experiments.make_solver(config.solvers[0])
    assert isinstance(solver, attnopt.solvers.Solver) and solver.name == "lbfgs"
    assert experiments.make_solver(experiments.SolverSpec("n", "newton", {})) == attnopt.solvers.newton()


def test_run_writes_json_and_png_with_the_traces(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_TOML)
    config = experiments.load_config(path)
    lines = []
    runs = experiments.run(config, tmp_path / "out", log=lines.append)

    # The instance the config describes, built independently.
    inst = make("softmax", jax.random.PRNGKey(3), n=24, d=3, cond=5.0, reg=0.1, noise=0.1)
    loss0 = float(inst.problem.loss(inst.x0))
    grad0 = float(jnp.linalg.norm(jax.grad(inst.problem.loss)(inst.x0)))

    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["config"]["problem"] == TINY["problem"]
    assert [r["label"] for r in saved["runs"]] == ["newton", "adam-fast"]
    for run, record in zip(runs, saved["runs"]):
        assert record["status"] == run.status and record["steps"] == run.steps
        trace = record["trace"]
        assert all(len(trace[k]) == run.steps + 1 for k in ("loss", "grad_norm", "step_size"))
        np.testing.assert_allclose(trace["loss"][0], loss0, rtol=1e-12)
        np.testing.assert_allclose(trace["grad_norm"][0], grad0, rtol=1e-10)
        assert record["loss"] == trace["loss"][-1] and record["grad_norm"] == trace["grad_norm"][-1]
        assert record["wall_s"] > 0 and record["warmup_s"] > 0
    newton_run, adam_run = runs
    assert newton_run.status == "CONVERGED" and newton_run.grad_norm <= 1e-9
    assert adam_run.steps == 25 and adam_run.status == "MAX_STEPS"
    assert adam_run.loss < loss0

    image = (tmp_path / "out" / "convergence.png").read_bytes()
    assert image.startswith(b"\x89PNG\r\n\x1a\n") and len(image) > 10_000

    table = experiments.summary_table(runs)
    assert "newton" in table and "adam-fast" in table and "CONVERGED" in table
    assert any("adam-fast" in line and "MAX_STEPS" in line for line in lines)
