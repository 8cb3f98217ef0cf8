"""Driving ComfyUI's real frontend in headless Chromium (Playwright's Python API) as a user would.

Used by test_frontend.py, and as a script to render the template thumbnails (workflows/<Title>.jpg):

    COMFYUI_PATH=... COMFYUI_PYTHON=... python tests/host/frontend.py thumbnails

Playwright's own browser download cannot work here: Debian's `chromium` package is driven instead
(CHROMIUM below). Everything needing neither this nor a ComfyUI is skipped by the callers.
"""

from __future__ import annotations

import io
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from host_env import COMFYUI_PATH, REPO, ComfyServer

CHROMIUM = "/usr/bin/chromium"
PACK = "comfyui-kontext-native"  # the folder name the pack is linked under (host_assets does the same)
TIMEOUT_MS = 400_000  # generous: the test machines are small and often busy
VIEWPORT = (1600, 1000)
THUMBNAIL_VIEWPORT = (2000, 1400)  # wide enough that the widest graph fits at a readable zoom
MISSING_NODES_TEXT = "missing"  # the frontend's missing-node dialog lists "node types were not found"


def browser_problem() -> str | None:
    """Why the browser tests cannot run here, or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright)"
    if not Path(CHROMIUM).exists():
        return f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    return None


def fresh_base(base: Path) -> Path:
    """A ComfyUI base directory as a fresh install has it: the pack, no models, input/example.png."""
    for sub in ("custom_nodes", "input", "output", "temp", "user", "models"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK
    if not link.exists():
        link.symlink_to(REPO, target_is_directory=True)
    shipped = Path(COMFYUI_PATH) / "input" / "example.png"
    if shipped.exists():
        shutil.copy(shipped, base / "input" / "example.png")
    return base


@contextmanager
def browser_page(url: str, viewport: tuple[int, int] = VIEWPORT):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
            page.set_default_timeout(TIMEOUT_MS)
            page.errors = []
            page.on("pageerror", lambda e: page.errors.append(f"{e.message}\n{(e.stack or '')[:1500]}"))
            page.goto(url, timeout=TIMEOUT_MS)
            page.wait_for_function("window.app && window.app.graph && window.app.extensionManager",
                                   timeout=TIMEOUT_MS)
            # pictures, not behaviour: no minimap over the canvas, and node text drawn at every zoom
            page.evaluate("""async () => {
                await app.extensionManager.setting.set('Comfy.Minimap.Visible', false);
                await app.extensionManager.setting.set('LiteGraph.Canvas.MinFontSizeForLOD', 1);
            }""")
            time.sleep(2)
            # frontend 1.27.10 throws one TypeError of its own while registering settings at start-up (on a
            # fresh page, before any workflow): only errors raised from here on are counted
            page.startup_errors, page.errors = page.errors, []
            yield page
        finally:
            browser.close()


def dialog_texts(page) -> list[str]:
    return [t for t in page.locator(".p-dialog").all_inner_texts() if t.strip()]


def close_dialogs(page) -> None:
    for _ in range(5):
        if not page.locator(".p-dialog").count():
            return
        page.keyboard.press("Escape")
        time.sleep(0.3)


def open_template(page, title: str, n_nodes: int) -> list[str]:
    """Open the pack's template `title` from the template dialog (sidebar Templates button, the pack's entry
    under Custom Nodes, the card); returns the texts of the dialogs shown after loading."""
    close_dialogs(page)
    page.get_by_role("button", name="Templates").click()
    page.get_by_role("option", name=PACK).click()
    page.locator(f'[data-testid="template-workflow-{title}"]').click()
    page.wait_for_function("([title, n]) => app.graph.nodes.length === n && "
                           "(app.extensionManager.workflow?.activeWorkflow?.filename === title || "
                           "document.title.includes(title))", arg=[title, n_nodes])
    time.sleep(1.5)  # let images load and dialogs open
    return dialog_texts(page)


GRAPH_STATE = """() => ({
    nodes: app.graph.nodes.map(n => ({id: n.id, type: n.type, title: n.title, size: [...n.size],
                                      min: [...n.computeSize()], box: [...n.boundingRect]})),
    links: app.graph.links instanceof Map ? app.graph.links.size : Object.keys(app.graph.links).length,
    titleHeight: LiteGraph.NODE_TITLE_HEIGHT,
})"""


def graph_state(page) -> dict:
    return page.evaluate(GRAPH_STATE)


def box_overlaps(nodes: list[dict]) -> list[tuple]:
    """Pairs of nodes whose drawn boxes ([x, y, w, h] with the title bar) intersect."""
    out = []
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            (ax, ay, aw, ah), (bx, by, bw, bh) = a["box"], b["box"]
            if ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah:
                out.append((a["title"], b["title"]))
    return out


def fit_view(page) -> None:
    """The whole graph in view (what a user gets from the '.' key / fit-view button)."""
    page.evaluate("() => app.extensionManager.command.execute('Comfy.Canvas.FitView')")
    time.sleep(0.5)


def press_run(page) -> None:
    close_dialogs(page)
    page.locator('[data-testid="queue-button"]').get_by_role("button", name="Run", exact=True).click()


def run_and_read_error(page) -> str:
    """Press Run; the text of the dialog(s) the frontend shows for a rejected prompt."""
    press_run(page)
    page.wait_for_function("() => document.querySelectorAll('.p-dialog').length > 0")
    time.sleep(0.5)
    return "\n".join(dialog_texts(page))


def canvas_jpeg(page, width: int = 512, quality: int = 70) -> bytes:
    """A small JPEG of the graph canvas (the template card's thumbnail)."""
    from PIL import Image

    close_dialogs(page)
    fit_view(page)
    png = page.locator("#graph-canvas").screenshot()
    im = Image.open(io.BytesIO(png)).convert("RGB")
    im.thumbnail((width, width))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality, optimize=True)
    return buf.getvalue()


def render_thumbnails(base: Path) -> None:
    """workflows/<Title>.jpg for every shipped workflow, rendered from the real frontend."""
    import host_workflows as W

    b = W.builder()
    server = ComfyServer(fresh_base(base), start_timeout=900)
    try:
        with browser_page(server.url, THUMBNAIL_VIEWPORT) as page:
            for g in W.graphs().values():
                open_template(page, g.title, len(g.nodes))
                b.thumbnail_path(g).write_bytes(canvas_jpeg(page))
                print(f"wrote {b.thumbnail_path(g).relative_to(REPO)}; page errors so far: {page.errors}", flush=True)
    finally:
        server.stop()


if __name__ == "__main__":
    if sys.argv[1:] != ["thumbnails"] or not COMFYUI_PATH or browser_problem():
        sys.exit(f"usage: COMFYUI_PATH=... python tests/host/frontend.py thumbnails ({browser_problem() or ''})")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        render_thumbnails(Path(tmp))
