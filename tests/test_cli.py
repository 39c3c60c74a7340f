"""The command line: `attnopt check` exit codes and `attnopt run CONFIG [--out DIR]`."""
import json
import subprocess
import sys

import pytest

import attnopt.solvers
from attnopt import cli
from attnopt.problems import registry
from attnopt.problems.regression import SoftmaxRegression, softmax_instance


class WrongGradient(SoftmaxRegression):
    """A planted bug: the gradient is off by a factor 2."""

    def grad(self, x):
        return 2 * super().grad(x)


def wrong_instance(key, n=16, d=6):
    inst = softmax_instance(key, n=n, d=d, reg=0.1)
    p = inst.problem
    return inst._replace(problem=WrongGradient(p.A, p.b, p.reg, p.ridge))


@pytest.fixture
def only(monkeypatch):
    """Restrict the registry to the given generators (keeps `attnopt check` fast)."""

    def restrict(**generators):
        monkeypatch.setattr(registry, "GENERATORS", generators)

    return restrict


def test_check_passes_on_correct_problems(only, capsys):
    only(softmax=softmax_instance)
    assert cli.main(["check"]) == 0
    assert "softmax" in capsys.readouterr().out


def test_check_fails_on_a_wrong_gradient(only, capsys):
    only(softmax=softmax_instance, wrong=wrong_instance)
    assert cli.main(["check", "--seed", "1"]) == 1
    assert "FAILED: wrong" in capsys.readouterr().err


CONFIG = """
[experiment]
name = "cli"
max_steps = 10
tol = 1e-9

[problem]
name = "softmax"
n = 12
d = 2
reg = 0.1

[[solvers]]
name = "newton"
"""


def test_run_writes_results_to_out(tmp_path, capsys):
    path = tmp_path / "cli.toml"
    path.write_text(CONFIG)
    assert cli.main(["run", str(path), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "CONVERGED" in out and "newton" in out
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["runs"][0]["status"] == "CONVERGED"
    assert (tmp_path / "out" / "convergence.png").stat().st_size > 0


def test_run_rejects_a_bad_config_before_solving(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(attnopt.solvers, "solve", lambda *a, **k: pytest.fail("solve ran"))
    path = tmp_path / "bad.toml"
    path.write_text(CONFIG.replace('name = "newton"', 'name = "newton"\nstep = 1.0'))
    assert cli.main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "solvers[0].step: unknown option" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_module_entry_point_reports_a_missing_config(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "attnopt", "run", str(tmp_path / "missing.toml")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "missing.toml" in proc.stderr
