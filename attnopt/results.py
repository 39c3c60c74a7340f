"""Results folders: claimed before any work, written atomically, verified on reading; what the machine is.

:func:`claim` checks that a folder can hold results (not a file, creatable,
writable) and locks it for this process (``fcntl.flock`` on a lock file
inside), so that two runs into one folder cannot interleave: the second one
fails at once with a message naming the folder and the other run's pid.
:meth:`Output.commit` writes ``results.json`` and its companion files (figures)
as temporary files in the same folder, then renames them into place with
SIGINT and SIGTERM deferred, so an interrupted run leaves either the
previous results or the new ones, never a truncated file or a mix.
``results.json`` records the SHA-256 of each companion file, and :func:`load`
checks them. :func:`provenance` and :func:`available_memory` describe the machine.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Mapping

RESULTS = "results.json"
LOCK = ".attnopt.lock"


class Output:
    """A results folder claimed (locked) by this process; see :func:`claim`. A context manager that releases it."""

    def __init__(self, folder: Path, key: str, lock_fd: int):
        self.folder, self.key, self._fd = folder, key, lock_fd
        self.committed = False

    def __enter__(self) -> "Output":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        """Unlock the folder (the lock file stays: removing it would race with a waiting run)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def commit(self, payload: Mapping[str, Any], files: Mapping[str, bytes] | None = None) -> None:
        """Write ``payload`` (through :func:`jsonable`) as results.json, with the SHA-256 of each of
        ``files`` under "files", and ``files`` (name -> bytes): all or none.

        Every file goes to a temporary file in the folder first (flushed to disk);
        the renames into place run with SIGINT and SIGTERM deferred. Files that the
        previous results.json listed and this one does not are removed.
        """
        if self._fd is None:
            raise ValueError(f"{self.key}: {self.folder} is no longer claimed")
        files = dict(files or {})
        payload = {**jsonable(payload), "files": {name: _sha256(data) for name, data in files.items()}}
        text = json.dumps(payload, indent=1, allow_nan=False) + "\n"
        stale = set(_listed_files(self.folder)) - set(files)
        temporary = {}
        try:
            for name, data in {**files, RESULTS: text.encode()}.items():
                temporary[name] = _write_temporary(self.folder, name, data)
            with _signals_deferred():
                for name, path in list(temporary.items()):
                    os.replace(path, self.folder / name)
                    del temporary[name]
                for name in stale:
                    (self.folder / name).unlink(missing_ok=True)
                self.committed = True
            _sync_folder(self.folder)
        finally:
            for path in temporary.values():
                path.unlink(missing_ok=True)


def claim(folder: str | Path, key: str = "out_dir") -> Output:
    """Check that ``folder`` can hold results, create it, lock it for this process, and remove the
    temporary files a killed writer left.

    Raises ValueError starting with ``key`` (the name the folder was given by,
    e.g. ``--out``) when it is a file, cannot be created or written, or is
    locked by another run.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{key}: {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise ValueError(f"{key}: cannot write results to {folder}: {err.strerror or err}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ValueError(
            f"{key}: {folder} is in use by another attnopt run (pid {owner}); wait for it or choose another folder"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    for stale in folder.glob(".*.tmp"):  # left by a writer that was killed outright: the lock says it is gone
        stale.unlink(missing_ok=True)
    return Output(folder, key, fd)


def jsonable(obj):
    """``obj`` ready for strict JSON: arrays and NumPy scalars as Python lists and numbers, tuples as
    lists, mapping keys as strings, and NaN or inf as None."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):
        return jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def load(folder: str | Path) -> dict:
    """results.json of ``folder``, after checking the SHA-256 of every file it lists; ValueError if one differs."""
    folder = Path(folder)
    payload = json.loads((folder / RESULTS).read_text())
    for name, digest in payload.get("files", {}).items():
        if _sha256((folder / name).read_bytes()) != digest:
            raise ValueError(f"{folder / name} does not belong to {folder / RESULTS} (its SHA-256 differs)")
    return payload


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _listed_files(folder: Path) -> list[str]:
    """The companion files the current results.json lists (none if it is missing or unreadable)."""
    try:
        listed = json.loads((folder / RESULTS).read_text()).get("files", {})
    except (OSError, ValueError, AttributeError):
        return []
    return [name for name in listed if isinstance(name, str) and "/" not in name and name != RESULTS]


def _write_temporary(folder: Path, name: str, data: bytes) -> Path:
    fd, path = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    os.fchmod(fd, 0o644)  # mkstemp makes the file private; results are for reading
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    return Path(path)


def _sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _signals_deferred():
    """Hold SIGINT and SIGTERM until the block ends, then act on them as before (their handlers, or
    the default action). Only the main thread can set handlers; elsewhere nothing is held."""
    held = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not None]
    if threading.current_thread() is not threading.main_thread():
        held = []
    received = []
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in received:
            signal.raise_signal(s)


# --------------------------------------------------------------------------- the machine


def provenance() -> dict[str, Any]:
    """What produced a result: attnopt's git commit (and whether the tree had changes), the versions
    of Python, jax, jaxlib, numpy and optax, the platform, the CPU model and the JAX devices."""
    import jax
    import jaxlib
    import numpy
    import optax

    import attnopt

    return {
        "attnopt": attnopt.__version__,
        "git": _git(Path(attnopt.__file__).resolve().parent),
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "numpy": numpy.__version__,
        "optax": optax.__version__,
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "backend": jax.default_backend(),
        "devices": [f"{d.platform}:{getattr(d, 'device_kind', '?')}" for d in jax.devices()],
        "x64": bool(jax.config.jax_enable_x64),
    }


def _git(source: Path) -> dict[str, Any] | None:
    """The commit of the checkout holding ``source`` and whether tracked files differ from it; None outside git."""
    def git(*args):
        return subprocess.run(
            ["git", "--no-optional-locks", "-C", str(source), *args], capture_output=True, text=True, timeout=10,
        )

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.TimeoutExpired):
        return None
    return {"commit": head.stdout.strip(), "modified": bool(dirty.stdout.strip())}


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what ``platform`` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def available_memory() -> int:
    """Bytes a run may use: the free memory of the first JAX device where it reports it (GPUs),
    else the host's available memory."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
