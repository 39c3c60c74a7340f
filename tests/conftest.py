"""Tests run in float64 unless a test asks for float32 explicitly.

Each module's compiled programs are dropped when it ends: every XLA CPU
executable holds memory mappings of its own, and a whole suite's worth in one
process runs into the kernel's limit on mappings (vm.max_map_count), which
crashes the compiler.
"""
import jax
import pytest

jax.config.update("jax_enable_x64", True)


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs():
    yield
    jax.clear_caches()
