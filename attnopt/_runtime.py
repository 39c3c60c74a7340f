"""Process-wide runtime defaults: one OpenBLAS thread, so that LAPACK does not compete with XLA.

On CPU, JAX runs dense factorisations (Cholesky, eigh, QR, ...) through the
LAPACK of SciPy's bundled OpenBLAS, loaded on the first such call. OpenBLAS
starts one thread per core and XLA keeps its own pool of as many threads, so
the two oversubscribe the cores: on a 2-core machine ``newton`` at n=8192,
d=256 took 75-77 ms with OpenBLAS's default against 37-41 ms with one BLAS
thread. attnopt's factorisations are of d x d matrices (d up to a few
hundred), which gain little from threads, while XLA already parallelises the
large products. So, unless the user chose a thread count:

- if ``OPENBLAS_NUM_THREADS`` is not set, it is set to 1 before any OpenBLAS
  that is loaded later reads it (SciPy's, the usual case: JAX loads it lazily);
- an OpenBLAS other than NumPy's own that is already loaded (SciPy imported
  before attnopt) is set to one thread through its ``*openblas_set_num_threads``.

Set ``OPENBLAS_NUM_THREADS`` (e.g. to the core count) before importing attnopt
to keep OpenBLAS's threads, or call :func:`set_blas_threads` at any time.
The variable is inherited by subprocesses.

Compilation cache: :func:`enable_compilation_cache` turns on JAX's persistent
compilation cache, so that a program compiled once on a machine is loaded from
disk by later processes instead of being compiled again. Importing attnopt does
not turn it on (a library should not write to disk on import); the command line,
the benchmarks and the tests do. The folder is ``ATTNOPT_CACHE_DIR`` if set,
else ``$XDG_CACHE_HOME/attnopt/jax``, else ``~/.cache/attnopt/jax``;
``ATTNOPT_CACHE_DIR=off`` (or empty) turns the cache off. Deleting the folder
clears it.
"""
from __future__ import annotations

import ctypes
import os
import warnings
from pathlib import Path

#: Setter symbols of OpenBLAS builds: SciPy's and NumPy's wheels prefix them ``scipy_``; ILP64 builds end in ``64_``.
_SETTERS = (
    "scipy_openblas_set_num_threads64_",
    "scipy_openblas_set_num_threads",
    "openblas_set_num_threads64_",
    "openblas_set_num_threads",
)


