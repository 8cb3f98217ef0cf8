"""The pack's templates in ComfyUI's real frontend (headless Chromium), on a fresh install without models.

For every workflow the server lists for the pack: the template route serves it and its thumbnail; opened from the
template dialog as a user would, it loads without a missing-node dialog, with the file's node and link counts,
no node drawn smaller than the frontend needs and no two node boxes (title bars included) overlapping; pressing
Run names the missing Kontext model file and its folder. Screenshots go to the test's temporary folder.
Skipped without COMFYUI_PATH (see conftest.py), Playwright or Debian's chromium (frontend.py).
"""

from __future__ import annotations

import json
import urllib.request

import pytest

import frontend as F
import host_workflows as W
from host_env import ComfyServer

@pytest.fixture(scope="module")
def fresh_server(tmp_path_factory):
    if F.browser_problem():
        pytest.skip(F.browser_problem())
    srv = ComfyServer(F.fresh_base(tmp_path_factory.mktemp("fresh_install")), start_timeout=900)
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def page(fresh_server):
    with F.browser_page(fresh_server.url) as p:
        yield p


def served_templates(server) -> list[str]:
    return sorted(server.get("/workflow_templates").get(F.PACK, []))


def test_listed_templates_are_the_ui_workflows(fresh_server):
    titles = sorted(g.title for g in W.graphs().values())
    assert served_templates(fresh_server) == titles


def _fetch(url: str) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(urllib.request.Request(url.replace(" ", "%20")), timeout=60) as r:
        return r.status, r.headers.get("Content-Type", ""), r.read()


def test_every_template_is_served_with_its_thumbnail(fresh_server):
    b = W.builder()
    graphs = {g.title: g for g in W.graphs().values()}
    for title in served_templates(fresh_server):
        status, _, body = _fetch(f"{fresh_server.url}/api/workflow_templates/{F.PACK}/{title}.json")
        assert status == 200 and json.loads(body) == json.loads(b.ui_path(graphs[title]).read_text()), title
        status, ctype, body = _fetch(f"{fresh_server.url}/api/workflow_templates/{F.PACK}/{title}.jpg")
        assert status == 200 and ctype == "image/jpeg" and body[:3] == b"\xff\xd8\xff", title


def _wait_for_history(server, before: int, timeout_s: float = 300) -> dict:
    import time

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        history = server.get("/history")
        if len(history) > before and all(h.get("status", {}).get("completed") for h in history.values()):
            return history
        time.sleep(1)
    raise AssertionError(f"the prompt did not finish within {timeout_s} s")


def test_templates_open_cleanly_and_name_the_missing_model(fresh_server, page, tmp_path):
    b = W.builder()
    graphs = {g.title: g for g in W.graphs().values()}
    titles = served_templates(fresh_server)
    assert titles
    report = []
    for title in titles:
        ui = json.loads(b.ui_path(graphs[title]).read_text())
        dialogs = F.open_template(page, title, len(ui["nodes"]))
        assert not [d for d in dialogs if "not found" in d.lower() and "node" in d.lower()], (title, dialogs)
        state = F.graph_state(page)
        assert len(state["nodes"]) == len(ui["nodes"]) and state["links"] == len(ui["links"]), title
        assert state["titleHeight"] == b.TITLE_H
        too_small = [(n["title"], n["size"], n["min"]) for n in state["nodes"]
                     if n["size"][0] + 0.5 < n["min"][0] or n["size"][1] + 0.5 < n["min"][1]]
        assert not too_small, (title, too_small)
        # the file's sizes are those the frontend draws (it would enlarge smaller ones, overlapping neighbours)
        drawn = {n["id"]: [round(v) for v in n["size"]] for n in state["nodes"]}
        assert drawn == {n["id"]: n["size"] for n in ui["nodes"]}, title
        assert F.box_overlaps(state["nodes"]) == [], title
        F.close_dialogs(page)
        F.fit_view(page)
        shot = tmp_path / f"{title}.png"
        page.screenshot(path=str(shot))
        if any(n["type"] == "KontextNativeTinyLoader" for n in ui["nodes"]):
            # the bundled model needs no download: Run from the browser must finish and save its picture
            before = len(fresh_server.get("/history"))
            F.press_run(page)
            history = _wait_for_history(fresh_server, before)
            assert all(h["status"]["status_str"] == "success" for h in history.values()), (title, history)
            assert any(o.get("images") for h in history.values() for o in h["outputs"].values()), title
            report.append((title, len(state["nodes"]), state["links"], 0))
            continue
        message = F.run_and_read_error(page)
        page.screenshot(path=str(tmp_path / f"{title} - run.png"))
        loader = next(n for n in ui["nodes"] if n["type"] in ("KontextNativeModelLoader", "KontextNativeGGUFLoader"))
        model_file = loader["widgets_values"][0]
        assert model_file in message and "models/diffusion_models" in message, (title, message[:2000])
        report.append((title, len(state["nodes"]), state["links"], message.count(model_file)))
        F.close_dialogs(page)
    assert not page.errors, page.errors
    print("\n".join(f"{t}: {n} nodes, {l} links, " + ("model named" if c else "ran") for t, n, l, c in report))
