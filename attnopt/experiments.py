"""Experiments from TOML configs: check everything first, solve seeded (and swept) instances, write results safely.

A config has three sections (every key but the names is optional)::

    [experiment]
    name = "default"      # a title; results go to results/<config file name>/ unless out_dir (or --out)
    seed = 0              # PRNG seed of the problem generator, or
    seeds = [0, 1, 2]     # several: each solver runs on every seed's instance, medians and spread reported
    max_steps = 100       # step budget of every solve
    tol = 1e-8            # gradient-norm tolerance
    dtype = "float64"     # "float32" or "float64" (float64 turns on jax_enable_x64)
    record_every = 1      # optional: trace every k-th step (default: every step up to 10000 steps)
    step_axis = "auto"    # "log", "linear", or "auto": log when some run stops within 50 steps
    out_dir = "..."       # optional

    [problem]
    name = "softmax"      # a generator of attnopt.problems.registry (list: `attnopt problems`)
    n = [256, 1024]       # every other key is an option of that generator; a list sweeps it
    d = 16

    [[solvers]]           # one table per solver, run in order
    name = "newton"       # see SOLVERS
    label = "newton"      # optional, unique; defaults to name (use it to run a solver twice)
    # every other key is an option of the solver constructor (optax ones: of the optax function)

:func:`load_config` checks all of it before any work and raises ``ValueError``
naming the key (``solvers[1].learning_rate: ...``): types, finite numbers,
ranges, each sweep point's instance (built abstractly), each (problem, solver)
pairing (traced abstractly), and the memory the solves need against what the
machine has. :func:`run` claims the output folder, builds the instances, runs
each solver once per shape over all seeds and sweep points that share it (one
vmapped, compiled :func:`attnopt.solve`, timed apart from its compilation),
and writes ``results.json`` and ``convergence.png`` together
(:mod:`attnopt.results`); :func:`summary_table` formats the runs.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import inspect
import io
import itertools
import math
import re
import time
import tomllib
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from attnopt import _validate, results, solvers
from attnopt.problems import registry
from attnopt.problems.base import stack

SOLVERS = solvers.names()

#: Most points a sweep may have (the figure draws one column per point).
MAX_POINTS = 6
#: Largest step budget and seed.
MAX_INT32 = 2**31 - 1
#: With ``step_axis = "auto"`` the step axis is logarithmic when some run stops within this many steps.
LOG_STEPS_BELOW = 50
#: Final params are saved in results.json when a run's seeds hold at most this many numbers.
MAX_SAVED_PARAMS = 100_000
#: Fraction of the available memory a run may plan to use.
MEMORY_FRACTION = 0.8

_SCHEMA = {
    # key: (allowed types, default)
    "name": ((str,), None),
    "seed": ((int,), None),
    "seeds": ((list,), None),
    "max_steps": ((int,), 100),
    "tol": ((float, int), 1e-8),
    "dtype": ((str,), "float64"),
    "record_every": ((int,), None),
    "step_axis": ((str,), "auto"),
    "out_dir": ((str,), None),
}
_SECTIONS = ("experiment", "problem", "solvers")
_SCALARS = (bool, int, float, str)
_STEP_AXES = ("auto", "log", "linear")
# Solvers that form an (N, N) matrix at every step.
_DENSE = (
    solvers.capabilities.HasHessian, solvers.capabilities.HasGaussNewton,
    solvers.capabilities.HasCurvature, solvers.capabilities.HasVariableProjection,
)


@dataclasses.dataclass(frozen=True)
class SolverSpec:
    """One ``[[solvers]]`` entry: a unique label, the solver name and its options."""

    label: str
    name: str
    options: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Config:
    """A validated experiment config (see the module docstring for the keys).

    ``folder`` is the default results folder's name (the config file's name);
    a list in ``problem_options`` sweeps that option (see :meth:`points`).
    """

    name: str
    folder: str
    seeds: tuple[int, ...]
    max_steps: int
    tol: float
    dtype: str
    record_every: int | None
    step_axis: str
    out_dir: str | None
    problem: str
    problem_options: Mapping[str, Any]
    solvers: tuple[SolverSpec, ...]

    def points(self) -> list[dict[str, Any]]:
        """The sweep: one dict of generator options per combination of the listed values, in config order."""
        keys = [k for k, v in self.problem_options.items() if isinstance(v, list)]
        fixed = {k: v for k, v in self.problem_options.items() if k not in keys}
        grid = itertools.product(*(self.problem_options[k] for k in keys))
        return [{**fixed, **dict(zip(keys, values))} for values in grid]

    def swept(self) -> list[str]:
        """The options the sweep varies."""
        return [k for k, v in self.problem_options.items() if isinstance(v, list)]

    def as_dict(self) -> dict[str, Any]:
        """The config as TOML-like nested dicts (for results.json)."""
        experiment = {k: getattr(self, k) for k in _SCHEMA if k not in ("seed", "seeds")}
        experiment = {k: v for k, v in experiment.items() if v is not None}
        return {
            "experiment": {**experiment, "seeds": list(self.seeds)},
            "problem": {"name": self.problem, **self.problem_options},
            "solvers": [{"name": s.name, "label": s.label, **s.options} for s in self.solvers],
        }


@dataclasses.dataclass(frozen=True)
class SolverRun:
    """One solver at one sweep point, over every seed; per-seed values are tuples in seed order.

    ``status``, ``steps``, ``loss``, ``grad_norm`` (final; the norm of the problem's gradient,
    also for solvers whose state holds an estimate; None where not finite) and ``initial_loss``
    per seed. ``optimum`` is the known optimal loss (a problem's ``lower_bound`` attained by the
    planted solution of every seed's instance) or None; ``global_minimum`` says per seed whether
    a CONVERGED run reached it (within ``sqrt(eps) * max(1, initial gap)``; None when not
    converged or unknown).
    ``distance`` is ``||x - x*|| / ||x*||`` to the planted solution (None without one),
    ``params`` the final params flattened in ``ravel_pytree`` order (None when too many to
    save). ``wall_s`` times the compiled solve of ``batch`` instances (every seed, and the
    sweep points of the same shapes, in lockstep); ``warmup_s`` its compilation. ``trace``
    holds per seed the lists ``step``, ``loss``, ``grad_norm``, ``step_size``, ``line_search``
    at the recorded steps (step 0 = the start).
    """

    label: str
    solver: str
    options: Mapping[str, Any]
    point: Mapping[str, Any]
    seeds: tuple[int, ...]
    status: tuple[str, ...]
    steps: tuple[int, ...]
    loss: tuple
    grad_norm: tuple
    initial_loss: tuple
    optimum: float | None
    global_minimum: tuple
    distance: tuple | None
    params: tuple | None
    wall_s: float
    warmup_s: float
    batch: int
    trace: tuple[Mapping[str, list], ...]

    def statuses(self) -> dict[str, int]:
        """How many seeds ended with each status, most frequent first."""
        return dict(collections.Counter(self.status).most_common())

    def summary(self) -> dict[str, dict]:
        """Median, quartiles, range and count across seeds of steps, final loss, gradient norm and distance."""
        values = {"steps": self.steps, "loss": self.loss, "grad_norm": self.grad_norm}
        if self.distance is not None:
            values["distance"] = self.distance
        return {k: spread(v) for k, v in values.items()}

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "statuses": self.statuses(), "summary": self.summary()}


def spread(values) -> dict[str, float | int | None]:
    """``{median, q25, q75, min, max, count}`` of the finite values (None entries are missing)."""
    finite = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if finite.size == 0:
        return {"median": None, "q25": None, "q75": None, "min": None, "max": None, "count": 0}
    q25, median, q75 = np.percentile(finite, [25, 50, 75])
    return {"median": float(median), "q25": float(q25), "q75": float(q75),
            "min": float(finite.min()), "max": float(finite.max()), "count": int(finite.size)}


# --------------------------------------------------------------------------- config


def load_config(path: str | Path):
    """Read and validate a TOML config; raises ValueError naming the offending key."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a folder, not a TOML config")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: invalid TOML: {err}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file") from None
    return parse_config(raw, default_name=path.stem)


