"""The command line: `attnopt check` (progress, exit codes), `attnopt run` (results, interruption),
`attnopt problems` and the help. Bad configs and misuse are in test_config_errors.py."""
import os
import signal
import subprocess
import sys

import pytest

from attnopt import cli, experiments, results
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


def test_check_passes_on_correct_problems_and_shows_progress(only, capsys):
    only(softmax=softmax_instance)
    assert cli.main(["check"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("[1/1] softmax ... ok (") and "all 1 problems match autodiff" in out


def test_check_fails_on_a_wrong_gradient(only, capsys):
    only(softmax=softmax_instance, wrong=wrong_instance)
    assert cli.main(["check", "--seed", "1", "wrong"]) == 1
    captured = capsys.readouterr()
    assert "[1/1] wrong ... FAILED" in captured.out and "softmax" not in captured.out
    assert "FAILED: wrong" in captured.err


def test_problems_lists_every_generator(capsys):
    assert cli.main(["problems"]) == 0
    assert capsys.readouterr().out.strip() == experiments.generator_table()


def test_help_names_the_commands_and_exit_codes(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for word in ("check", "run", "problems", "exit status", "130", "143"):
        assert word in text


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
    saved = results.load(tmp_path / "out")
    assert saved["runs"][0]["status"] == ["CONVERGED"]


def previous_results(folder):
    with results.claim(folder) as output:
        output.commit({"previous": True}, {"convergence.png": b"previous figure"})


def test_ctrl_c_stops_with_one_line_and_keeps_the_previous_results(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(experiments, "solve_all", interrupted)
    path = tmp_path / "cli.toml"
    path.write_text(CONFIG)
    previous_results(tmp_path / "out")
    assert cli.main(["run", str(path), "--out", str(tmp_path / "out")]) == 130
    err = capsys.readouterr().err.strip()
    assert err == f"attnopt run: interrupted (SIGINT); {tmp_path / 'out'}: its previous contents are unchanged"
    assert results.load(tmp_path / "out")["previous"] is True


def test_sigterm_during_a_run_stops_cleanly_and_keeps_the_previous_results(tmp_path):
    path = tmp_path / "cli.toml"
    path.write_text(CONFIG)
    out = tmp_path / "out"
    previous_results(out)
    process = subprocess.Popen(
        [sys.executable, "-m", "attnopt", "run", str(path), "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    for line in process.stdout:
        if "compiling" in line:
            break
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert err.strip().splitlines()[-1] == f"attnopt run: interrupted (SIGTERM); {out}: its previous contents are unchanged"
    assert "Traceback" not in err
    saved = results.load(out)
    assert saved["previous"] is True and "runs" not in saved


def test_module_entry_point_reports_a_missing_config(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "attnopt", "run", str(tmp_path / "missing.toml")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"attnopt run: {tmp_path / 'missing.toml'}: No such file or directory"
