"""Tests run in float64 unless a test asks for float32 explicitly.

Each module's compiled programs are dropped when it ends: every XLA CPU
executable holds memory mappings of its own, and a whole suite's worth in one
process runs into the kernel's limit on mappings (vm.max_map_count), which
crashes the compiler. ``jax.clear_caches`` drops the programs in memory only:
the persistent compilation cache (``ATTNOPT_CACHE_DIR``, else
``~/.cache/attnopt/jax``; ``ATTNOPT_CACHE_DIR=off`` turns it off), turned on
here, still serves them, in this run and the next ones.
"""
import jax
import pytest

from attnopt import _runtime

jax.config.update("jax_enable_x64", True)
try:
    _runtime.enable_compilation_cache()
except ValueError as err:
    raise pytest.UsageError(str(err)) from None


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs():
    yield
    jax.clear_caches()
