"""Bad configs and command-line misuse: exit status 2, one line naming the key, before any work.

Every case goes through ``attnopt.cli.main`` with the solves and studies replaced by
functions that fail the test if they are called, and checks that no results folder
appeared.
"""
import copy
import re

import pytest

from _toml import dumps
from attnopt import cli, experiments, results, studies

TINY = {
    "experiment": {"name": "tiny", "seed": 3, "max_steps": 25, "tol": 1e-9, "dtype": "float64"},
    "problem": {"name": "softmax", "n": 24, "d": 3, "cond": 5.0, "reg": 0.1, "noise": 0.1},
    "solvers": [{"name": "newton"}, {"name": "adam", "label": "adam-fast", "learning_rate": 0.05}],
}
STUDY = {
    "experiment": {"name": "study", "kind": "local_converge", "dtype": "float64"},
    "settings": {"instances": 2, "n": 2, "T": 3, "d": 2, "steps": 20, "record_every": 10, "report_steps": [10, 20]},
}
DELETE = object()


def changed(base, path, value):
    """``base`` with ``value`` at ``path`` (a tuple of keys and indices); DELETE removes the key."""
    config = copy.deepcopy(base)
    *parents, last = path
    node = config
    for key in parents:
        node = node[key]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return config


CONFIGS = [
    # (id, base, path, value, the key the message must start with)
    ("unknown-section", TINY, ("experimnt",), {}, "experimnt"),
    ("unknown-experiment-key", TINY, ("experiment", "max_step"), 10, "experiment.max_step"),
    ("max_steps-string", TINY, ("experiment", "max_steps"), "100", "experiment.max_steps"),
    ("max_steps-zero", TINY, ("experiment", "max_steps"), 0, "experiment.max_steps"),
    ("max_steps-2**31", TINY, ("experiment", "max_steps"), 2**31, "experiment.max_steps"),
    ("max_steps-float-3e8", TINY, ("experiment", "max_steps"), 3e8, "experiment.max_steps"),
    ("trace-too-long", changed(TINY, ("experiment", "max_steps"), 300_000_000), ("experiment", "record_every"), 1,
     "experiment.record_every"),
    ("record_every-zero", TINY, ("experiment", "record_every"), 0, "experiment.record_every"),
    ("seed-bool", TINY, ("experiment", "seed"), True, "experiment.seed"),
    ("seed-negative", TINY, ("experiment", "seed"), -1, "experiment.seed"),
    ("seeds-empty", changed(TINY, ("experiment", "seed"), DELETE), ("experiment", "seeds"), [], "experiment.seeds"),
    ("seeds-repeated", changed(TINY, ("experiment", "seed"), DELETE), ("experiment", "seeds"), [1, 1], "experiment.seeds"),
    ("seeds-string", changed(TINY, ("experiment", "seed"), DELETE), ("experiment", "seeds"), [0, "1"], r"experiment.seeds\[1\]"),
    ("seed-and-seeds", TINY, ("experiment", "seeds"), [0, 1], "experiment.seeds"),
    ("tol-string", TINY, ("experiment", "tol"), "small", "experiment.tol"),
    ("tol-inf", TINY, ("experiment", "tol"), float("inf"), "experiment.tol"),
    ("tol-negative", TINY, ("experiment", "tol"), -1e-9, "experiment.tol"),
    ("dtype-float16", TINY, ("experiment", "dtype"), "float16", "experiment.dtype"),
    ("name-slash", TINY, ("experiment", "name"), "a/b", "experiment.name"),
    ("name-dotdot", TINY, ("experiment", "name"), "..", "experiment.name"),
    ("step_axis", TINY, ("experiment", "step_axis"), "semilog", "experiment.step_axis"),
    ("out_dir-empty", TINY, ("experiment", "out_dir"), " ", "experiment.out_dir"),
    ("problem-missing", TINY, ("problem",), DELETE, "problem"),
    ("problem-unknown", TINY, ("problem", "name"), "sofmax", "problem.name"),
    ("problem-name-missing", TINY, ("problem", "name"), DELETE, "problem.name"),
    ("problem-unknown-option", TINY, ("problem", "m"), 24, "problem.m"),
    ("n-float", TINY, ("problem", "n"), 24.5, "problem.n"),
    ("n-zero", TINY, ("problem", "n"), 0, "problem.n"),
    ("n-1e9-memory", TINY, ("problem", "n"), 10**9, "problem.n"),
    ("problem-dtype", TINY, ("problem", "dtype"), "float32", "problem.dtype"),
    ("reg-negative", TINY, ("problem", "reg"), -0.1, "problem.reg"),
    ("ridge-negative", TINY, ("problem", "ridge"), -1, "problem.ridge"),
    ("reg-nan", TINY, ("problem", "reg"), float("nan"), "problem.reg"),
    ("reg-inf", TINY, ("problem", "reg"), float("inf"), "problem.reg"),
    ("cond-nan", TINY, ("problem", "cond"), float("nan"), "problem.cond"),
    ("cond-inf", TINY, ("problem", "cond"), float("inf"), "problem.cond"),
    ("cond-below-1", TINY, ("problem", "cond"), 0.5, "problem.cond"),
    ("noise-nan", TINY, ("problem", "noise"), float("nan"), "problem.noise"),
    ("noise-inf", TINY, ("problem", "noise"), float("inf"), "problem.noise"),
    ("scale-inf", TINY, ("problem", "scale"), float("-inf"), "problem.scale"),
    ("d-above-n", TINY, ("problem", "d"), 99, "problem.d"),
    ("sweep-empty", TINY, ("problem", "n"), [], "problem.n"),
    ("sweep-repeated", TINY, ("problem", "n"), [24, 24], "problem.n"),
    ("sweep-bad-value", TINY, ("problem", "cond"), [2.0, 0.5], r"problem.cond\[1\]"),
    ("sweep-too-long", TINY, ("problem", "n"), [24, 25, 26, 27, 28, 29, 30], "problem"),
    ("solvers-empty", TINY, ("solvers",), [], "solvers"),
    ("solvers-table", TINY, ("solvers",), {"name": "newton"}, "solvers"),
    ("solver-unknown", TINY, ("solvers", 1, "name"), "adamx", r"solvers\[1\].name"),
    ("solver-unknown-option", TINY, ("solvers", 0, "c2"), 0.5, r"solvers\[0\].c2"),
    ("c1-string", TINY, ("solvers", 0, "c1"), "tiny", r"solvers\[0\].c1"),
    ("c1-range", TINY, ("solvers", 0, "c1"), 0.9, r"solvers\[0\].c1"),
    ("max_backtracks-2**31", TINY, ("solvers", 0, "max_backtracks"), 2**31, r"solvers\[0\].max_backtracks"),
    ("learning_rate-typo", TINY, ("solvers", 1, "learning_rat"), 0.1, r"solvers\[1\].learning_rat"),
    ("learning_rate-string", TINY, ("solvers", 1, "learning_rate"), "fast", r"solvers\[1\].learning_rate"),
    ("learning_rate-missing", TINY, ("solvers", 1, "learning_rate"), DELETE, r"solvers\[1\].learning_rate"),
    ("learning_rate-nan", TINY, ("solvers", 1, "learning_rate"), float("nan"), r"solvers\[1\].learning_rate"),
    ("adam-eps-inf", TINY, ("solvers", 1, "eps"), float("inf"), r"solvers\[1\].eps"),
    ("schedule-nan", TINY, ("solvers", 1, "learning_rate"), {"name": "cosine_decay_schedule", "init_value": float("nan"),
                                                              "decay_steps": 10}, r"solvers\[1\].learning_rate.init_value"),
    ("nesterov-int", TINY, ("solvers", 1, "nesterov"), 1, r"solvers\[1\].nesterov"),
    ("label-twice", TINY, ("solvers", 1, "label"), "newton", r"solvers\[1\].label"),
    ("label-empty", TINY, ("solvers", 1, "label"), "", r"solvers\[1\].label"),
    ("label-broken-math", TINY, ("solvers", 1, "label"), r"$\frac$", r"solvers\[1\].label"),
    ("lbfgs-linesearch", TINY, ("solvers", 1), {"name": "lbfgs", "linesearch": 1}, r"solvers\[1\].linesearch"),
    ("num_directions-4e9", TINY, ("solvers", 1), {"name": "zeroth_order", "num_directions": 4 * 10**9},
     r"solvers\[1\].num_directions"),
    ("num_directions-float", TINY, ("solvers", 1), {"name": "zeroth_order", "num_directions": 4e9},
     r"solvers\[1\].num_directions"),
    ("approx_newton-eps-1e-300", TINY, ("solvers", 1), {"name": "approx_newton", "eps": 1e-300}, r"solvers\[1\].eps"),
    ("alternating-on-softmax", TINY, ("solvers", 1), {"name": "alternating"}, r"solvers\[1\]"),
    ("study-unknown-kind", STUDY, ("experiment", "kind"), "local_convergence", "experiment.kind"),
    ("study-unknown-key", STUDY, ("experiment", "max_steps"), 10, "experiment.max_steps"),
    ("study-name-dotdot", STUDY, ("experiment", "name"), "..", "experiment.name"),
    ("study-unknown-setting", STUDY, ("settings", "stepz"), 10, "settings.stepz"),
    ("study-steps-zero", STUDY, ("settings", "steps"), 0, "settings.steps"),
    ("study-learning_rate-nan", STUDY, ("settings", "learning_rate"), float("nan"), "settings.learning_rate"),
    ("study-learning_rate-negative", STUDY, ("settings", "learning_rate"), -0.1, "settings.learning_rate"),
    ("study-report-not-recorded", STUDY, ("settings", "report_steps"), [10, 15], r"settings.report_steps\[1\]"),
    ("study-memory", changed(STUDY, ("settings", "instances"), 1000), ("settings", "steps"), 10**7, "settings.steps"),
    ("study-losses", changed(STUDY, ("experiment", "kind"), "diff_loss"), ("settings",), {"losses": ["hinge"]},
     r"settings.losses\[0\]"),
]