def parse_config(raw: Mapping[str, Any], default_name: str = "experiment"):
    """Validate a config given as nested dicts (as ``tomllib`` returns it); ``default_name`` names
    the default results folder (and the title, unless ``experiment.name`` is given).

    A config whose ``[experiment]`` names a ``kind`` is a study (one of the published
    experiments, :mod:`attnopt.studies`) and gives a ``StudyConfig``; otherwise a :class:`Config`.

    Checks, in order and before any work: sections, keys and value types; that every
    number is finite; the ranges of the experiment's values and of the generator
    options; each sweep point's instance (``jax.eval_shape`` of the generator: shapes
    only); the solver names and options (each solver is built, so its constructor's
    checks run); each solver against each instance shape (capabilities, then the whole
    solve traced abstractly); and the memory the solves need. Raises ValueError whose
    message starts with the key.
    """
    if isinstance(raw.get("experiment"), dict) and "kind" in raw["experiment"]:
        from attnopt.studies import parse_study

        return parse_study(raw, default_name)
    for section in raw:
        if section not in _SECTIONS:
            raise ValueError(f"{section}: unknown section; known: {list(_SECTIONS)}")
    check_finite(raw)
    settings = _experiment(_table(raw, "experiment", required=False), default_name)
    problem_name, problem_options = _problem(_table(raw, "problem", required=True))
    config = Config(
        **settings, problem=problem_name, problem_options=problem_options, solvers=_solver_specs(raw.get("solvers")),
    )
    _check_feasible(config)
    return config


def check_finite(raw, where: str = "") -> None:
    """Raise ValueError naming the first number in ``raw`` (nested dicts and lists) that is nan or inf."""
    if isinstance(raw, Mapping):
        for key, value in raw.items():
            check_finite(value, f"{where}.{key}" if where else str(key))
    elif isinstance(raw, list):
        for i, value in enumerate(raw):
            check_finite(value, f"{where}[{i}]")
    elif isinstance(raw, float) and not math.isfinite(raw):
        raise ValueError(f"{where}: must be a finite number, got {raw}")


def check_folder_name(where: str, name: str) -> None:
    """A name usable as one folder (letters, digits, ``_ . -``; not ``.`` or ``..``)."""
    if not isinstance(name, str) or not re.fullmatch(r"[\w.-]+", name) or name in (".", ".."):
        raise ValueError(f"{where}: must be a folder name (letters, digits, _ . -; not . or ..), got {name!r}")


