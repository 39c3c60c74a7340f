"""Experiments from TOML configs: build an instance, run a list of solvers, write results.

A config has three sections (every key but the names is optional)::

    [experiment]
    name = "default"      # results go to results/<name>/ unless out_dir (or --out) is given
    seed = 0              # PRNG seed of the problem generator
    max_steps = 100       # step budget of every solve
    tol = 1e-9            # gradient-norm tolerance
    dtype = "float64"     # "float32" or "float64" (float64 turns on jax_enable_x64)
    out_dir = "..."       # optional

    [problem]
    name = "softmax"      # a generator registered in attnopt.problems.registry
    n = 1024              # every other key is an option of that generator

    [[solvers]]           # one table per solver, run in order
    name = "newton"       # see SOLVERS
    label = "newton"      # optional, unique; defaults to name (use it to run a solver twice)
    # every other key is an option of the solver constructor (optax ones: of the optax function)

:func:`load_config` checks all of it before any work and raises ``ValueError``
naming the key (``solvers[1].learning_rate: ...``). :func:`run` builds the
instance, solves it with each solver (compiled on a first, untimed solve, then
timed on a second), writes ``results.json`` and ``convergence.png`` to the
output folder, and returns the runs; :func:`summary_table` formats them.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import math
import re
import time
import warnings
import tomllib
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import numpy as np

from attnopt import solvers
from attnopt.problems import registry

SOLVERS = solvers.names()

_SCHEMA = {
    # key: (allowed types, default)
    "name": ((str,), None),
    "seed": ((int,), 0),
    "max_steps": ((int,), 100),
    "tol": ((float, int), 1e-8),
    "dtype": ((str,), "float64"),
    "out_dir": ((str,), None),
}
_SECTIONS = ("experiment", "problem", "solvers")
_SCALARS = (bool, int, float, str)


@dataclasses.dataclass(frozen=True)
class SolverSpec:
    """One ``[[solvers]]`` entry: a unique label, the solver name and its options."""

    label: str
    name: str
    options: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Config:
    """A validated experiment config (see the module docstring for the keys)."""

    name: str
    seed: int
    max_steps: int
    tol: float
    dtype: str
    out_dir: str | None
    problem: str
    problem_options: Mapping[str, Any]
    solvers: tuple[SolverSpec, ...]

    def as_dict(self) -> dict[str, Any]:
        """The config as TOML-like nested dicts (for results.json)."""
        experiment = {k: getattr(self, k) for k in _SCHEMA if getattr(self, k) is not None}
        return {
            "experiment": experiment,
            "problem": {"name": self.problem, **self.problem_options},
            "solvers": [{"name": s.name, "label": s.label, **s.options} for s in self.solvers],
        }


@dataclasses.dataclass(frozen=True)
class SolverRun:
    """Outcome of one solver: status, final loss and gradient norm, timings, and the trace.

    ``trace`` holds lists ``step``, ``loss``, ``grad_norm``, ``step_size`` and
    ``line_search`` with the recorded entries (step 0 = the start). ``wall_s`` is the
    timed (second, compiled) solve; ``warmup_s`` the first one, compilation included.
    """

    label: str
    solver: str
    options: Mapping[str, Any]
    status: str
    converged: bool
    steps: int
    loss: float
    grad_norm: float
    wall_s: float
    warmup_s: float
    trace: Mapping[str, list]


# --------------------------------------------------------------------------- config


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML config; raises ValueError naming the offending key."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: invalid TOML: {err}") from None
    return parse_config(raw, default_name=path.stem)


def parse_config(raw: Mapping[str, Any], default_name: str = "experiment"):
    """Validate a config given as nested dicts (as ``tomllib`` returns it).

    A config whose ``[experiment]`` names a ``kind`` is a study (one of the published
    experiments, :mod:`attnopt.studies`) and gives a ``StudyConfig``; otherwise a :class:`Config`.

    Checks sections, keys, value types, the problem name and its options, the
    solver names and their options, and builds each solver once (so the
    constructors' own checks run too), all before any work.
    """
    if isinstance(raw.get("experiment"), dict) and "kind" in raw["experiment"]:
        from attnopt.studies import parse_study

        return parse_study(raw, default_name)
    for section in raw:
        if section not in _SECTIONS:
            raise ValueError(f"{section}: unknown section; known: {list(_SECTIONS)}")
    experiment = _table(raw, "experiment", required=False)
    values = {}
    for key, value in experiment.items():
        if key not in _SCHEMA:
            raise ValueError(f"experiment.{key}: unknown key; known: {sorted(_SCHEMA)}")
        _check_type(f"experiment.{key}", value, _SCHEMA[key][0])
        values[key] = value
    settings = {key: values.get(key, default) for key, (_, default) in _SCHEMA.items()}
    settings["name"] = settings["name"] or default_name
    if not re.fullmatch(r"[\w.-]+", settings["name"]):
        raise ValueError(f"experiment.name: must be a folder name (letters, digits, _ . -), got {settings['name']!r}")
    if settings["max_steps"] < 1:
        raise ValueError(f"experiment.max_steps: must be >= 1, got {settings['max_steps']}")
    if not settings["tol"] >= 0:
        raise ValueError(f"experiment.tol: must be >= 0, got {settings['tol']}")
    if settings["dtype"] not in ("float32", "float64"):
        raise ValueError(f"experiment.dtype: must be 'float32' or 'float64', got {settings['dtype']!r}")

    problem = dict(_table(raw, "problem", required=True))
    problem_name = _name(problem, "problem", tuple(registry.GENERATORS))
    if "dtype" in problem:
        raise ValueError("problem.dtype: set the dtype in [experiment], not in [problem]")
    _check_options("problem", problem, registry.GENERATORS[problem_name], skip=("key",))
    abstract = _dry_run_problem(problem_name, problem, settings["dtype"])

    entries = raw.get("solvers")
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise ValueError("solvers: expected one or more [[solvers]] tables")
    specs = []
    for i, entry in enumerate(entries):
        where = f"solvers[{i}]"
        entry = dict(entry)
        name = _name(entry, where, SOLVERS)
        label = entry.pop("label", name)
        _check_type(f"{where}.label", label, (str,))
        if label in {s.label for s in specs}:
            raise ValueError(f"{where}.label: {label!r} is used twice; give each run a unique label")
        _check_options(where, entry, solvers.constructor(name))
        spec = SolverSpec(label, name, entry)
        try:
            solvers.capabilities.check(abstract.problem, make_solver(spec))
        except (ValueError, TypeError) as err:
            raise ValueError(f"{where}: {err}") from None
        specs.append(spec)

    return Config(
        problem=problem_name,
        problem_options=problem,
        solvers=tuple(specs),
        **{**settings, "tol": float(settings["tol"])},
    )


def _dry_run_problem(name: str, options: Mapping[str, Any], dtype: str) -> registry.Instance:
    """Build the instance abstractly (``jax.eval_shape``: shapes only, no arithmetic), so that
    option values the generator rejects (say n < d) fail before any work; returns it."""
    if "dtype" in registry.options(name):
        options = {**options, "dtype": dtype}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # float64 requested before x64 is on: irrelevant for shapes
            return jax.eval_shape(lambda key: registry.make(name, key, **options), jax.random.PRNGKey(0))
    except (ValueError, TypeError) as err:
        raise ValueError(f"problem: {err}") from None


def _table(raw, section, required):
    table = raw.get(section)
    if table is None and not required:
        return {}
    if not isinstance(table, dict):
        raise ValueError(f"{section}: expected a [{section}] table")
    return table


def _name(table: dict, where: str, known: tuple[str, ...]) -> str:
    """Pop and check ``table['name']``."""
    if "name" not in table:
        raise ValueError(f"{where}.name: missing; known: {sorted(known)}")
    name = table.pop("name")
    _check_type(f"{where}.name", name, (str,))
    if name not in known:
        kind = "problem" if where == "problem" else "solver"
        raise ValueError(f"{where}.name: unknown {kind} {name!r}; known: {sorted(known)}")
    return name


def _check_type(where: str, value, types: tuple[type, ...]) -> None:
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        expected = " or ".join(t.__name__ for t in types)
        raise ValueError(f"{where}: expected {expected}, got {type(value).__name__} ({value!r})")


def _check_options(where: str, options: Mapping[str, Any], fn: Callable, skip: tuple[str, ...] = ()) -> None:
    """Every option is a parameter of ``fn`` of a fitting type; every required one is given."""
    params = {k: p for k, p in inspect.signature(fn).parameters.items() if k not in skip}
    for key, value in options.items():
        if key not in params:
            raise ValueError(f"{where}.{key}: unknown option; known: {sorted(params)}")
        types = _option_types(params[key])
        if isinstance(value, (dict, list)) and list not in types:  # a schedule or a chain: checked when built
            continue
        if not types:
            raise ValueError(f"{where}.{key}: cannot be set from a config")
        _check_type(f"{where}.{key}", value, types)
    for key, p in params.items():
        if p.default is inspect.Parameter.empty and key not in options:
            raise ValueError(f"{where}.{key}: missing required option")


def _option_types(p: inspect.Parameter) -> tuple[type, ...]:
    """Types a config may give for parameter ``p``: the default's type (ints count as
    floats), else the scalar types its annotation names, else any TOML scalar."""
    default = p.default
    if isinstance(default, list) or type(default) is tuple:  # not a NamedTuple such as a GradientTransformation
        return (list,)
    if default is not inspect.Parameter.empty and default is not None:
        if not isinstance(default, _SCALARS):
            return ()  # e.g. a GradientTransformation: not settable from a config
        return (float, int) if isinstance(default, float) else (type(default),)
    names = set(re.findall(r"\b(bool|int|float|str)\b", str(p.annotation)))
    types = tuple(t for t in _SCALARS if t.__name__ in names)
    if float in types and int not in types:
        types += (int,)
    return types or _SCALARS


# --------------------------------------------------------------------------- solvers


def make_solver(spec: SolverSpec):
    """The :class:`attnopt.solvers.Solver` of a spec, by name through :func:`attnopt.solvers.get`."""
    return solvers.get(spec.name, **spec.options)


# --------------------------------------------------------------------------- running


def run(config, out_dir: str | Path | None = None, *, log: Callable[[str], None] = print):
    """Run every solver of ``config`` on its instance; write results.json and convergence.png.

    A study config (see :func:`parse_config`) runs its experiment instead and returns its results dict.

    Args:
      config: from :func:`load_config` / :func:`parse_config`.
      out_dir: output folder (default: ``config.out_dir`` or ``results/<name>``).
      log: called with a line as each solver starts and finishes.

    Returns:
      One :class:`SolverRun` per solver, in config order.
    """
    from attnopt.solvers import Status, solve

    if not isinstance(config, Config):
        from attnopt.studies import run_study

        return run_study(config, out_dir, log=log)
    if config.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    out = Path(out_dir or config.out_dir or Path("results") / config.name)
    solvers = [make_solver(spec) for spec in config.solvers]
    options = dict(config.problem_options)
    if "dtype" in registry.options(config.problem):
        options["dtype"] = config.dtype
    try:
        instance = registry.make(config.problem, jax.random.PRNGKey(config.seed), **options)
    except ValueError as err:
        raise ValueError(f"problem: {err}") from None
    log(f"{config.name}: {instance.problem!r}, {len(solvers)} solvers, max_steps={config.max_steps}, tol={config.tol:g}")

    runs = []
    for i, (spec, solver) in enumerate(zip(config.solvers, solvers)):
        log(f"[{i + 1}/{len(solvers)}] {spec.label}: compiling and running ...")
        solve_once = lambda: jax.block_until_ready(
            solve(instance.problem, instance.x0, solver, max_steps=config.max_steps, tol=config.tol)
        )
        start = time.perf_counter()
        solve_once()
        warmup = time.perf_counter() - start
        start = time.perf_counter()
        result = solve_once()
        wall = time.perf_counter() - start
        steps = int(result.steps)
        recorded = np.asarray(result.trace.step) >= 0
        trace = {k: _floats(np.asarray(v)[recorded]) for k, v in result.trace._asdict().items() if k != "metrics"}
        trace["step"] = [int(k) for k in np.asarray(result.trace.step)[recorded]]
        runs.append(SolverRun(
            label=spec.label,
            solver=spec.name,
            options=dict(spec.options),
            status=Status(int(result.status)).name,
            converged=bool(result.converged),
            steps=steps,
            loss=trace["loss"][-1],
            grad_norm=trace["grad_norm"][-1],
            wall_s=wall,
            warmup_s=warmup,
            trace=trace,
        ))
        log(f"[{i + 1}/{len(solvers)}] {spec.label}: {runs[-1].status} after {steps} steps, "
            f"grad norm {runs[-1].grad_norm:.3g}, {wall:.3g}s (first run {warmup:.3g}s)")

    out.mkdir(parents=True, exist_ok=True)
    write_results(out / "results.json", config, runs)
    sizes = ", ".join(f"{k}={v}" for k, v in config.problem_options.items())
    plot_convergence(out / "convergence.png", runs, title=f"{config.name}: {config.problem} ({sizes}), {config.dtype}")
    log(f"wrote {out / 'results.json'} and {out / 'convergence.png'}")
    return runs


def _floats(values) -> list:
    """A JSON-ready list: floats, with NaN/inf as None."""
    return [float(v) if math.isfinite(float(v)) else None for v in values]


def write_results(path: Path, config: Config, runs: list[SolverRun]) -> None:
    """results.json: the config, the machine, and every run with its trace."""
    payload = {
        "config": config.as_dict(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "runs": [dataclasses.asdict(r) for r in runs],
    }
    Path(path).write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")


def plot_convergence(path: Path, runs: list[SolverRun], title: str = "") -> None:
    """2 x 2 log-scale plot: loss (top) and gradient norm (bottom) against step (left)
    and time (right).

    The loss is drawn as ``loss - best``, ``best`` the lowest loss any run
    recorded, so that convergence to a nonzero optimum shows on a log scale.
    A solve is timed as a whole, so step k is placed at ``k * wall_s / steps``:
    its wall time spread evenly over its steps.
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    best = min((y for r in runs for y in r.trace["loss"] if y is not None), default=0.0)
    fig = Figure(figsize=(11, 7), layout="constrained")
    axes = fig.subplots(2, 2, sharey="row")
    for run_ in runs:
        steps = run_.trace["step"]
        times = [k * run_.wall_s / max(run_.steps, 1) for k in steps]
        for row, (key, shift) in enumerate((("loss", best), ("grad_norm", 0.0))):
            ys = [float("nan") if y is None or y - shift <= 0 else y - shift for y in run_.trace[key]]
            axes[row, 0].plot(steps, ys, marker=".", label=run_.label)
            axes[row, 1].plot(times, ys, marker=".", label=run_.label)
    for row, ylabel in enumerate((f"loss - best loss ({best:.6g})", "gradient norm")):
        for col, xlabel in enumerate(("step", "time (s, solve wall time spread evenly over its steps)")):
            ax = axes[row, col]
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
    axes[0, 0].legend()
    fig.suptitle(title, fontsize="small")
    fig.savefig(path, dpi=100)


def summary_table(runs: list[SolverRun]) -> str:
    """A plain-text table: label, status, steps, final loss, gradient norm, times."""
    header = ("solver", "status", "steps", "loss", "grad norm", "time (s)", "first run (s)")
    rows = [
        (r.label, r.status, str(r.steps), _fmt(r.loss), _fmt(r.grad_norm), f"{r.wall_s:.3g}", f"{r.warmup_s:.3g}")
        for r in runs
    ]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(row) for row in rows])


def _fmt(x: float | None) -> str:
    return "nan" if x is None else f"{x:.6g}"
