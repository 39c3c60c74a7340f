"""Studies: configs that run one of the published experiments of :mod:`attnopt.maxmargin.experiments`.

A study config names the experiment in ``[experiment] kind`` and sets its options in ``[settings]``::

    [experiment]
    name = "single_input"   # results go to results/<name>/ unless out_dir (or --out) is given
    kind = "single_input"   # a key of attnopt.maxmargin.experiments.EXPERIMENTS
    seed = 0
    dtype = "float64"

    [settings]              # keyword options of that experiment (lists allowed)
    learning_rate = 0.1

:func:`parse_study` checks it all before any work; :func:`run_study` runs the
experiment and writes ``results.json`` (config, results, versions) and ``figure.png``.
"""
from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import jax

_KEYS = {"name": (str,), "kind": (str,), "seed": (int,), "dtype": (str,), "out_dir": (str,)}


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """A validated study config."""

    name: str
    kind: str
    seed: int
    dtype: str
    out_dir: str | None
    settings: Mapping[str, Any]

    def as_dict(self) -> dict[str, Any]:
        experiment = {k: getattr(self, k) for k in _KEYS if getattr(self, k) is not None}
        return {"experiment": experiment, "settings": dict(self.settings)}


def _experiments() -> dict[str, Callable]:
    from attnopt.maxmargin.experiments import EXPERIMENTS

    return EXPERIMENTS


def parse_study(raw: Mapping[str, Any], default_name: str) -> StudyConfig:
    """Validate a study config given as nested dicts; raises ValueError naming the key."""
    from attnopt.experiments import _check_options, _check_type

    for section in raw:
        if section not in ("experiment", "settings"):
            raise ValueError(f"{section}: unknown section for a study; known: ['experiment', 'settings']")
    experiment = raw.get("experiment")
    if not isinstance(experiment, dict):
        raise ValueError("experiment: expected an [experiment] table")
    for key, value in experiment.items():
        if key not in _KEYS:
            raise ValueError(f"experiment.{key}: unknown key for a study; known: {sorted(_KEYS)}")
        _check_type(f"experiment.{key}", value, _KEYS[key])
    kind = experiment["kind"]
    known = _experiments()
    if kind not in known:
        raise ValueError(f"experiment.kind: unknown experiment {kind!r}; known: {sorted(known)}")
    name = experiment.get("name", default_name)
    if not re.fullmatch(r"[\w.-]+", name) or name in (".", ".."):
        raise ValueError(f"experiment.name: must be a folder name (letters, digits, _ . -), got {name!r}")
    dtype = experiment.get("dtype", "float64")
    if dtype not in ("float32", "float64"):
        raise ValueError(f"experiment.dtype: must be 'float32' or 'float64', got {dtype!r}")
    settings = raw.get("settings", {})
    if not isinstance(settings, dict):
        raise ValueError("settings: expected a [settings] table")
    _check_options("settings", settings, known[kind], skip=("seed", "dtype"))
    return StudyConfig(name, kind, experiment.get("seed", 0), dtype, experiment.get("out_dir"), dict(settings))


def run_study(config: StudyConfig, out_dir: str | Path | None = None, *, log: Callable[[str], None] = print) -> dict:
    """Run the study's experiment; write results.json and figure.png; return the results."""
    if config.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    out = Path(out_dir or config.out_dir or Path("results") / config.name)
    log(f"{config.name}: experiment {config.kind} ({config.dtype}, seed {config.seed}) ...")
    start = time.perf_counter()
    results, figure = _experiments()[config.kind](**config.settings, seed=config.seed, dtype=config.dtype)
    wall = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "config": config.as_dict(), "results": results, "wall_s": wall,
        "jax": jax.__version__, "backend": jax.default_backend(),
    }
    (out / "results.json").write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    figure.suptitle(f"{config.name} ({config.kind}, {config.dtype}, seed {config.seed})", fontsize="small")
    figure.savefig(out / "figure.png", dpi=110)
    log(f"{config.name}: done in {wall:.1f}s; wrote {out / 'results.json'} and {out / 'figure.png'}")
    return results


def _jsonable(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def summary(results: Mapping[str, Any]) -> str:
    """The results as indented JSON (NaN shown as NaN)."""
    return json.dumps(results, indent=1, default=_jsonable)
