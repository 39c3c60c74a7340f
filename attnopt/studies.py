"""Studies: configs that run one of the registered experiments (the published max-margin ones, implicit bias).

A study config names the experiment in ``[experiment] kind`` and sets its options in ``[settings]``::

    [experiment]
    name = "single_input"   # a title; results go to results/<config file name>/ unless out_dir (or --out)
    kind = "single_input"   # a registered experiment (EXPERIMENTS; the modules of MODULES register theirs)
    seed = 0
    dtype = "float64"

    [settings]              # keyword options of that experiment (lists allowed)
    learning_rate = 0.1

:func:`parse_study` checks it all before any work (types, finite numbers, the
range of every setting it knows by name, and a rough bound on the memory the
recorded histories need); :func:`run_study` claims the output folder, runs the
experiment and writes ``results.json`` (config, results, provenance) and
``figure.png`` together (:mod:`attnopt.results`).
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import math
import time
from typing import Any, Callable, Mapping

import jax

from attnopt import _validate, results

_KEYS = {"name": (str,), "kind": (str,), "seed": (int,), "dtype": (str,), "out_dir": (str,)}
#: Largest step count of a study.
MAX_STEPS = 10**7
#: Largest size or count setting (n, T, d, instances, ...) of a study.
MAX_COUNT = 10**5


def _count(limit):
    return lambda v: _validate.is_count(v) and v <= limit


def _positive(v):
    return _validate.is_number(v) and v > 0


def _margin_loss(v):
    from attnopt.problems.maxmargin import LOSSES

    return v in LOSSES


#: Settings checked by name: key -> (test of one value, what it must be, whether it is a list of such values).
SETTING_RULES = {
    "learning_rate": (_positive, "a finite number > 0", False),
    "eps": (lambda v: _validate.is_number(v) and v >= 0, "a finite number >= 0", False),
    "rtol": (lambda v: _validate.is_number(v) and 0 < v < 1, "a number in (0, 1)", False),
    "steps": (_count(MAX_STEPS), f"an int in [1, {MAX_STEPS}]", False),
    "max_steps": (_count(2**31 - 1), f"an int in [1, {2**31 - 1}]", False),
    **{k: (_count(MAX_COUNT), f"an int in [1, {MAX_COUNT}]", False)
       for k in ("n", "T", "d", "instances", "record_every")},
    "starts": (_validate.is_number, "a finite number", True),
    "C": (_positive, "a finite number > 0", True),
    "alphas": (_positive, "a finite number > 0", True),
    "losses": (_margin_loss, "a margin loss name (logistic, linear, exponential, squared)", True),
    "ps": (lambda v: _validate.is_number(v) and v > 1, "a finite number > 1 (an l_p exponent)", True),
    "budgets": (_count(MAX_STEPS), f"an int in [1, {MAX_STEPS}]", True),
    "dims": (_count(MAX_COUNT), f"an int in [1, {MAX_COUNT}]", True),
    "sizes": (lambda v: isinstance(v, list) and len(v) == 2 and all(_count(MAX_COUNT)(x) for x in v),
              "a pair [n, T] of ints >= 1", True),
    "report_steps": (lambda v: _validate.is_count(v) or v == 0, "an int >= 0", True),
}


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """A validated study config; ``folder`` is the default results folder's name (the config file's name)."""

    name: str
    folder: str
    kind: str
    seed: int
    dtype: str
    out_dir: str | None
    settings: Mapping[str, Any]

    def as_dict(self) -> dict[str, Any]:
        experiment = {k: getattr(self, k) for k in _KEYS if getattr(self, k) is not None}
        return {"experiment": experiment, "settings": dict(self.settings)}


#: The study experiments by ``kind``: functions of keyword settings (and ``seed``, ``dtype``) returning
#: ``(results, figure)``. Modules register theirs with :func:`experiment`.
EXPERIMENTS: dict[str, Callable] = {}


def experiment(fn: Callable) -> Callable:
    """Register ``fn`` as the study experiment of kind ``fn.__name__``."""
    if EXPERIMENTS.setdefault(fn.__name__, fn) is not fn:
        raise ValueError(f"study experiment {fn.__name__!r} is already registered")
    return fn


#: The modules that register study experiments when imported.
MODULES = ("attnopt.maxmargin.experiments", "attnopt.maxmargin.mirror_experiments", "attnopt.implicit_bias")


def _experiments() -> dict[str, Callable]:
    """:data:`EXPERIMENTS`, after importing :data:`MODULES`."""
    for module in MODULES:
        importlib.import_module(module)
    return EXPERIMENTS


def parse_study(raw: Mapping[str, Any], default_name: str) -> StudyConfig:
    """Validate a study config given as nested dicts; raises ValueError naming the key."""
    from attnopt.experiments import _check_options, _check_type, check_finite, check_folder_name

    for section in raw:
        if section not in ("experiment", "settings"):
            raise ValueError(f"{section}: unknown section for a study; known: ['experiment', 'settings']")
    check_finite(raw)
    experiment = raw["experiment"]
    for key, value in experiment.items():
        if key not in _KEYS:
            raise ValueError(f"experiment.{key}: unknown key for a study; known: {sorted(_KEYS)}")
        _check_type(f"experiment.{key}", value, _KEYS[key])
    kind = experiment["kind"]
    known = _experiments()
    if kind not in known:
        raise ValueError(f"experiment.kind: unknown experiment {kind!r}; known: {sorted(known)}")
    name = experiment.get("name", default_name)
    check_folder_name("experiment.name", name)
    dtype = experiment.get("dtype", "float64")
    if dtype not in ("float32", "float64"):
        raise ValueError(f"experiment.dtype: must be 'float32' or 'float64', got {dtype!r}")
    seed = experiment.get("seed", 0)
    if not 0 <= seed <= 2**31 - 1:
        raise ValueError(f"experiment.seed: must be in [0, {2**31 - 1}], got {seed}")
    if experiment.get("out_dir") is not None and not experiment["out_dir"].strip():
        raise ValueError("experiment.out_dir: must not be empty")
    settings = raw.get("settings", {})
    if not isinstance(settings, dict):
        raise ValueError("settings: expected a [settings] table")
    _check_options("settings", settings, known[kind], skip=("seed", "dtype"))
    _check_settings(settings, known[kind])
    return StudyConfig(name, default_name, kind, seed, dtype, experiment.get("out_dir"), dict(settings))


def _check_settings(settings: Mapping[str, Any], experiment: Callable) -> None:
    """The rules of :data:`SETTING_RULES`, that report steps are recorded steps, and a memory bound."""
    for key, value in settings.items():
        if key not in SETTING_RULES:
            continue
        test, expected, is_list = SETTING_RULES[key]
        if is_list and not (isinstance(value, list) and value):
            raise ValueError(f"settings.{key}: must be a non-empty list of {expected}s, got {value!r}")
        for i, v in enumerate(value if is_list else [value]):
            if not test(v):
                at = f"settings.{key}[{i}]" if is_list else f"settings.{key}"
                raise ValueError(f"{at}: must be {expected}, got {v!r}")
    full = {k: p.default for k, p in inspect.signature(experiment).parameters.items()} | dict(settings)
    if "report_steps" in full:
        every = full.get("record_every", 1)
        for i, step in enumerate(full["report_steps"]):
            if step > full["steps"] or step % every:
                raise ValueError(
                    f"settings.report_steps[{i}]: must be a multiple of record_every ({every}) and at most steps "
                    f"({full['steps']}), got {step}"
                )
    _check_memory(full)


def _check_memory(full: Mapping[str, Any]) -> None:
    """A rough bound on the recorded histories: 32 bytes x runs x recorded steps x (d^2 + n T) numbers
    per record; refuses, naming the largest factor's key, what exceeds the machine's memory."""
    factors = {
        "settings.steps": -(-max([full.get("steps", 1), *full.get("budgets", [])]) // full.get("record_every", 1)) + 1,
        "settings.instances": full.get("instances", 1) * len(full.get("starts", [0])) * 2 * len(full.get("ps", [0]))
        * len(full.get("C", [0])) * len(full.get("losses", [0])),
        "settings.d": full.get("d", 3) ** 2 + full.get("n", 3) * full.get("T", 3),
    }
    need = 32 * math.prod(factors.values())
    budget = 0.8 * results.available_memory()
    if need > budget:
        key = max(factors, key=factors.get)
        raise ValueError(f"{key}: the recorded histories would need about {need / 2**30:.3g} GB, more than the "
                         f"{budget / 2**30:.3g} GB this machine can give; make it smaller")


def run_study(config: StudyConfig, out_dir=None, *, log: Callable[[str], None] = print) -> dict:
    """Run the study's experiment; write results.json and figure.png together; return the results.

    ``out_dir`` as in :func:`attnopt.experiments.run`: a folder (claimed before any work) or a claimed
    :class:`attnopt.results.Output`.
    """
    from attnopt.experiments import claimed, png

    with claimed(config, out_dir) as output:
        if config.dtype == "float64":
            jax.config.update("jax_enable_x64", True)
        log(f"{config.name}: experiment {config.kind} ({config.dtype}, seed {config.seed}) ...")
        start = time.perf_counter()
        outcome, figure = _experiments()[config.kind](**config.settings, seed=config.seed, dtype=config.dtype)
        wall = time.perf_counter() - start
        figure.suptitle(f"{config.name} ({config.kind}, {config.dtype}, seed {config.seed})", fontsize="small")
        payload = {"config": config.as_dict(), "results": outcome, "wall_s": wall, "provenance": results.provenance()}
        output.commit(payload, {"figure.png": png(figure)})
        log(f"{config.name}: done in {wall:.1f}s; wrote {output.folder / results.RESULTS} and "
            f"{output.folder / 'figure.png'}")
    return outcome


def _jsonable(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def summary(outcome: Mapping[str, Any]) -> str:
    """The results as indented JSON (NaN shown as NaN)."""
    return json.dumps(outcome, indent=1, default=_jsonable)
