"""The persistent compilation cache: where it lives (ATTNOPT_CACHE_DIR, XDG_CACHE_HOME, ~/.cache), "off",
bad values, switching it in a process, and a second CLI process loading every program from it."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnopt
from attnopt import _runtime, cli

ENV = _runtime.CACHE_ENV


@pytest.fixture
def restore_cache():
    """Put this process's cache back as conftest set it (tests here switch it)."""
    folder = jax.config.jax_compilation_cache_dir
    yield
    _runtime.enable_compilation_cache(folder if folder is not None else "off")


def entries(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.name.endswith("-cache")} if folder.is_dir() else set()


def test_importing_attnopt_leaves_the_cache_off():
    code = "import attnopt, jax; print(jax.config.jax_compilation_cache_dir)"
    env = {**os.environ, ENV: "/nonexistent/never/created"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "None", out.stderr
    assert attnopt.enable_compilation_cache is _runtime.enable_compilation_cache


def test_env_var_names_the_folder(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV, str(tmp_path / "jax"))
    assert _runtime.compilation_cache_dir() == tmp_path / "jax"
    monkeypatch.setenv(ENV, "~/somewhere")
    assert _runtime.compilation_cache_dir() == Path.home() / "somewhere"
    assert _runtime.compilation_cache_dir(tmp_path / "given") == tmp_path / "given"  # an argument wins


@pytest.mark.parametrize("value", ["off", "OFF", " off ", "", "  "])
def test_off_or_empty_turns_it_off(monkeypatch, value):
    monkeypatch.setenv(ENV, value)
    assert _runtime.compilation_cache_dir() is None
    assert _runtime.compilation_cache_dir(value) is None


def test_default_is_under_xdg_cache_home_else_home(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert _runtime.compilation_cache_dir() == tmp_path / "attnopt" / "jax"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for xdg in ("", "relative/cache"):  # unset, or not absolute: ignored (XDG base directory spec)
        monkeypatch.setenv("XDG_CACHE_HOME", xdg)
        assert _runtime.compilation_cache_dir() == tmp_path / "home" / ".cache" / "attnopt" / "jax"


@pytest.mark.parametrize("value, message", [
    ("relative/cache", "expected an absolute folder path"),
    ("false", "expected a folder path, or 'off'"),
    ("0", "expected a folder path, or 'off'"),
])
def test_bad_values_are_refused_naming_the_variable(monkeypatch, value, message):
    monkeypatch.setenv(ENV, value)
    with pytest.raises(ValueError, match=f"^{ENV}=.*{message}"):
        _runtime.compilation_cache_dir()
    with pytest.raises(ValueError, match=message):
        _runtime.enable_compilation_cache()
    with pytest.raises(ValueError, match=f"^compilation cache folder=.*{message}"):
        _runtime.compilation_cache_dir(value)


def test_a_nul_character_is_refused():
    with pytest.raises(ValueError, match="NUL"):
        _runtime.compilation_cache_dir("/tmp/a\0b")


def test_a_file_or_an_uncreatable_folder_is_refused(monkeypatch, tmp_path, restore_cache):
    file = tmp_path / "file"
    file.write_text("")
    monkeypatch.setenv(ENV, str(file))
    with pytest.raises(ValueError, match="exists and is not a folder"):
        _runtime.enable_compilation_cache()
    monkeypatch.setenv(ENV, str(file / "below"))
    with pytest.raises(ValueError, match=f"^{ENV}=.*cannot create or write it"):
        _runtime.enable_compilation_cache()
    with pytest.raises(TypeError, match="str or path"):
        _runtime.enable_compilation_cache(42)


def test_an_unusable_default_folder_only_warns(monkeypatch, tmp_path, restore_cache):
    (tmp_path / "file").write_text("")
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))
    with pytest.warns(RuntimeWarning, match="running without the compilation cache"):
        assert _runtime.enable_compilation_cache() is None
    assert jax.config.jax_compilation_cache_dir is None


def test_the_cli_refuses_a_bad_value_before_any_work(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv(ENV, "relative/cache")
    assert cli.main(["run", str(tmp_path / "missing.toml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"attnopt run: {ENV}='relative/cache': expected an absolute folder path") and "\n" not in err


def test_enable_writes_every_new_program_there_and_off_stops_it(tmp_path, restore_cache):
    folder = tmp_path / "cache"
    assert _runtime.enable_compilation_cache(folder) == folder and folder.is_dir()
    assert jax.config.jax_compilation_cache_dir == str(folder)
    assert oct(folder.stat().st_mode & 0o777) == oct(0o700)
    jax.jit(lambda x: jnp.sin(x) * 1.2345)(np.arange(3.0)).block_until_ready()
    written = entries(folder)
    assert len(written) == 1  # a tiny program too: no minimum compile time or size
    assert _runtime.enable_compilation_cache("off") is None
    assert jax.config.jax_compilation_cache_dir is None
    jax.jit(lambda x: jnp.cos(x) * 2.3456)(np.arange(3.0)).block_until_ready()
    assert entries(folder) == written


CONFIG = """
[experiment]
max_steps = 8
tol = 1e-9

[problem]
name = "softmax"
n = 12
d = 3
reg = 0.1

[[solvers]]
name = "newton"
"""


def run_cli(config: Path, out: Path, cache: Path) -> str:
    """`python -m attnopt run` in a new process with compile logging (JAX_LOG_COMPILES also logs cache hits)."""
    env = {**os.environ, ENV: str(cache), "JAX_LOG_COMPILES": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "attnopt", "run", str(config), "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def test_a_second_cli_process_loads_every_program_from_the_cache(tmp_path):
    config, cache = tmp_path / "tiny.toml", tmp_path / "cache"
    config.write_text(textwrap.dedent(CONFIG))
    first = run_cli(config, tmp_path / "first", cache)
    compiled = first.count("Finished XLA compilation")
    written = entries(cache)
    assert compiled >= 1 and "Persistent compilation cache hit" not in first
    assert len(written) == compiled  # every program was written, however small
    second = run_cli(config, tmp_path / "second", cache)
    assert second.count("Finished XLA compilation") == compiled  # the same programs, in the same order
    assert second.count("Persistent compilation cache hit") == compiled  # ... every one loaded from disk
    assert entries(cache) == written
