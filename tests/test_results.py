"""Results folders: commits that a kill cannot tear, a lock against a second writer, integrity on load."""
import json
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from attnopt import results

RESULTS_PY = pathlib.Path(results.__file__)

# A writer that loads attnopt/results.py alone (no JAX import: it starts in milliseconds), claims the
# folder and commits `count` versions, each a JSON payload and a PNG-like file that encodes its version.
WRITER = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("results", sys.argv[1])
results = importlib.util.module_from_spec(spec)
spec.loader.exec_module(results)
folder, first, count = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
try:
    output = results.claim(folder, "--out")
except ValueError as err:
    print(err, file=sys.stderr)
    sys.exit(2)
with output:
    print("claimed", flush=True)
    for version in range(first, first + count):
        output.commit({"version": version, "blob": "x" * 1_000_000}, {"figure.png": version.to_bytes(4, "big") * 250_000})
"""


def writer(folder, first, count):
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(RESULTS_PY), str(folder), str(first), str(count)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def version_of(folder) -> int:
    """The version results.json records, after checking that the figure is the one it lists and encodes it."""
    payload = results.load(folder)
    figure = (folder / "figure.png").read_bytes()
    assert figure == payload["version"].to_bytes(4, "big") * 250_000
    return payload["version"]


def test_commit_writes_all_files_and_load_checks_them(tmp_path):
    with results.claim(tmp_path / "out") as output:
        output.commit({"a": 1.0, "bad": float("nan")}, {"one.png": b"1", "two.png": b"2"})
        assert output.committed
        output.commit({"a": 2.0}, {"one.png": b"3"})
    payload = results.load(tmp_path / "out")
    assert payload["a"] == 2.0 and set(payload["files"]) == {"one.png"}
    assert not (tmp_path / "out" / "two.png").exists()  # a file of the previous results is not left beside the new ones
    assert not list((tmp_path / "out").glob("*.tmp")) and not list((tmp_path / "out").glob(".*.tmp"))
    (tmp_path / "out" / "one.png").write_bytes(b"another figure")
    with pytest.raises(ValueError, match="does not belong"):
        results.load(tmp_path / "out")


def test_payload_is_strict_json_with_nan_as_null(tmp_path):
    with results.claim(tmp_path) as output:
        output.commit({"x": [1.0, float("inf")], "y": (float("nan"),)})
    text = (tmp_path / "results.json").read_text()
    assert json.loads(text)["x"] == [1.0, None] and json.loads(text)["y"] == [None]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_kill_during_the_write_leaves_the_old_or_the_new_results(tmp_path, signum):
    folder = tmp_path / "out"
    with results.claim(folder) as output:
        output.commit({"version": 0}, {"figure.png": (0).to_bytes(4, "big") * 250_000})
    seen = 0
    for i, delay in enumerate(0.012 * k for k in range(16)):
        process = writer(folder, 1000 * (i + 1), 10_000)
        assert process.stdout.readline().strip() == "claimed"
        time.sleep(delay)
        process.send_signal(signum)
        process.communicate(timeout=30)
        version = version_of(folder)  # intact: the JSON parses and the figure is the one it lists
        assert version == seen or 1000 * (i + 1) <= version < 1000 * (i + 2)
        seen = version
    assert seen > 0, "no kill landed after a commit: the writes are too fast for this test"
    with results.claim(folder):  # the next claim removes what a killed writer left half written
        assert not list(folder.glob(".*.tmp"))


def test_two_writers_into_one_folder_cannot_mix(tmp_path):
    folder = tmp_path / "out"
    with results.claim(folder) as output:
        output.commit({"version": 0}, {"figure.png": (0).to_bytes(4, "big") * 250_000})
    first = writer(folder, 1000, 10_000)
    assert first.stdout.readline().strip() == "claimed"
    second = writer(folder, 2000, 3)
    _, err = second.communicate(timeout=30)
    assert second.returncode == 2
    assert err.strip() == f"--out: {folder} is in use by another attnopt run (pid {first.pid}); wait for it or choose another folder"
    first.terminate()
    first.communicate(timeout=30)
    # read once the first writer is gone (a read during its commits may see two of its versions)
    assert version_of(folder) == 0 or 1000 <= version_of(folder) < 2000
    again = writer(folder, 2000, 3)
    again.communicate(timeout=30)
    assert again.returncode == 0 and version_of(folder) == 2002


def test_a_second_claim_in_the_same_process_is_refused(tmp_path):
    with results.claim(tmp_path, "out_dir"):
        with pytest.raises(ValueError, match=r"^out_dir: .* is in use by another attnopt run"):
            results.claim(tmp_path, "out_dir")
    with results.claim(tmp_path):  # released
        pass
