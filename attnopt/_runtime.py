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
"""
from __future__ import annotations

import ctypes
import os
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


configure()