def _experiment(experiment: Mapping[str, Any], default_name: str) -> dict[str, Any]:
    """The checked ``[experiment]`` values as Config fields."""
    for key, value in experiment.items():
        if key not in _SCHEMA:
            raise ValueError(f"experiment.{key}: unknown key; known: {sorted(_SCHEMA)}")
        _check_type(f"experiment.{key}", value, _SCHEMA[key][0])
    s = {key: experiment.get(key, default) for key, (_, default) in _SCHEMA.items()}
    check_folder_name("experiment.name", s["name"] or default_name)
    if s["seed"] is not None and s["seeds"] is not None:
        raise ValueError("experiment.seeds: give seed or seeds, not both")
    seeds = s["seeds"] if s["seeds"] is not None else [0 if s["seed"] is None else s["seed"]]
    key = "experiment.seeds" if s["seeds"] is not None else "experiment.seed"
    if not seeds:
        raise ValueError(f"{key}: must list at least one seed")
    for i, seed in enumerate(seeds):
        where = f"{key}[{i}]" if s["seeds"] is not None else key
        _check_type(where, seed, (int,))
        if not 0 <= seed <= MAX_INT32:
            raise ValueError(f"{where}: must be in [0, {MAX_INT32}], got {seed}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"{key}: repeats a seed: {seeds}")
    if not 1 <= s["max_steps"] <= MAX_INT32:
        raise ValueError(f"experiment.max_steps: must be in [1, {MAX_INT32}], got {s['max_steps']}")
    if not s["tol"] >= 0:
        raise ValueError(f"experiment.tol: must be >= 0, got {s['tol']}")
    if s["dtype"] not in ("float32", "float64"):
        raise ValueError(f"experiment.dtype: must be 'float32' or 'float64', got {s['dtype']!r}")
    if s["record_every"] is not None and not 1 <= s["record_every"] <= s["max_steps"]:
        raise ValueError(
            f"experiment.record_every: must be in [1, max_steps = {s['max_steps']}], got {s['record_every']}"
        )
    if s["record_every"] is not None and s["max_steps"] > s["record_every"] * solvers.MAX_TRACE:
        raise ValueError(
            f"experiment.record_every: {s['record_every']} keeps more than {solvers.MAX_TRACE} trace entries per run "
            f"in results.json; use at least {math.ceil(s['max_steps'] / solvers.MAX_TRACE)} (or leave it out)"
        )
    if s["step_axis"] not in _STEP_AXES:
        raise ValueError(f"experiment.step_axis: must be one of {list(_STEP_AXES)}, got {s['step_axis']!r}")
    if s["out_dir"] is not None and not s["out_dir"].strip():
        raise ValueError("experiment.out_dir: must not be empty")
    return {
        "name": s["name"] or default_name, "folder": default_name, "seeds": tuple(seeds),
        "max_steps": s["max_steps"], "tol": float(s["tol"]), "dtype": s["dtype"], "record_every": s["record_every"],
        "step_axis": s["step_axis"], "out_dir": s["out_dir"],
    }


def _problem(table: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The generator's name and its checked options (a list value is a sweep)."""
    options = dict(table)
    name = _name(options, "problem", tuple(registry.GENERATORS))
    if "dtype" in options:
        raise ValueError("problem.dtype: set the dtype in [experiment], not in [problem]")
    params = inspect.signature(registry.GENERATORS[name]).parameters
    params = {k: p for k, p in params.items() if k not in ("key", "dtype")}
    for key, value in options.items():
        where = f"problem.{key}"
        if key not in params:
            raise ValueError(f"{where}: unknown option; known: {sorted(params)}")
        sweep = isinstance(value, list)
        if sweep and not value:
            raise ValueError(f"{where}: an empty list sweeps nothing")
        if sweep and len({repr(v) for v in value}) != len(value):
            raise ValueError(f"{where}: repeats a value: {value}")
        for i, v in enumerate(value if sweep else [value]):
            at = f"{where}[{i}]" if sweep else where
            _check_type(at, v, _option_types(params[key]))
            error = _validate.option_error(key, v)
            if error:
                raise ValueError(f"{at}: {error}")
    count = math.prod(len(v) for v in options.values() if isinstance(v, list))
    if count > MAX_POINTS:
        raise ValueError(
            f"problem: the sweep has {count} points, more than the {MAX_POINTS} one figure shows; split it"
        )
    return name, options


def _solver_specs(entries) -> tuple[SolverSpec, ...]:
    """The checked ``[[solvers]]`` tables; each solver is built once, so its constructor's checks run."""
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise ValueError("solvers: expected one or more [[solvers]] tables")
    specs = []
    for i, entry in enumerate(entries):
        where = f"solvers[{i}]"
        entry = dict(entry)
        name = _name(entry, where, SOLVERS)
        label = entry.pop("label", name)
        _check_type(f"{where}.label", label, (str,))
        _check_label(f"{where}.label", label)
        if label in {s.label for s in specs}:
            raise ValueError(f"{where}.label: {label!r} is used twice; give each run a unique label")
        _check_options(where, entry, solvers.constructor(name))
        spec = SolverSpec(label, name, entry)
        try:
            make_solver(spec)
        except (ValueError, TypeError) as err:
            raise keyed(where, err, entry) from None
        specs.append(spec)
    return tuple(specs)


def _check_label(where: str, label: str) -> None:
    """A label is drawn in the figure's legend: it must be non-empty and its math text (``$...$``) must parse."""
    if not label.strip():
        raise ValueError(f"{where}: must not be empty")
    if "$" not in label:
        return
    from matplotlib import cbook
    from matplotlib.mathtext import MathTextParser

    if cbook.is_math_text(label):
        try:
            MathTextParser("path").parse(label)
        except ValueError as err:
            reason = str(err).strip().splitlines()[-1]
            raise ValueError(f"{where}: invalid math text {label!r} ({reason}); write \\$ for a dollar sign") from None


def keyed(where: str, err: Exception, keys) -> ValueError:
    """``err`` as a ValueError naming ``where.<key>`` when its message starts with one of ``keys``, else ``where``."""
    message = str(err)
    match = re.match(r"(\w+)\b[:\s]*(.*)", message, re.S)
    if match and match.group(1) in keys:
        return ValueError(f"{where}.{match.group(1)}: {match.group(2)}")
    return ValueError(f"{where}: {message}")


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


# --------------------------------------------------------------------------- feasibility


def _check_feasible(config: Config) -> None:
    """Build every sweep point's instance abstractly, then check each solver against each instance
    shape: capabilities, an abstract trace of the whole solve, and the memory the batched solve needs."""
    precision = jax.enable_x64(True) if config.dtype == "float64" else contextlib.nullcontext()
    with precision, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # float64 shapes while x64 is off: irrelevant here
        groups: dict[Any, list] = {}
        for point in config.points():
            instance = _abstract_instance(config, point)
            groups.setdefault(_shapes(instance), [instance, point, 0])[2] += 1
        available = results.available_memory()
        for i, spec in enumerate(config.solvers):
            where, solver = f"solvers[{i}]", make_solver(spec)
            for instance, point, count in groups.values():
                try:
                    solvers.capabilities.check(instance.problem, solver)
                except ValueError as err:
                    raise ValueError(f"{where}: {err}") from None
                _check_traces(where, spec, config, instance)
                _check_memory(where, solver, config, instance, point, count, available)


def _abstract_instance(config: Config, point: Mapping[str, Any]) -> registry.Instance:
    """The instance of one sweep point as shapes (``jax.eval_shape``); generator errors name the option."""
    options = _generator_options(config, point)
    try:  # the key is made inside: PRNGKey(0) outside would compile two programs
        return jax.eval_shape(lambda seed: registry.make(config.problem, jax.random.PRNGKey(seed), **options), 0)
    except (ValueError, TypeError) as err:
        raise keyed("problem", err, options) from None


def _shapes(instance) -> tuple:
    """What must agree for instances to be stacked into one batch: structure, shapes and dtypes."""
    leaves, treedef = jax.tree.flatten((instance.problem, instance.x0))
    return treedef, tuple((leaf.shape, str(leaf.dtype)) for leaf in leaves)


def _solve_options(config: Config) -> dict[str, Any]:
    return {"max_steps": config.max_steps, "tol": config.tol, "record_every": config.record_every}


def _check_traces(where: str, spec: SolverSpec, config: Config, instance) -> None:
    """Trace the solve on the abstract instance; a failure names the solver option that causes it, if one does."""
    def trace(solver):
        solve = lambda p, x: solvers.solve(p, x, solver, **_solve_options(config))
        jax.eval_shape(solve, instance.problem, instance.x0)

    try:
        trace(make_solver(spec))
    except Exception as err:  # any failure to trace means this pairing cannot run
        culprit = next((key for key in spec.options if _traces_without(trace, spec, key)), None)
        at = f"{where}.{culprit}" if culprit else where
        problem = type(instance.problem).__name__
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(f"{at}: {spec.name} cannot run on {problem}: {type(err).__name__}: {reason}") from None


def _traces_without(trace: Callable, spec: SolverSpec, key: str) -> bool:
    """Whether the solve traces with option ``key`` left at its default."""
    try:
        trace(make_solver(SolverSpec(spec.label, spec.name, {k: v for k, v in spec.options.items() if k != key})))
    except Exception:  # this option is not the (only) cause
        return False
    return True


def _check_memory(where, solver, config: Config, instance, point, count: int, available: int) -> None:
    """Refuse, naming the key that drives it, a solve whose estimated memory exceeds what the machine has.

    Per instance: 4x the problem's data (the data and one evaluation's temporaries),
    4 N^2 numbers for solvers that form an (N, N) matrix, 3 k N for k random directions,
    and the trace; times the instances solved together (seeds x sweep points of one shape).
    """
    itemsize = jnp.dtype(config.dtype).itemsize
    data = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(instance.problem))
    size = sum(leaf.size for leaf in jax.tree.leaves(instance.x0))
    every = config.record_every or max(1, math.ceil(config.max_steps / solvers.MAX_TRACE))
    options = {**registry.options(config.problem), **point}
    sizes = {k: options[k] for k in ("n", "d", "T") if isinstance(options.get(k), int)}
    size_key = f"problem.{max(sizes, key=sizes.get)}" if sizes else "problem"
    terms = collections.Counter({
        size_key: 4 * data,
        f"{where}.num_directions": 3 * getattr(solver, "num_directions", 0) * size * itemsize,
        "experiment.record_every" if config.record_every else "experiment.max_steps":
            (-(-config.max_steps // every) + 1) * (4 * itemsize + 4),
    })
    if any(need in solver.needs for need in _DENSE):
        terms["problem.d" if "d" in sizes else size_key] += 4 * size * size * itemsize
    one = sum(terms.values())
    budget = MEMORY_FRACTION * available
    if one > budget:
        raise ValueError(
            f"{max(terms, key=terms.get)}: one instance would need about {_bytes(one)} of memory, more than the "
            f"{_bytes(budget)} this machine can give ({_bytes(available)} available); make it smaller"
        )
    batch = count * len(config.seeds)
    if batch * one > budget:
        key = "experiment.seeds" if len(config.seeds) > 1 else f"problem.{config.swept()[0]}"
        raise ValueError(
            f"{key}: {batch} instances solved together would need about {_bytes(batch * one)} of memory, more "
            f"than the {_bytes(budget)} this machine can give; use fewer seeds or sweep points"
        )


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.3g} {unit}"
        n /= 1024


# --------------------------------------------------------------------------- solvers


def make_solver(spec: SolverSpec):
    """The :class:`attnopt.solvers.Solver` of a spec, by name through :func:`attnopt.solvers.get`."""
    return solvers.get(spec.name, **spec.options)


# --------------------------------------------------------------------------- running


def output_folder(config, out_dir=None, key: str = "out_dir") -> tuple[Path, str]:
    """Where ``config`` writes and the name that location was given by (for error messages):
    ``out_dir`` (named ``key``), else the config's ``out_dir``, else ``results/<config file name>``."""
    if out_dir is not None:
        return Path(out_dir), key
    if config.out_dir:
        return Path(config.out_dir), "experiment.out_dir"
    return Path("results") / config.folder, key


def claimed(config, out_dir) -> contextlib.AbstractContextManager[results.Output]:
    """``out_dir`` if it is already a claimed :class:`attnopt.results.Output`, else the folder claimed now."""
    if isinstance(out_dir, results.Output):
        return contextlib.nullcontext(out_dir)
    return results.claim(*output_folder(config, out_dir))


def run(config, out_dir=None, *, log: Callable[[str], None] = print):
    """Run every solver of ``config`` on its instances; write results.json and convergence.png.

    A study config (see :func:`parse_config`) runs its experiment instead and returns its results dict.

    Args:
      config: from :func:`load_config` / :func:`parse_config`.
      out_dir: output folder (default: ``config.out_dir`` or ``results/<config file name>``), or an
        :class:`attnopt.results.Output` claimed already. The folder is claimed (checked and locked)
        before any work; a ValueError naming it says why it cannot be.
      log: called with a line as each solve starts and finishes.

    Returns:
      One :class:`SolverRun` per sweep point and solver (points outer, solvers in config order).
    """
    if not isinstance(config, Config):
        from attnopt.studies import run_study

        return run_study(config, out_dir, log=log)
    with claimed(config, out_dir) as output:
        if config.dtype == "float64":
            jax.config.update("jax_enable_x64", True)
        runs = solve_all(config, log)
        figure = plot_convergence(
            runs, title=_title(config), tol=config.tol, step_axis=config.step_axis, dtype=config.dtype
        )
        payload = {"config": config.as_dict(), "provenance": results.provenance(), "runs": [r.as_dict() for r in runs]}
        output.commit(payload, {"convergence.png": png(figure)})
        log(f"wrote {output.folder / results.RESULTS} and {output.folder / 'convergence.png'}")
    return runs


def _title(config: Config) -> str:
    fixed = ", ".join(f"{k}={v}" for k, v in config.problem_options.items() if not isinstance(v, list))
    seeds = f"{len(config.seeds)} seeds" if len(config.seeds) > 1 else f"seed {config.seeds[0]}"
    return _plain(f"{config.name}: {config.problem} ({fixed}), {config.dtype}, {seeds}")


def solve_all(config: Config, log: Callable[[str], None] = print) -> list[SolverRun]:
    """Build every (sweep point, seed) instance and solve them with each solver, one vmapped solve per
    group of points with equal shapes; returns the runs, points outer and solvers inner."""
    points = config.points()
    swept = [{k: point[k] for k in config.swept()} for point in points]
    built = [[_instance(config, point, seed) for seed in config.seeds] for point in points]
    groups: dict[Any, list[int]] = {}
    for j, instances in enumerate(built):
        groups.setdefault(_shapes(instances[0]), []).append(j)
    log(f"{config.name}: {config.problem} at {len(points)} point(s) x {len(config.seeds)} seed(s), "
        f"{len(config.solvers)} solvers, max_steps={config.max_steps}, tol={config.tol:g}")
    runs = {}
    total = len(config.solvers) * len(groups)
    for i, spec in enumerate(config.solvers):
        solver = make_solver(spec)
        for g, members in enumerate(groups.values()):
            count = i * len(groups) + g + 1
            where = ", ".join(_point_text(swept[j]) or config.problem for j in members)
            batch = [instance for j in members for instance in built[j]]
            log(f"[{count}/{total}] {spec.label} on {where} ({len(batch)} instances): compiling and running ...")
            result, wall, warmup = _timed_solve(config, solver, batch)
            for k, j in enumerate(members):
                part = jax.tree.map(lambda a: a[k * len(config.seeds):(k + 1) * len(config.seeds)], result)
                runs[j, i] = _solver_run(spec, swept[j], config, built[j], part, (wall, warmup, len(batch)))
            shown = [runs[j, i] for j in members]
            statuses = collections.Counter(s for r in shown for s in r.status)
            counts = ", ".join(f"{s} {c}/{len(batch)}" for s, c in statuses.most_common())
            median = _fmt(spread(l for r in shown for l in r.loss)["median"])
            log(f"[{count}/{total}] {spec.label}: {counts}; median final loss {median}; "
                f"{wall:.3g}s (compiled in {warmup:.3g}s)")
    return [runs[j, i] for j in range(len(points)) for i in range(len(config.solvers))]


def _generator_options(config: Config, point: Mapping[str, Any]) -> dict[str, Any]:
    """The generator options of one sweep point, with the config's dtype where the generator takes one."""
    options = dict(point)
    if "dtype" in registry.options(config.problem):
        options["dtype"] = config.dtype
    return options


def _instance(config: Config, point: Mapping[str, Any], seed: int) -> registry.Instance:
    # Op by op, as registry.make runs: a generator compiled as one program would round differently.
    return registry.make(config.problem, jax.random.PRNGKey(seed), **_generator_options(config, point))


@jax.jit
def _stack(problems: list, x0s: list) -> tuple[Any, Any]:
    """Instances' problems and starts stacked along a new leading axis: one compiled program for every
    solver of a run (``jnp.stack`` leaf by leaf compiled one per leaf shape)."""
    return stack(problems), jax.tree.map(lambda *xs: jnp.stack(xs), *x0s)


@jax.jit
@jax.vmap
def _grad_norms(problem, params):
    """The norm of each problem's gradient at its params (one program for every solver of a run)."""
    return solvers.state.tree_norm(problem.grad(params))


def _timed_solve(config: Config, solver, instances) -> tuple[Any, float, float]:
    """One vmapped solve of the stacked instances: compiled ahead of time (timed as ``warmup``), then run
    once (timed as ``wall``). Returns the result on the host, with ``state.grad`` replaced by the norm
    of the problem's gradient at the final params (a solver's state may hold an estimate), and both times."""
    problems, x0s = _stack([inst.problem for inst in instances], [inst.x0 for inst in instances])
    options = _solve_options(config)
    batched = jax.jit(jax.vmap(lambda p, x: solvers.solve(p, x, solver, **options)))
    start = time.perf_counter()
    compiled = batched.lower(problems, x0s).compile()
    warmup = time.perf_counter() - start
    start = time.perf_counter()
    result = jax.block_until_ready(compiled(problems, x0s))
    wall = time.perf_counter() - start
    norms = _grad_norms(problems, result.state.params)
    return jax.device_get(result._replace(state=result.state._replace(grad=norms))), wall, warmup


def _solver_run(spec, point, config, instances, result, timing) -> SolverRun:
    """The :class:`SolverRun` of one sweep point from its slice of a batched result (on the host, see
    :func:`_timed_solve`); ``timing`` is (wall, warmup, batch size) of that solve. The result's arithmetic
    is NumPy's (on the host): JAX would compile a program for each operation and shape."""
    wall, warmup, batch = timing
    flat = [_flat(jax.tree.map(lambda a: a[i], result.state.params)) for i in range(len(instances))]
    traces = [_trace(result.trace, i) for i in range(len(instances))]
    optimum = _optimum(instances)
    status = tuple(solvers.Status(int(s)).name for s in result.status)
    loss = tuple(_float(v) for v in result.state.value)
    initial = tuple(t["loss"][0] for t in traces)
    eps = float(jnp.finfo(config.dtype).eps)
    global_minimum = tuple(
        None if optimum is None or s != "CONVERGED" or l is None
        else bool(l - optimum <= math.sqrt(eps) * max(1.0, (l0 or 0.0) - optimum))
        for s, l, l0 in zip(status, loss, initial)
    )
    solutions = [inst.solution for inst in instances]
    distance = None
    if all(x is not None for x in solutions):
        distance = tuple(_float(_relative_distance(x, _flat(s))) for x, s in zip(flat, solutions))
    saved = None if sum(x.size for x in flat) > MAX_SAVED_PARAMS else tuple([_float(v) for v in x] for x in flat)
    return SolverRun(
        label=spec.label, solver=spec.name, options=dict(spec.options), point=point, seeds=config.seeds,
        status=status, steps=tuple(int(k) for k in result.steps), loss=loss,
        grad_norm=tuple(_float(g) for g in result.state.grad),
        initial_loss=initial, optimum=optimum, global_minimum=global_minimum, distance=distance, params=saved,
        wall_s=wall, warmup_s=warmup, batch=batch, trace=tuple(traces),
    )


def _trace(trace, i: int) -> dict[str, list]:
    """The recorded entries of instance ``i``'s trace as lists (non-finite values as None)."""
    recorded = np.asarray(trace.step[i]) >= 0
    columns = {k: [_float(v) for v in np.asarray(col[i])[recorded]] for k, col in trace._asdict().items()
               if k not in ("step", "metrics")}
    return {"step": [int(k) for k in np.asarray(trace.step[i])[recorded]], **columns}


def _optimum(instances) -> float | None:
    """The problem's ``lower_bound`` if every instance's planted solution attains it (up to rounding), else None."""
    bound = type(instances[0].problem).lower_bound
    if bound is None or any(inst.solution is None for inst in instances):
        return None
    eps = float(jnp.finfo(instances[0].problem.dtype).eps)
    attained = all(float(inst.problem.loss(inst.solution)) - bound <= eps * max(1.0, abs(bound)) for inst in instances)
    return float(bound) if attained else None


def _flat(tree) -> np.ndarray:
    """``ravel_pytree(tree)[0]`` on the host: the leaves in order, raveled and concatenated by NumPy (no
    compiled program)."""
    leaves = [np.ravel(np.asarray(leaf)) for leaf in jax.tree.leaves(tree)]
    return np.concatenate(leaves) if leaves else np.zeros(0)


def _relative_distance(x, solution) -> float:
    scale = float(np.linalg.norm(solution))
    return float(np.linalg.norm(x - solution)) / (scale if scale > 0 else 1.0)


def _float(v) -> float | None:
    """A JSON-ready float: NaN and inf become None."""
    v = float(v)
    return v if math.isfinite(v) else None


# --------------------------------------------------------------------------- figure


_MARKERS = {"CONVERGED": "o", "MAX_STEPS": "s", "COMPLETED": "D", "LINESEARCH_FAILED": "v", "NONFINITE": "X"}


def png(figure) -> bytes:
    """The figure as PNG bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def plot_convergence(runs: list[SolverRun], *, title: str = "", tol: float = 0.0, step_axis: str = "auto",
                     dtype: str = "float64"):
    """The convergence figure of ``runs``: a matplotlib ``Figure``.

    One column per sweep point: the gap ``loss - reference`` (top) and the gradient norm
    (bottom) against the step, the median over seeds with the interquartile band. The
    reference of each instance is the best loss any solver reached on it, or the known
    optimum; a gap below the rounding floor ``max(eps |reference|, eps^2 L(x0))`` is drawn at
    the floor (dotted), so the run that reached the best loss keeps its last point. Each
    run's last point carries a marker for its (most frequent) status, and a red ring where
    a CONVERGED run stopped above the known optimum; the tolerance is a dashed line. The
    last column places each run's final median value (with its interquartile range)
    against the measured wall time of its compiled, vmapped solve.
    """
    from matplotlib.figure import Figure

    eps = float(jnp.finfo(dtype).eps)
    points = list({_frozen(r.point): r.point for r in runs}.values())
    color = {label: f"C{i % 10}" for i, label in enumerate(dict.fromkeys(r.label for r in runs))}
    fig = Figure(figsize=(3.8 * (len(points) + 1) + 1.0, 7.5), layout="constrained")
    axes = fig.subplots(2, len(points) + 1, sharey="row", squeeze=False)
    floor_drawn = False
    for col, point in enumerate(points):
        at = [r for r in runs if _frozen(r.point) == _frozen(point)]
        floor_drawn |= _draw_point(axes[:, col], axes[:, -1], at, color, eps, _plain(_point_text(point)))
    _format_axes(axes, runs, tol=tol, log_steps=_log_steps(runs, step_axis), floor_drawn=floor_drawn)
    seeds = len(runs[0].seeds)
    band = f"median over {seeds} seeds, band: 25-75%" if seeds > 1 else "one seed"
    fig.suptitle(f"{title}\n{band}; markers: final point and status", fontsize="small")
    return fig


def _draw_point(columns, time_axes, runs: list[SolverRun], color, eps: float, note: str) -> bool:
    """Draw the runs of one sweep point: median curves with bands and final markers in ``columns`` (loss
    gap, gradient norm), final values against wall time in ``time_axes``; ``note`` names the point (or is "").
    Returns whether some run reached the reference loss (the floor line is drawn then)."""
    reference, floor = _references(runs, eps)
    reached = False
    for r in runs:
        steps, gap = _curves(r, lambda t, i: [None if y is None else max(y - reference[i], floor[i])
                                              for y in t["loss"]])
        _, grad = _curves(r, lambda t, i: [None if y is None else max(y, eps**2 * (t["grad_norm"][0] or 1.0))
                                           for y in t["grad_norm"]])
        reached |= bool(np.any(gap == floor[:, None]))
        status = next(iter(r.statuses()))
        counts = ", ".join(f"{s} {c}/{len(r.seeds)}" for s, c in r.statuses().items())
        for row, values in enumerate((gap, grad)):
            ax, style = columns[row], {"color": color[r.label], "mec": "black", "ms": 8}
            q25, median, q75 = np.nanpercentile(values, [25, 50, 75], axis=0)
            ax.plot(steps, median, color=color[r.label], lw=1.6, label=f"{r.label}: {counts}" if row == 0 else None)
            if len(r.seeds) > 1:
                ax.fill_between(steps, q25, q75, color=color[r.label], alpha=0.2, lw=0)
            ax.plot(steps[-1], median[-1], _MARKERS[status], zorder=3, clip_on=False, **style)
            if any(g is False for g in r.global_minimum):
                ax.plot(steps[-1], median[-1], "o", mfc="none", mec="red", ms=15, mew=2, zorder=4, clip_on=False)
            lo, mid, hi = np.nanpercentile(values[:, -1], [25, 50, 75])
            time_axes[row].errorbar(r.wall_s, mid, yerr=[[mid - lo], [hi - mid]], fmt=_MARKERS[status], capsize=3,
                                    **style)
            if note:
                time_axes[row].annotate(note, (r.wall_s, mid), fontsize="x-small", xytext=(4, 4),
                                        textcoords="offset points")
    if reached:
        columns[0].axhline(float(np.median(floor)), ls=":", color="0.5", lw=1)
    columns[0].set_title(note, fontsize="medium")
    columns[0].legend(fontsize="x-small", loc="best")
    return reached


def _format_axes(axes, runs: list[SolverRun], *, tol: float, log_steps: bool, floor_drawn: bool) -> None:
    """Scales, labels, the tolerance line and the legend of statuses."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    optima = {r.optimum for r in runs}
    known = len(optima) == 1 and None not in optima
    gap = f"loss - known optimum ({optima.pop():g})" if known else "loss - best loss reached"
    for row, ylabel in enumerate((gap + (" (dotted: rounding floor)" if floor_drawn else ""), "gradient norm")):
        for ax in axes[row, :-1]:
            if log_steps:
                ax.set_xscale("symlog", linthresh=1, linscale=0.4)
            ax.set_xlim(left=0)
            ax.set_xlabel("step (log scale)" if log_steps else "step")
        time_ax = axes[row, -1]
        time_ax.set_xscale("log")
        time_ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        time_ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        time_ax.xaxis.set_minor_formatter(NullFormatter())
        time_ax.set_xlabel("wall time of the solve (s)")
        for ax in axes[row]:
            ax.set_yscale("log")
            ax.grid(True, which="major", alpha=0.3)
            if tol > 0 and row == 1:
                ax.axhline(tol, ls="--", color="black", lw=0.9)
        axes[row, 0].set_ylabel(ylabel)
    batch = max(r.batch for r in runs)
    together = f"{batch} instances vmapped" if batch > 1 else "one instance"
    axes[0, -1].set_title(f"final value vs measured time\n(compiled solve, {together})", fontsize="small")
    handles = [Line2D([], [], ls="", marker=_MARKERS[s], color="0.4", mec="black", label=s)
               for s in _MARKERS if any(s in r.status for r in runs)]
    if any(g is False for r in runs for g in r.global_minimum):
        handles.append(Line2D([], [], ls="", marker="o", mfc="none", mec="red", mew=2, ms=10,
                              label="converged, not a global minimum"))
    if tol > 0:
        handles.append(Line2D([], [], ls="--", color="black", label=f"tol = {tol:g}"))
    axes[1, -1].legend(handles=handles, fontsize="x-small", loc="upper right")


def _frozen(point: Mapping[str, Any]) -> tuple:
    return tuple(point.items())


def _point_text(point: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in point.items())


def _plain(text: str) -> str:
    """``text`` drawn as it is (a dollar sign does not start math text)."""
    return text.replace("$", r"\$")


def _log_steps(runs: list[SolverRun], step_axis: str) -> bool:
    """``step_axis`` resolved: "auto" is log when some run stops within LOG_STEPS_BELOW steps and
    another takes at least 4 times as many."""
    if step_axis != "auto":
        return step_axis == "log"
    medians = [float(np.median(r.steps)) for r in runs]
    return min(medians) < LOG_STEPS_BELOW and max(medians) >= 4 * max(min(medians), 1)


def _references(runs: list[SolverRun], eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Per seed: the reference loss (the best any run recorded, or the known optimum) and the rounding floor."""
    seeds = len(runs[0].seeds)
    best = np.array([min((y for r in runs for y in r.trace[i]["loss"] if y is not None), default=np.nan)
                     for i in range(seeds)])
    optimum = runs[0].optimum
    reference = best if optimum is None else np.minimum(best, optimum)
    start = np.array([abs(runs[0].trace[i]["loss"][0] or 0.0) for i in range(seeds)])
    floor = np.maximum(np.maximum(eps * np.abs(reference), eps**2 * start), np.finfo(np.float64).tiny)
    return reference, floor


def _curves(run: SolverRun, values: Callable) -> tuple[np.ndarray, np.ndarray]:
    """The recorded steps of all seeds and, per seed, ``values(trace, seed)`` carried forward to each of
    them (a run that stopped keeps its final value): (steps (K,), values (seeds, K))."""
    steps = np.unique(np.concatenate([t["step"] for t in run.trace]))
    rows = []
    for i, t in enumerate(run.trace):
        ys = np.array([np.nan if y is None else y for y in values(t, i)], dtype=np.float64)
        index = np.searchsorted(t["step"], steps, side="right") - 1
        rows.append(ys[np.maximum(index, 0)])
    return steps, np.array(rows)


# --------------------------------------------------------------------------- table


def summary_table(runs: list[SolverRun]) -> str:
    """A plain-text table: per sweep point and solver, the statuses, and the median [25%, 75%] across
    seeds of steps, final loss, gradient norm and distance to the planted solution, with the times."""
    swept = any(r.point for r in runs)
    several = any(len(r.seeds) > 1 for r in runs)
    header = (("point",) if swept else ()) + (
        "solver", "status", "steps", "loss", "grad norm", "dist. to x*", "global min", "time (s)", "compile (s)"
    )
    rows = []
    for r in runs:
        counts = r.statuses()
        status = ", ".join(f"{s} {c}/{len(r.seeds)}" if several else s for s, c in counts.items())
        converged = [g for g in r.global_minimum if g is not None]
        summary = r.summary()
        cell = lambda q: _cell(summary[q], several) if q in summary else "-"
        rows.append((((_point_text(r.point),) if swept else ()) + (
            r.label, status, cell("steps"), cell("loss"), cell("grad_norm"), cell("distance"),
            f"{sum(converged)}/{len(converged)}" if converged else "-", f"{r.wall_s:.3g}", f"{r.warmup_s:.3g}",
        )))
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    left = len(header) - 7
    line = lambda cells: "  ".join(
        c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
    )
    notes = []
    flagged = [r for r in runs if any(g is False for g in r.global_minimum)]
    if flagged:
        notes.append("global min: of the CONVERGED seeds, how many reached the known optimum (loss "
                     f"{flagged[0].optimum:g}); the others stopped at a stationary point with a higher loss")
    if several:
        notes.append("values: median [25%, 75%] across seeds")
    if any(r.batch > 1 for r in runs):
        notes.append("time: the compiled solve of all the instances of a row (and of the sweep points of the same "
                     "shapes) in one vmapped, lockstep batch")
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(row) for row in rows] + notes)


def _cell(stats: Mapping[str, Any], several: bool) -> str:
    if not several or stats["count"] <= 1:
        return _fmt(stats["median"])
    return f"{_fmt(stats['median'])} [{_fmt(stats['q25'], 3)}, {_fmt(stats['q75'], 3)}]"


def _fmt(x: float | None, digits: int = 6) -> str:
    return "nan" if x is None else f"{x:.{digits}g}"


# --------------------------------------------------------------------------- generators


def generator_table() -> str:
    """The problem generators a ``[problem]`` section can name, as a Markdown table: each one's options
    with their defaults (the values a config may change or sweep) and what it builds."""
    rows = ["| `name` | options (defaults) | instance |", "|---|---|---|"]
    for name in sorted(registry.GENERATORS):
        options = ", ".join(f"`{k} = {_toml(v)}`" for k, v in registry.options(name).items() if k != "dtype")
        doc = " ".join((inspect.getdoc(registry.GENERATORS[name]) or "").split("\n\n")[0].split())
        rows.append(f"| `{name}` | {options} | {doc.replace('|', '/')} |")
    return "\n".join(rows)


def _toml(value) -> str:
    return f'"{value}"' if isinstance(value, str) else repr(value)
