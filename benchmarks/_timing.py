"""Shared timing helpers for the benchmark scripts.

Timings are medians over interleaved repeats: every round calls each candidate
once (in a rotating order), so a burst of load from other processes on the
machine hits all candidates alike and the ratios stay meaningful. Each call is
``jax.block_until_ready``-ed; very fast functions are called ``number`` times
per sample so that one sample lasts at least ``min_sample_s``.

Importing this module turns on attnopt's persistent compilation cache
(``attnopt._runtime.enable_compilation_cache``: ``ATTNOPT_CACHE_DIR``, else
``~/.cache/attnopt/jax``), so a second run of a benchmark loads its programs
instead of compiling them. Timings here are of warm, compiled calls and do not
depend on it. A "cold" timing (first call, compilation included) would measure
a cache load once the cache holds the program: time it inside :func:`uncached`,
or run with ``ATTNOPT_CACHE_DIR=off``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax

from attnopt import _runtime
from attnopt.results import cpu_model

try:
    #: The persistent compilation cache folder of this run, or None when it is off.
    CACHE_DIR = _runtime.enable_compilation_cache()
except ValueError as err:
    raise SystemExit(f"benchmarks: {err}") from None


@contextlib.contextmanager
def uncached():
    """Compile without the persistent compilation cache inside (a real cold compile: nothing is read
    or written), then turn the cache back on as it was. Programs compiled inside stay in memory."""
    _runtime.disable_compilation_cache()
    try:
        yield
    finally:
        if CACHE_DIR is not None:
            _runtime.enable_compilation_cache(CACHE_DIR)


def _call(fn: Callable[[], Any]) -> None:
    jax.block_until_ready(fn())


def _sample(fn: Callable[[], Any], number: int) -> float:
    """Seconds per call over ``number`` calls, after one untimed call (warm caches)."""
    _call(fn)
    start = time.perf_counter()
    for _ in range(number):
        _call(fn)
    return (time.perf_counter() - start) / number


def calls_per_sample(fn: Callable[[], Any], min_sample_s: float) -> int:
    """How many calls of ``fn`` (already warm) last at least ``min_sample_s``."""
    number = 1
    while True:
        if _sample(fn, number) * number >= min_sample_s or number >= 1 << 20:
            return number
        number *= 2


def parse_args(argv, doc: str, name: str, repeats: int) -> argparse.Namespace:
    """The options every benchmark takes: ``--out`` (JSON path), ``--repeats``, ``--quick``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", default=f"benchmarks/results/{name}.json")
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    return parser.parse_args(argv)


def median_times(
    fns: Mapping[str, Callable[[], Any]],
    *,
    repeats: int = 15,
    warmup: int = 2,
    min_sample_s: float = 2e-3,
    max_total_s: float | None = None,
) -> dict[str, float]:
    """Median seconds per call of each zero-argument function, from interleaved repeats.

    Args:
      fns: name -> callable returning JAX arrays (compiled on the warm-up calls).
      repeats: samples per function; each sample averages ``number`` calls.
      warmup: untimed calls per function first (compilation, caches).
      min_sample_s: the shortest sample; fast functions are called more often.
      max_total_s: stop early (after at least 3 rounds) once this much time is spent.

    Returns:
      name -> median seconds per call.
    """
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            _call(fns[name])
    number = {name: calls_per_sample(fns[name], min_sample_s) for name in names}
    samples: dict[str, list[float]] = {name: [] for name in names}
    start = time.perf_counter()
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            samples[name].append(_sample(fns[name], number[name]))
        if max_total_s is not None and r >= 2 and time.perf_counter() - start > max_total_s:
            break
    return {name: statistics.median(s) for name, s in samples.items()}


def machine() -> dict[str, Any]:
    """A description of where the benchmark ran: versions, CPU, cores, JAX devices."""
    devices = jax.devices()
    return {
        "jax": jax.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "backend": jax.default_backend(),
        "devices": [getattr(d, "device_kind", str(d)) for d in devices],
        "x64": bool(jax.config.jax_enable_x64),
        "compilation_cache": CACHE_DIR is not None,
    }


def write_json(path: str | os.PathLike, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` as indented JSON, creating parent folders; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A plain-text table of ``rows`` (dicts) with the given columns; floats in %.3g."""

    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}"
        return str(v)

    body = [[cell(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in body)) if body else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in body]
    return "\n".join(lines)


def describe(info: Mapping[str, Any]) -> str:
    """One line naming the machine, for the top of a printed table."""
    return (
        f"jax {info['jax']} on {info['backend']} ({', '.join(sorted(set(info['devices'])))}); "
        f"CPU {info['cpu']}, {info['cores']} cores"
    )
