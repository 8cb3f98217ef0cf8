"""Host tests: the node pack inside a real ComfyUI (set COMFYUI_PATH to a ComfyUI checkout; skipped otherwise).

ComfyUI runs in its own interpreter (env COMFYUI_PYTHON, default: this one) as a subprocess, headless on CPU,
with `--base-directory` pointing at a temporary folder holding custom_nodes/<pack> (a link to this repository)
and tiny models written by this process (see host_assets.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from host_env import COMFYUI_PATH, HERE, REPO


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="host tests need COMFYUI_PATH pointing at a ComfyUI checkout")
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.host)
            if not COMFYUI_PATH:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def host_assets(tmp_path_factory):
    if not COMFYUI_PATH:
        pytest.skip("COMFYUI_PATH is not set")
    if not (Path(COMFYUI_PATH) / "main.py").is_file():
        pytest.fail(f"COMFYUI_PATH={COMFYUI_PATH} is not a ComfyUI checkout (no main.py)")
    from host_assets import write_host_assets

    return write_host_assets(tmp_path_factory.mktemp("comfy_base"), REPO)
