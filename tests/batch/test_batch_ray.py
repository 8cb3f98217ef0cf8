"""The Ray Data mode on a local Ray instance of 2 CPUs and 2 model workers: same outputs and resume rule as the
one-machine runner, and a job survives workers that die (by their own hand, or killed from outside)."""

import json
import os
import signal
import threading
import time

import numpy as np
import pytest

from batch_jobs import make_job, output_files, read_png, write_csv
from kontext_core import batch
from kontext_core.batch import ModelSpec, load_job, run_local
from kontext_core.cli import main as cli

ray = pytest.importorskip("ray", reason="the Ray mode needs the [scale] extra (ray[data])")
pytest.importorskip("ray.data")
from kontext_core.batch_ray import run_ray  # noqa: E402

# Ray Data's own DataContext warns about its deprecated settings when it is first used; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
TINY = ModelSpec()
WORKER_TITLE = "MapWorker(MapBatches(EditWorker))"  # Ray's process title for our actors


@pytest.fixture(scope="module")
def cluster():
    """One local Ray instance for the module (starting one costs ~20 s of CPU here)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def assert_complete(out_dir, outputs):
    """Every output once, complete (a PNG that decodes, its sidecar), nothing else: no temporaries."""
    expected = [batch.REPORT_FILE] + sorted(f"{os.path.splitext(o)[0]}.{e}" for o in outputs for e in ("json", "png"))
    assert output_files(out_dir) == sorted(expected)
    for o in outputs:
        assert read_png(os.path.join(out_dir, o)).shape == (64, 64, 3)
        assert json.load(open(os.path.join(out_dir, os.path.splitext(o)[0] + ".json")))["output"] == o


def test_ray_mode_writes_what_the_local_runner_writes(cluster, tmp_path, capsys):
    manifest, rows = make_job(tmp_path, 4)
    png = (tmp_path / "pics" / "p2.png").read_bytes()
    (tmp_path / "pics" / "p2.png").write_bytes(png[: len(png) // 2])  # a corrupt picture fails alone
    local, remote = tmp_path / "local", tmp_path / "ray"
    run_local(load_job(manifest, TINY), str(local), TINY, batch_size=2, progress=False)
    assert cli(["batch", manifest, "--out", str(remote), "--ray", "--workers", "2", "--batch-size", "2"]) == 1
    captured = capsys.readouterr()
    assert "3 edited, 0 already done, 1 failed of 4" in captured.out
    assert "failed: p2.png: jobs.csv line 4:" in captured.err and "cannot read the image" in captured.err
    assert_complete(remote, ["p0.png", "p1.png", "p3.png"])
    for name in ("p0", "p1", "p3"):
        assert np.abs(read_png(remote / f"{name}.png").astype(int) - read_png(local / f"{name}.png")).max() <= 2
        ours, theirs = (json.load(open(d / f"{name}.json")) for d in (local, remote))
        assert ours["request"] == theirs["request"]
    # Resume is the same rule: a rerun (either mode) finds them finished and only retries the failed item.
    again = run_local(load_job(manifest, TINY), str(remote), TINY, progress=False)
    assert again.skipped == 3 and again.done == [] and list(again.failed) == ["p2.png"]


def test_a_worker_that_dies_mid_job_loses_and_duplicates_nothing(cluster, tmp_path):
    manifest, _ = make_job(tmp_path, 6)
    marker = tmp_path / "crashed"
    report = run_ray(load_job(manifest, TINY), str(tmp_path / "out"), TINY, batch_size=1, workers=2,
                     progress=False, crash_once=("p2.png", str(marker)))
    assert marker.exists()  # a worker process did exit abruptly on p2 ...
    assert sorted(report.done) == [f"p{i}.png" for i in range(6)] and not report.failed  # ... and p2 was redone
    assert_complete(tmp_path / "out", [f"p{i}.png" for i in range(6)])


def _our_worker_pids():
    """pids of EditWorker actors that descend from this test process (never anyone else's processes)."""
    me, found = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = open(f"/proc/{entry}/cmdline", "rb").read().decode(errors="replace")
            if WORKER_TITLE not in cmd:
                continue
            pid = int(entry)
            while pid > 1:
                pid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
                if pid == me:
                    found.append(int(entry))
                    break
        except (OSError, ValueError, IndexError):
            continue
    return found


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the worker processes through /proc (Linux)")
def test_a_worker_killed_from_outside_mid_job(cluster, tmp_path):
    manifest, rows = make_job(tmp_path, 8)
    for r in rows:
        r["steps"] = "6"  # long enough per item that the kill lands while the workers are busy
    write_csv(manifest, rows)
    out = tmp_path / "out"
    result = {}
    runner = threading.Thread(target=lambda: result.setdefault(
        "report", run_ray(load_job(manifest, TINY), str(out), TINY, batch_size=1, workers=2, progress=False)))
    runner.start()
    killed = None
    deadline = time.time() + 300
    while runner.is_alive() and time.time() < deadline:
        pids = _our_worker_pids()
        if pids and any(f.endswith(".png") for f in output_files(out)):  # working, and at least one item done
            killed = pids[0]
            os.kill(killed, signal.SIGKILL)
            break
        time.sleep(0.2)
    runner.join(timeout=600)
    if killed is None:
        pytest.skip("the job finished before a worker could be killed (machine too fast for this drill)")
    assert not os.path.exists(f"/proc/{killed}") or "zombie" in open(f"/proc/{killed}/status").read().lower()
    report = result["report"]
    assert sorted(report.done) == [f"p{i}.png" for i in range(8)] and not report.failed
    assert_complete(out, [f"p{i}.png" for i in range(8)])
