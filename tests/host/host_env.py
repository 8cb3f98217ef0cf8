"""Where ComfyUI is and how to run it (env COMFYUI_PATH, COMFYUI_PYTHON) for the host tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
COMFYUI_PYTHON = os.environ.get("COMFYUI_PYTHON") or sys.executable
REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def _env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)  # ComfyUI must not see this repository's modules (e.g. our nodes/ package)
    return env


# All jobs run in one ComfyUI process: ~3-9 min on 2 free cores; a busy machine needs longer (override in seconds).
DRIVER_TIMEOUT = int(os.environ.get("KONTEXT_HOST_TIMEOUT", "2400"))


def run_driver(assets, jobs: list[dict], timeout: int = DRIVER_TIMEOUT) -> dict:
    work = assets.base / "driver"
    work.mkdir(exist_ok=True)
    jobs_path, out_path = work / "jobs.json", work / "results.json"
    jobs_path.write_text(json.dumps(jobs))
    env = _env()
    proc = subprocess.run([COMFYUI_PYTHON, str(HERE / "comfy_driver.py"), "--comfyui", COMFYUI_PATH, "--base",
                           str(assets.base), "--jobs", str(jobs_path), "--out", str(out_path)],
                          cwd=COMFYUI_PATH, env=env, capture_output=True, text=True, timeout=timeout)
    (work / "driver.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    if not out_path.exists():
        raise AssertionError(f"driver produced no results (rc={proc.returncode}):\n{proc.stderr[-6000:]}")
    results = json.loads(out_path.read_text())
    if not results["boot"]["ok"]:
        raise AssertionError(f"ComfyUI failed to start:\n{results['boot']['error']}\n{proc.stderr[-4000:]}")
    results["log"] = str(work / "driver.log")
    return results


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, data: dict | None = None, timeout: float = 30.0):
    body = None if data is None else json.dumps(data).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"} if body else {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read().decode())


class ComfyServer:
    """A real ComfyUI server (main.py) on 127.0.0.1, started and stopped by the tests."""

    def __init__(self, base: Path, start_timeout: float = 240.0):
        self.base = base
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / f"server_{self.port}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [COMFYUI_PYTHON, "main.py", "--cpu", "--base-directory", str(base), "--listen", "127.0.0.1", "--port",
             str(self.port), "--disable-api-nodes", "--database-url", "sqlite:///:memory:", "--preview-method",
             "latent2rgb"], cwd=COMFYUI_PATH, env=_env(), stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.time() + start_timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"ComfyUI server exited with {self.proc.returncode}:\n{self.log()[-6000:]}")
            try:
                http_json(self.url + "/system_stats", timeout=5)
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.time() > deadline:
                log = self.log()
                self.stop()
                raise AssertionError(f"ComfyUI server did not answer within {start_timeout}s:\n{log[-6000:]}")
            time.sleep(0.5)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def get(self, path: str, timeout: float = 60.0):
        return http_json(self.url + path, timeout=timeout)

    def post(self, path: str, data: dict, timeout: float = 60.0):
        return http_json(self.url + path, data, timeout=timeout)

    def run_prompt(self, prompt: dict, timeout: float = 240.0) -> dict:
        """POST /prompt, then poll /history/<id> (bounded) until the prompt has finished."""
        pid = self.post("/prompt", {"prompt": prompt, "client_id": "kontext-native-host-test"})["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            hist = self.get(f"/history/{pid}")
            if pid in hist and hist[pid].get("status", {}).get("completed") is not None:
                if hist[pid]["status"].get("status_str") in ("success", "error"):
                    return hist[pid]
            time.sleep(0.5)
        raise AssertionError(f"prompt {pid} did not finish within {timeout}s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self._log.close()


# --- reading driver results (shared by the host test modules) ---------------------------------------------

SCALE, SHIFT = 0.3611, 0.1159  # FLUX latent format: model space = (raw - shift) * scale


def to_model_space(raw):
    return (raw.float() - SHIFT) * SCALE


# Development aid: KONTEXT_HOST_JOBS="tiny_anchored,wf:edit_chain" runs only the jobs whose names start so; the
# tests needing other jobs are skipped. Unset (CI, closing runs): every job runs.
JOB_FILTER = tuple(p for p in os.environ.get("KONTEXT_HOST_JOBS", "").split(",") if p)


def select_jobs(jobs: list[dict]) -> list[dict]:
    return [j for j in jobs if not JOB_FILTER or j["name"].startswith(JOB_FILTER)]


def job(driver, name: str) -> dict:
    if name not in driver["results"] and JOB_FILTER:
        import pytest

        pytest.skip(f"job {name} not selected by KONTEXT_HOST_JOBS")
    r = driver["results"][name]
    assert "driver_error" not in r, r["driver_error"]
    return r


def ok(driver, name: str) -> dict:
    r = job(driver, name)
    if not r.get("success"):
        errors = [m for m in r.get("messages", []) if m[0] == "execution_error"]
        raise AssertionError(f"{name} failed: {r.get('validation_error') or r.get('node_errors') or errors} "
                             f"(driver log: {driver['log']})")
    return r