def loaded_openblas() -> list[str]:
    """Paths of the OpenBLAS libraries loaded in this process (Linux: from /proc/self/maps; else [])."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    paths = {line.split()[-1] for line in maps.splitlines() if "openblas" in line.lower()}
    return sorted(p for p in paths if p.startswith("/"))


def set_blas_threads(threads: int, *, include_numpy: bool = True) -> list[str]:
    """Set the thread count of every loaded OpenBLAS (optionally skipping NumPy's own); returns their paths.

    Raises ValueError unless ``threads`` is an int >= 1.
    """
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an int >= 1, got {threads!r}")
    changed = []
    for path in loaded_openblas():
        if not include_numpy and "numpy" in Path(path).parent.name:
            continue
        library = ctypes.CDLL(path)
        setter = next((getattr(library, name) for name in _SETTERS if hasattr(library, name)), None)
        if setter is not None:
            setter(ctypes.c_int(threads))
            changed.append(path)
    return changed


def configure() -> None:
    """The import-time default above: one OpenBLAS thread unless ``OPENBLAS_NUM_THREADS`` is set."""
    if "OPENBLAS_NUM_THREADS" in os.environ:
        return
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    set_blas_threads(1, include_numpy=False)


#: The environment variable that names the compilation cache folder; "off" or "" turns the cache off.
CACHE_ENV = "ATTNOPT_CACHE_DIR"
#: Values of ``ATTNOPT_CACHE_DIR`` that turn the cache off (case-insensitive, surrounding spaces ignored).
_OFF = ("", "off")
#: Values that look like a switch rather than a folder: refused, so that they do not create a folder by that name.
_SWITCHES = ("0", "1", "no", "yes", "false", "true", "none", "null", "on", "disable", "disabled", "enable", "enabled")
#: JAX options set with the cache (unless the user set them through JAX's own ``JAX_...`` variables): every
#: program is written, however fast it compiled or small it is (attnopt runs many programs of a few ms each,
#: and loading one from disk is faster than compiling it again).
_CACHE_OPTIONS = {
    "jax_enable_compilation_cache": True,
    "jax_persistent_cache_min_compile_time_secs": 0.0,
    "jax_persistent_cache_min_entry_size_bytes": -1,
}


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/attnopt/jax`` if ``XDG_CACHE_HOME`` is an absolute path, else ``~/.cache/attnopt/jax``."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "attnopt" / "jax"


def compilation_cache_dir(path: str | os.PathLike | None = None) -> Path | None:
    """The compilation cache folder that :func:`enable_compilation_cache` would use, or None when it is off.

    ``path`` if given, else ``ATTNOPT_CACHE_DIR`` if set, else :func:`default_cache_dir`. The value
    ``"off"`` or an empty string means off. Nothing is created here.

    Raises:
      TypeError: ``path`` is not a string or path.
      ValueError: a value that is neither off nor an absolute folder path (``~`` is expanded): a relative
        path, a switch-like word (``0``, ``false``, ``no``, ...: write ``off``), a NUL character, or an
        existing file that is not a folder. The message names ``ATTNOPT_CACHE_DIR`` when the value came from it.
    """
    if path is None:
        if CACHE_ENV not in os.environ:
            return default_cache_dir()
        value, name = os.environ[CACHE_ENV], CACHE_ENV
    elif isinstance(path, (str, os.PathLike)):
        value, name = os.fspath(path), "compilation cache folder"
        if not isinstance(value, str):
            raise TypeError(f"the compilation cache folder must be a str or path, got bytes {value!r}")
    else:
        raise TypeError(f"the compilation cache folder must be a str or path, got {type(path).__name__}")
    if value.strip().lower() in _OFF:
        return None
    if value.strip().lower() in _SWITCHES:
        raise ValueError(f"{name}={value!r}: expected a folder path, or 'off' to turn the cache off")
    if "\0" in value:
        raise ValueError(f"{name}={value!r}: a path cannot contain a NUL character")
    folder = Path(value).expanduser()
    if not folder.is_absolute():
        raise ValueError(f"{name}={value!r}: expected an absolute folder path (or ~/...), or 'off'")
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{name}={value!r}: exists and is not a folder")
    return folder


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path | None:
    """Turn on JAX's persistent compilation cache in this process; returns its folder, or None if off.

    The folder is ``path`` if given, else ``ATTNOPT_CACHE_DIR``, else :func:`default_cache_dir`
    (see :func:`compilation_cache_dir`); ``"off"`` (or ``""``) turns the cache off instead
    (:func:`disable_compilation_cache`). A missing folder is created, readable by its owner only (JAX
    runs what it loads from there). Every compiled program is cached, fast or small, unless
    ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` / ``JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES``
    say otherwise (and ``JAX_ENABLE_COMPILATION_CACHE=false`` keeps it off). Programs compiled in this process before the call are not written; calling it
    again with another folder switches to that folder.

    Raises:
      TypeError, ValueError: as :func:`compilation_cache_dir`; ValueError also when the folder chosen
        by ``path`` or ``ATTNOPT_CACHE_DIR`` cannot be created or written. The default folder failing
        only warns (RuntimeWarning) and leaves the cache off.
    """
    explicit = path is not None or CACHE_ENV in os.environ
    try:
        folder = compilation_cache_dir(path)
    except RuntimeError as err:  # the default folder, and no home folder to put it in
        warnings.warn(f"no compilation cache folder ({err}); running without the compilation cache (set "
                      f"{CACHE_ENV})", RuntimeWarning, stacklevel=2)
        disable_compilation_cache()
        return None
    if folder is None:
        disable_compilation_cache()
        return None
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except (OSError, RuntimeError) as err:
        name = "compilation cache folder" if path is not None or not explicit else CACHE_ENV
        message = f"{name}={os.fspath(folder)!r}: cannot create or write it: {getattr(err, 'strerror', None) or err}"
        if explicit:
            raise ValueError(message) from None
        warnings.warn(f"{message}; running without the compilation cache (set {CACHE_ENV})", RuntimeWarning,
                      stacklevel=2)
        disable_compilation_cache()
        return None

    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    for option, value in _CACHE_OPTIONS.items():
        if option.upper() not in os.environ:
            jax.config.update(option, value)
    if jax.config.jax_compilation_cache_dir != str(folder):
        jax.config.update("jax_compilation_cache_dir", str(folder))
        cc.reset_cache()  # a cache opened already in this process stays on its folder otherwise
    return folder


def disable_compilation_cache() -> None:
    """Turn JAX's persistent compilation cache off in this process (no reads, no writes); the folder is kept."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    if jax.config.jax_compilation_cache_dir is not None:
        jax.config.update("jax_compilation_cache_dir", None)
        cc.reset_cache()


configure()