@pytest.fixture
def no_work(monkeypatch):
    """Solves and studies fail the test if they start: every check must come first."""

    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the config was checked")

    monkeypatch.setattr(experiments, "solve_all", forbidden)
    monkeypatch.setattr(studies, "run_study", forbidden)


def run_cli(capsys, argv) -> tuple[int, str]:
    """Exit status and stderr of ``attnopt argv`` (argparse errors exit through SystemExit)."""
    try:
        code = cli.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err.strip()


def assert_one_line(err: str, command: str, key: str) -> None:
    assert "\n" not in err, err
    assert re.match(rf"attnopt( {command})?: {key}", err), err


@pytest.mark.parametrize("id_, base, path, value, key", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_bad_config_exits_2_naming_the_key_before_any_work(no_work, tmp_path, capsys, id_, base, path, value, key):
    config = changed(base, path, value)
    file = tmp_path / "bad.toml"
    file.write_text(dumps(config))
    code, err = run_cli(capsys, ["run", str(file), "--out", str(tmp_path / "out")])
    assert code == 2, err
    assert_one_line(err, "run", key)
    assert not (tmp_path / "out").exists()


# (id, argv, the key the message must start with); {tmp} is the test's folder, holding the files of make_files.
MISUSE = [
    ("no-command", [], "the following arguments are required: COMMAND"),
    ("unknown-command", ["runn"], "argument COMMAND: invalid choice"),
    ("run-without-config", ["run"], "the following arguments are required: config"),
    ("unknown-flag", ["run", "{tmp}/good.toml", "--outt", "x"], "unrecognized arguments"),
    ("missing-config", ["run", "{tmp}/missing.toml"], "{tmp}/missing.toml"),
    ("config-is-a-folder", ["run", "{tmp}"], "{tmp}: is a folder"),
    ("invalid-toml", ["run", "{tmp}/broken.toml"], "{tmp}/broken.toml: invalid TOML"),
    ("binary-config", ["run", "{tmp}/binary.toml"], "{tmp}/binary.toml: not a text file"),
    ("out-is-a-file", ["run", "{tmp}/good.toml", "--out", "{tmp}/a_file"], "--out: .* is a file"),
    ("out-unwritable", ["run", "{tmp}/good.toml", "--out", "/proc/attnopt-test/out"], "--out: cannot write"),
    ("out-under-a-file", ["run", "{tmp}/good.toml", "--out", "{tmp}/a_file/out"], "--out: cannot write"),
    ("config-out_dir-is-a-file", ["run", "{tmp}/out_file.toml"], "experiment.out_dir: .* is a file"),
    ("check-seed", ["check", "--seed", "x"], "argument --seed"),
    ("check-unknown-problem", ["check", "sofmax"], "unknown problem"),
]


def make_files(tmp_path):
    (tmp_path / "good.toml").write_text(dumps(TINY))
    (tmp_path / "a_file").write_text("")
    (tmp_path / "broken.toml").write_text("[experiment\nname = 1")
    (tmp_path / "binary.toml").write_bytes(b"\xff\xfe\x00")
    (tmp_path / "out_file.toml").write_text(dumps(changed(TINY, ("experiment", "out_dir"), str(tmp_path / "a_file"))))


@pytest.mark.parametrize("id_, argv, key", MISUSE, ids=[c[0] for c in MISUSE])
def test_command_line_misuse_exits_2_with_one_line(no_work, tmp_path, capsys, id_, argv, key):
    make_files(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    code, err = run_cli(capsys, [a.format(tmp=tmp_path) for a in argv])
    assert code == 2, err
    command = argv[0] if argv and argv[0] in ("run", "check") else "run"
    assert_one_line(err, command, key.format(tmp=re.escape(str(tmp_path))))
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no results folder appeared


def test_a_folder_in_use_is_refused_before_any_work(no_work, tmp_path, capsys):
    config = tmp_path / "tiny.toml"
    config.write_text(dumps(TINY))
    with results.claim(tmp_path / "out", "--out"):
        code, err = run_cli(capsys, ["run", str(config), "--out", str(tmp_path / "out")])
    assert code == 2
    assert_one_line(err, "run", "--out")
    assert "in use by another attnopt run" in err


def test_the_table_covers_at_least_40_cases():
    assert len(CONFIGS) + len(MISUSE) + 1 >= 40
