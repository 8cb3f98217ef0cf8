"""Writes the example workflows in both formats from one description, so the twins never drift apart.

    python workflows/build_workflows.py        # rewrites workflows/<Title>.json and workflows/api/<name>.api.json

UI format (`workflows/<Title>.json`): what the ComfyUI frontend saves and loads (nodes with id/type/pos/size/
inputs/outputs/widgets_values, a links array, version 0.4). ComfyUI lists the top level of `workflows/` as the
pack's templates and the template dialog shows the file name as the card's title (and, with '-'/'_' as spaces, as
its description), so UI files carry readable names; `<Title>.jpg` beside each is the card's thumbnail
(tests/host/frontend.py renders them). API format (`workflows/api/<name>.api.json`, not listed as templates):
what the /prompt endpoint and scripts take; `<name>` is the workflow's short key used by scripts and tests.

Layout: each node goes into a column; columns are placed left to right and nodes stacked top to bottom using
the sizes the frontend really draws (MIN_SIZES, measured in ComfyUI's frontend 1.27.10 with `computeSize()`;
the title bar of TITLE_H px is drawn above `pos`), so no two node boxes overlap. tests/host/test_frontend.py
checks that in a real browser.

Only core nodes and this pack's nodes are used; file names and download sources are those of ComfyUI's official
Kontext template (nodes/model_sources.py); images default to example.png, which every ComfyUI install has in
input/.

To add a workflow: write a function returning a Graph (see single_edit) and append it to WORKFLOWS.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # kontext_core (torch-only; the nodes package needs ComfyUI)
API_DIR = HERE / "api"


def _load_sources():
    spec = importlib.util.spec_from_file_location("kontext_model_sources", HERE.parent / "nodes" / "model_sources.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


SOURCES = _load_sources()

CONTROL = "$control_after_generate"  # the extra widget the frontend adds after a seed
UPLOAD = "$upload"  # LoadImage's upload button widget

# node type -> (socket inputs [(name, type)], outputs [(name, type)], widgets in frontend order)
SPECS: dict[str, tuple[list, list, list]] = {
    "KontextNativeModelLoader": ([], [("MODEL", "MODEL")], ["model_name", "weight_dtype"]),
    "KontextNativeGGUFLoader": ([], [("MODEL", "MODEL")], ["gguf_name", "compute_dtype"]),
    "KontextNativeImageBucket": ([("image", "IMAGE"), ("mask", "MASK")],
                                 [("IMAGE", "IMAGE"), ("width", "INT"), ("height", "INT")], ["mode"]),
    "KontextNativeReferenceEncoder": ([("conditioning", "CONDITIONING"), ("vae", "VAE"), ("image", "IMAGE"),
                                       ("latent", "LATENT")],
                                      [("CONDITIONING", "CONDITIONING"), ("LATENT", "LATENT")], ["layout"]),
    "KontextNativeSampler": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                              ("latent", "LATENT")], [("LATENT", "LATENT")],
                             ["seed", CONTROL, "steps", "guidance", "true_cfg", "solver", "scheduler", "denoise",
                              "width", "height", "batch_size"]),
    "KontextNativeKeepUnchanged": ([("samples", "LATENT"), ("vae", "VAE"), ("image", "IMAGE"), ("previous", "LATENT")],
                                   [("LATENT", "LATENT"), ("IMAGE", "IMAGE"), ("edited", "MASK")],
                                   ["estimator", "threshold", "feather", "colour_match"]),
    "KontextNativeLoadConditioning": ([], [("CONDITIONING", "CONDITIONING")], ["conditioning_file"]),
    "KontextNativeSaveConditioning": ([("conditioning", "CONDITIONING")], [], ["filename_prefix"]),
    "DualCLIPLoader": ([], [("CLIP", "CLIP")], ["clip_name1", "clip_name2", "type", "device"]),
    "CLIPTextEncode": ([("clip", "CLIP")], [("CONDITIONING", "CONDITIONING")], ["text"]),
    "VAELoader": ([], [("VAE", "VAE")], ["vae_name"]),
    "LoadImage": ([], [("IMAGE", "IMAGE"), ("MASK", "MASK")], ["image", UPLOAD]),
    "FluxKontextImageScale": ([("image", "IMAGE")], [("IMAGE", "IMAGE")], []),
    "VAEEncode": ([("pixels", "IMAGE"), ("vae", "VAE")], [("LATENT", "LATENT")], []),
    "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], [("IMAGE", "IMAGE")], []),
    "ReferenceLatent": ([("conditioning", "CONDITIONING"), ("latent", "LATENT")],
                        [("CONDITIONING", "CONDITIONING")], []),
    "FluxGuidance": ([("conditioning", "CONDITIONING")], [("CONDITIONING", "CONDITIONING")], ["guidance"]),
    "ConditioningZeroOut": ([("conditioning", "CONDITIONING")], [("CONDITIONING", "CONDITIONING")], []),
    "KSampler": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                  ("latent_image", "LATENT")], [("LATENT", "LATENT")],
                 ["seed", CONTROL, "steps", "cfg", "sampler_name", "scheduler", "denoise"]),
    "SaveImage": ([("images", "IMAGE")], [], ["filename_prefix"]),
    "PreviewImage": ([("images", "IMAGE")], [], []),
    "Note": ([], [], ["text"]),
    "KontextNativeTinyLoader": ([], [("MODEL", "MODEL"), ("VAE", "VAE"),
                                     ("TEXT_ENCODER", "KONTEXT_TINY_TEXT_ENCODER")], []),
    "KontextNativeTinyPrompt": ([("text_encoder", "KONTEXT_TINY_TEXT_ENCODER")], [("CONDITIONING", "CONDITIONING")],
                                ["text"]),
    "KontextNativeTinyScene": ([], [("IMAGE", "IMAGE"), ("instruction", "STRING")], ["seed", "edit_type"]),
}
FRONTEND_ONLY = {"Note"}  # not executed: absent from the API format

# What the frontend shows as a node's title (and what its "Export (API)" writes as _meta.title).
DISPLAY_NAMES = {
    "KontextNativeModelLoader": "Load Kontext Model (native)", "KontextNativeGGUFLoader": "Load Kontext GGUF (native)",
    "KontextNativeImageBucket": "Kontext Image Bucket", "KontextNativeReferenceEncoder": "Kontext Reference",
    "KontextNativeSampler": "Kontext Sampler", "KontextNativeKeepUnchanged": "Kontext Keep Unchanged",
    "KontextNativeLoadConditioning": "Load Kontext Conditioning",
    "KontextNativeSaveConditioning": "Save Kontext Conditioning", "DualCLIPLoader": "DualCLIPLoader",
    "CLIPTextEncode": "CLIP Text Encode (Prompt)", "VAELoader": "Load VAE", "LoadImage": "Load Image",
    "FluxKontextImageScale": "FluxKontextImageScale", "VAEEncode": "VAE Encode", "VAEDecode": "VAE Decode",
    "ReferenceLatent": "ReferenceLatent", "FluxGuidance": "FluxGuidance", "ConditioningZeroOut": "ConditioningZeroOut",
    "KSampler": "KSampler", "SaveImage": "Save Image", "PreviewImage": "Preview Image", "Note": "Note",
    "KontextNativeTinyLoader": "Load Kontext-Tiny", "KontextNativeTinyPrompt": "Kontext-Tiny Prompt",
    "KontextNativeTinyScene": "Kontext-Tiny Scene",
}

TITLE_H = 30  # LiteGraph.NODE_TITLE_HEIGHT: the title bar sits above a node's pos
GAP_X, GAP_Y = 50, 30  # space between node boxes (title bar included)
ORIGIN = (40, 40)  # top-left corner of the first node's title bar
# Smallest size (w, h below the title bar) the frontend gives each node with the widget values used here:
# node.computeSize() in frontend 1.27.10; a smaller size in the file is enlarged on load (that is what made nodes
# overlap). LoadImage's height includes the preview of example.png. tests/host/test_frontend.py re-measures.
MIN_SIZES = {
    "Note": (210, 88), "KontextNativeModelLoader": (215, 82), "KontextNativeGGUFLoader": (217, 82),
    "DualCLIPLoader": (210, 130), "VAELoader": (210, 58), "LoadImage": (214, 326),
    "KontextNativeImageBucket": (210, 98), "CLIPTextEncode": (210, 88), "KontextNativeReferenceEncoder": (210, 118),
    "KontextNativeSampler": (210, 358), "KontextNativeKeepUnchanged": (210, 190), "VAEDecode": (140, 46), "VAEEncode": (140, 46), "PreviewImage": (140, 26),
    "SaveImage": (210, 58), "FluxKontextImageScale": (188, 26), "ReferenceLatent": (198, 46),
    "FluxGuidance": (210, 58), "ConditioningZeroOut": (198, 26), "KSampler": (210, 262),
    "KontextNativeTinyLoader": (153, 66), "KontextNativeTinyPrompt": (210, 88), "KontextNativeTinyScene": (210, 126),
}
# The size used when a workflow asks for none: roomier than the minimum where text or images are shown.
DEFAULT_SIZES = {
    "Note": (440, 400), "KontextNativeModelLoader": (340, 82), "KontextNativeGGUFLoader": (340, 82),
    "DualCLIPLoader": (340, 130), "VAELoader": (340, 58), "LoadImage": (320, 340), "CLIPTextEncode": (400, 160),
    "KontextNativeImageBucket": (280, 98), "KontextNativeReferenceEncoder": (300, 118),
    "KontextNativeSampler": (320, 358), "KontextNativeKeepUnchanged": (320, 190), "VAEDecode": (200, 46), "VAEEncode": (200, 46), "PreviewImage": (320, 320),
    "SaveImage": (400, 420), "FluxKontextImageScale": (270, 26), "ReferenceLatent": (200, 46),
    "FluxGuidance": (280, 58), "ConditioningZeroOut": (240, 26), "KSampler": (320, 262),
    "KontextNativeTinyLoader": (300, 66), "KontextNativeTinyPrompt": (340, 120), "KontextNativeTinyScene": (300, 126),
}
# Loader widgets naming files to download: their values go into the node's properties.models.
FILE_WIDGETS = {"KontextNativeModelLoader": ["model_name"], "KontextNativeGGUFLoader": ["gguf_name"],
                "DualCLIPLoader": ["clip_name1", "clip_name2"], "VAELoader": ["vae_name"]}

MODEL_FILE = "flux1-dev-kontext_fp8_scaled.safetensors"  # the files of ComfyUI's official Kontext template
T5_FILE = "t5xxl_fp8_e4m3fn_scaled.safetensors"
CLIP_FILE = "clip_l.safetensors"
VAE_FILE = "ae.safetensors"
GGUF_FILE = "flux1-kontext-dev-Q4_K_M.gguf"
IMAGE = "example.png"  # in every ComfyUI install's input/ folder


def _file_line(name: str, alternatives: str = "") -> str:
    e = SOURCES.SOURCES[name]
    return f"- models/{e['directory']}/{name}: {e['what']}{alternatives}. From {e['page']}"


def files_note(model_line: str, images: str, extra: str) -> str:
    return ("Files to place (paths inside your ComfyUI folder; the Missing Models dialog can download the ones "
            "with a link in the loader):\n"
            f"{model_line}\n{_file_line(T5_FILE)}\n{_file_line(CLIP_FILE)}\n{_file_line(VAE_FILE)}\n"
            f"- {images}\n\n{extra}")


MODEL_LINE = _file_line(MODEL_FILE, "; BFL's bf16 flux1-kontext-dev.safetensors "
                                    f"({SOURCES.SOURCES['flux1-kontext-dev.safetensors']['page']}) or a GGUF work too")
ONE_IMAGE = f"your image: upload it in Load Image (it starts on {IMAGE}, which ComfyUI ships in input/)"
CONDITIONING_TIP = ("Tip: save a prompt once with 'Save Kontext Conditioning' and swap DualCLIPLoader + "
                    "CLIPTextEncode for 'Load Kontext Conditioning' (models/kontext_conditioning): T5 never has to "
                    "be loaded again.")


class Graph:
    """One workflow: `name` is its short key (API file name, tests), `title` the template card's title (the UI
    file name). Nodes are added to numbered columns; `ui()` places them (see the module docstring)."""

    def __init__(self, name: str, title: str):
        self.name = name
        self.title = title
        self.nodes: list[dict] = []
        self.links: list[list] = []

    def add(self, type_: str, col: int, widgets: dict | None = None, size=None, title: str | None = None) -> int:
        if type_ not in SPECS:
            raise KeyError(f"no spec for node type {type_}")
        w, h = size or DEFAULT_SIZES.get(type_, (320, 130))
        min_w, min_h = MIN_SIZES.get(type_, (0, 0))
        nid = len(self.nodes) + 1
        self.nodes.append(dict(id=nid, type=type_, col=col, size=[max(w, min_w), max(h, min_h)],
                               widgets=dict(widgets or {}), title=title, inputs={}))
        return nid

    def link(self, src: int, src_slot: int, dst: int, dst_input: str) -> None:
        node = self.nodes[dst - 1]
        if dst_input in node["inputs"]:
            raise ValueError(f"{self.name}: input {dst_input} of node {dst} is linked twice")
        node["inputs"][dst_input] = (src, src_slot)

    def positions(self) -> dict[int, list[int]]:
        cols = sorted({n["col"] for n in self.nodes})
        x, col_x = ORIGIN[0], {}
        for c in cols:
            col_x[c] = x
            x += max(n["size"][0] for n in self.nodes if n["col"] == c) + GAP_X
        cursor = {c: ORIGIN[1] for c in cols}
        pos = {}
        for n in self.nodes:
            pos[n["id"]] = [col_x[n["col"]], cursor[n["col"]] + TITLE_H]
            cursor[n["col"]] += TITLE_H + n["size"][1] + GAP_Y
        return pos

    # --- UI format ---------------------------------------------------------------------------------------
    def ui(self) -> dict:
        links = []
        out_links: dict[tuple[int, int], list[int]] = {}
        in_links: dict[tuple[int, str], int] = {}
        for node in self.nodes:
            inputs, _, _ = SPECS[node["type"]]
            for name, typ in inputs:
                if name in node["inputs"]:
                    src, slot = node["inputs"][name]
                    lid = len(links) + 1
                    src_type = SPECS[self.nodes[src - 1]["type"]][1][slot][1]
                    if src_type != typ:
                        raise TypeError(f"{self.name}: {src_type} output linked to {typ} input {name}")
                    links.append([lid, src, slot, node["id"], [n for n, _ in inputs].index(name), typ])
                    out_links.setdefault((src, slot), []).append(lid)
                    in_links[(node["id"], name)] = lid
        order = self._order()
        pos = self.positions()
        nodes = []
        for node in self.nodes:
            inputs, outputs, widgets = SPECS[node["type"]]
            entry = {
                "id": node["id"], "type": node["type"], "pos": pos[node["id"]], "size": node["size"], "flags": {},
                "order": order[node["id"]], "mode": 0,
                "inputs": [{"name": n, "type": t, "link": in_links.get((node["id"], n))} for n, t in inputs],
                "outputs": [{"name": n, "type": t, "links": out_links.get((node["id"], i), []),
                             **({"slot_index": i} if out_links.get((node["id"], i)) else {})}
                            for i, (n, t) in enumerate(outputs)],
                "properties": {} if node["type"] in FRONTEND_ONLY else {"Node name for S&R": node["type"]},
                "widgets_values": [self._widget_value(node, w) for w in widgets],
            }
            models = SOURCES.models_property(node["widgets"][w] for w in FILE_WIDGETS.get(node["type"], []))
            if models:
                entry["properties"]["models"] = models
            if node["title"]:
                entry["title"] = node["title"]
            if node["type"] == "Note":
                entry.update(color="#432", bgcolor="#653")
            nodes.append(entry)
        return {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"kontext-native/{self.name}")),
            "revision": 0,
            "last_node_id": len(self.nodes),
            "last_link_id": len(links),
            "nodes": nodes,
            "links": links,
            "groups": [],
            "config": {},
            "extra": {"ds": {"scale": 0.75, "offset": [40, 40]}},
            "version": 0.4,
        }

    def _widget_value(self, node, w):
        if w == CONTROL:
            return node["widgets"].get(CONTROL, "fixed")
        if w == UPLOAD:
            return "image"
        if w not in node["widgets"]:
            raise KeyError(f"{self.name}: node {node['id']} ({node['type']}) needs widget '{w}'")
        return node["widgets"][w]

    def _order(self) -> dict[int, int]:
        done: dict[int, int] = {}

        def visit(nid: int, stack=()):
            if nid in done:
                return
            if nid in stack:
                raise ValueError(f"{self.name}: cycle at node {nid}")
            for src, _ in self.nodes[nid - 1]["inputs"].values():
                visit(src, stack + (nid,))
            done[nid] = len(done)

        for n in self.nodes:
            visit(n["id"])
        return done

    # --- API format --------------------------------------------------------------------------------------
    def api(self) -> dict:
        out = {}
        for node in self.nodes:
            if node["type"] in FRONTEND_ONLY:
                continue
            inputs, _, widgets = SPECS[node["type"]]
            values = {w: node["widgets"][w] for w in widgets if w not in (CONTROL, UPLOAD)}
            for name, _ in inputs:
                if name in node["inputs"]:
                    src, slot = node["inputs"][name]
                    values[name] = [str(src), slot]
            out[str(node["id"])] = {"inputs": values, "class_type": node["type"],
                                    "_meta": {"title": node["title"] or DISPLAY_NAMES[node["type"]]}}
        return out


# ------------------------------------------------------------------------------------------------ workflows

def _common(g: Graph, note: str):
    """Column 0: the Note and the three loaders every Kontext graph needs."""
    g.add("Note", 0, {"text": note}, title="Files and how to use")
    model = g.add("KontextNativeModelLoader", 0, {"model_name": MODEL_FILE, "weight_dtype": "default"})
    clip = _text_encoders(g)
    vae = g.add("VAELoader", 0, {"vae_name": VAE_FILE})
    return model, clip, vae


def _text_encoders(g: Graph) -> int:
    return g.add("DualCLIPLoader", 0, {"clip_name1": CLIP_FILE, "clip_name2": T5_FILE, "type": "flux",
                                       "device": "default"})


def _sampler_widgets(seed: int, steps: int = 28) -> dict:
    return {"seed": seed, CONTROL: "fixed", "steps": steps, "guidance": 2.5, "true_cfg": 1.0, "solver": "euler",
            "scheduler": "kontext", "denoise": 1.0, "width": 0, "height": 0, "batch_size": 1}


def _single(name: str, title: str, prompt: str, prefix: str, note: str) -> Graph:
    g = Graph(name, title)
    model, clip, vae = _common(g, files_note(MODEL_LINE, ONE_IMAGE, note + "\n\n" + CONDITIONING_TIP))
    img = g.add("LoadImage", 1, {"image": IMAGE})
    text = g.add("CLIPTextEncode", 1, {"text": prompt}, title="Edit instruction")
    bucket = g.add("KontextNativeImageBucket", 2, {"mode": "stretch"})
    ref = g.add("KontextNativeReferenceEncoder", 2, {"layout": "offset"})
    sampler = g.add("KontextNativeSampler", 3, _sampler_widgets(0))
    dec = g.add("VAEDecode", 4)
    save = g.add("SaveImage", 4, {"filename_prefix": prefix})
    g.link(img, 0, bucket, "image")
    g.link(img, 1, bucket, "mask")
    g.link(text, 0, ref, "conditioning")
    g.link(clip, 0, text, "clip")
    g.link(vae, 0, ref, "vae")
    g.link(bucket, 0, ref, "image")
    g.link(model, 0, sampler, "model")
    g.link(ref, 0, sampler, "positive")
    g.link(sampler, 0, dec, "samples")
    g.link(vae, 0, dec, "vae")
    g.link(dec, 0, save, "images")
    return g


def single_edit() -> Graph:
    return _single("single_edit", "Single Edit", "Change the car's color to deep red. Keep the background, "
                   "lighting and composition exactly the same.", "kontext/single_edit",
                   "One edit: Load Image -> Kontext Image Bucket -> Kontext Reference -> Kontext Sampler.")


def text_replacement() -> Graph:
    return _single("text_replacement", "Text Replacement", 'Replace the text "OPEN" with "CLOSED" on the sign. '
                   "Keep the same font, color and position; change nothing else.", "kontext/text_replacement",
                   'Text edits work best with the exact old text in quotes: Replace "old" with "new".')


def _latent_chain(g: Graph, model: int, clip: int, vae: int, prompts: list[str], save_prefix: str,
                  steps: int | None = None) -> None:
    """Image -> bucket, then one column per turn (instruction, reference, sampler, Keep Unchanged, image). Turns
    chain in latent space (no decode/encode between turns) and anchored: each Kontext Keep Unchanged keeps the
    original wherever no turn has edited, its LATENT is the next reference's latent and the next Keep Unchanged's
    previous; earlier turns are previewed, the last one saved."""
    img = g.add("LoadImage", 1, {"image": IMAGE})
    bucket = g.add("KontextNativeImageBucket", 1, {"mode": "stretch"})
    g.link(img, 0, bucket, "image")
    g.link(img, 1, bucket, "mask")
    prev = None
    for turn, prompt in enumerate(prompts):
        col = 2 + turn
        text = g.add("CLIPTextEncode", col, {"text": prompt}, size=(400, 140), title=f"Turn {turn + 1}")
        g.link(clip, 0, text, "clip")
        ref = g.add("KontextNativeReferenceEncoder", col, {"layout": "offset"}, title=f"Reference (turn {turn + 1})")
        g.link(text, 0, ref, "conditioning")
        widgets = _sampler_widgets(turn) if steps is None else _sampler_widgets(turn, steps=steps)
        sampler = g.add("KontextNativeSampler", col, widgets, title=f"Kontext Sampler (turn {turn + 1})")
        keep = g.add("KontextNativeKeepUnchanged", col, KEEP_WIDGETS, title=f"Keep Unchanged (turn {turn + 1})")
        if prev is None:
            g.link(vae, 0, ref, "vae")
            g.link(bucket, 0, ref, "image")
            g.link(bucket, 0, keep, "image")
        else:
            g.link(prev, 0, ref, "latent")
            g.link(prev, 0, keep, "previous")
        g.link(model, 0, sampler, "model")
        g.link(ref, 0, sampler, "positive")
        g.link(sampler, 0, keep, "samples")
        g.link(vae, 0, keep, "vae")
        if turn < len(prompts) - 1:
            out = g.add("PreviewImage", col, size=(400, 320), title=f"Turn {turn + 1}")
        else:
            out = g.add("SaveImage", col, {"filename_prefix": save_prefix})
        g.link(keep, 1, out, "images")
        prev = keep


KEEP_WIDGETS = {"estimator": "pixels", "threshold": 0.0, "feather": 2, "colour_match": True}
CHAIN_TIP = ("Each turn's Kontext Keep Unchanged keeps the original picture wherever no turn has edited (latent "
             "for the next turn, pixels for the images), so long chains do not drift; replace it by VAE Decode "
             "to see the plain chain.")


def edit_chain() -> Graph:
    g = Graph("edit_chain_3_turns", "Edit Chain (3 turns in latent space)")
    note = files_note(MODEL_LINE, ONE_IMAGE,
                      "Three edits in a row without leaving latent space: each Kontext Sampler's LATENT is the next "
                      "Kontext Reference's latent, so there is no decode/encode round trip (and no compounding "
                      "artifacts) between turns. The previews only show each turn.\n\n" + CHAIN_TIP)
    model, clip, vae = _common(g, note)
    _latent_chain(g, model, clip, vae,
                  ["Make it a snowy winter evening. Keep the subject unchanged.",
                   "Add warm light glowing from the windows.",
                   "Turn the image into a watercolor painting, same composition."], "kontext/edit_chain")
    return g


def composition() -> Graph:
    g = Graph("two_reference_composition", "Two-Reference Composition")
    note = files_note(MODEL_LINE, f"two images: load your scene in 'Scene' and your character in 'Character' (both "
                                  f"start on {IMAGE}, which ComfyUI ships in input/, so the graph runs as it is)",
                      "Two references: the scene comes first (it sets the output size), the character second; the "
                      "'offset' layout places them side by side as Kontext expects.")
    model, clip, vae = _common(g, note)
    scene = g.add("LoadImage", 1, {"image": IMAGE}, title="Scene")
    char = g.add("LoadImage", 1, {"image": IMAGE}, title="Character")
    text = g.add("CLIPTextEncode", 2, {"text": "Place the character from the second image into the scene, "
                                               "standing on the path, matching the scene's lighting and "
                                               "perspective."}, title="Instruction")
    g.link(clip, 0, text, "clip")
    b1 = g.add("KontextNativeImageBucket", 2, {"mode": "stretch"}, title="Bucket (scene)")
    b2 = g.add("KontextNativeImageBucket", 2, {"mode": "stretch"}, title="Bucket (character)")
    g.link(scene, 0, b1, "image")
    g.link(scene, 1, b1, "mask")
    g.link(char, 0, b2, "image")
    g.link(char, 1, b2, "mask")
    r1 = g.add("KontextNativeReferenceEncoder", 3, {"layout": "offset"}, title="Reference 1 (scene)")
    r2 = g.add("KontextNativeReferenceEncoder", 3, {"layout": "offset"}, title="Reference 2 (character)")
    g.link(text, 0, r1, "conditioning")
    g.link(vae, 0, r1, "vae")
    g.link(b1, 0, r1, "image")
    g.link(r1, 0, r2, "conditioning")
    g.link(vae, 0, r2, "vae")
    g.link(b2, 0, r2, "image")
    sampler = g.add("KontextNativeSampler", 4, _sampler_widgets(0))
    g.link(model, 0, sampler, "model")
    g.link(r2, 0, sampler, "positive")
    dec = g.add("VAEDecode", 5)
    save = g.add("SaveImage", 5, {"filename_prefix": "kontext/composition"})
    g.link(sampler, 0, dec, "samples")
    g.link(vae, 0, dec, "vae")
    g.link(dec, 0, save, "images")
    return g


def official_basic() -> Graph:
    g = Graph("kontext_official_basic", "Official Kontext Graph with Native Loader")
    note = files_note(MODEL_LINE, ONE_IMAGE,
                      "ComfyUI's basic Kontext graph (core nodes, KSampler euler/simple, cfg 1, FluxGuidance 2.5) "
                      "with only the model loader swapped for the native one.")
    model, clip, vae = _common(g, note)
    img = g.add("LoadImage", 1, {"image": IMAGE})
    text = g.add("CLIPTextEncode", 1, {"text": "Change the car's color to deep red. Keep everything else the same."})
    g.link(clip, 0, text, "clip")
    scale = g.add("FluxKontextImageScale", 2)
    enc = g.add("VAEEncode", 2)
    refl = g.add("ReferenceLatent", 2)
    guid = g.add("FluxGuidance", 2, {"guidance": 2.5})
    zero = g.add("ConditioningZeroOut", 2)
    ks = g.add("KSampler", 3, {"seed": 0, CONTROL: "fixed", "steps": 20, "cfg": 1.0, "sampler_name": "euler",
                               "scheduler": "simple", "denoise": 1.0})
    dec = g.add("VAEDecode", 4)
    save = g.add("SaveImage", 4, {"filename_prefix": "kontext/official_basic"})
    g.link(img, 0, scale, "image")
    g.link(scale, 0, enc, "pixels")
    g.link(vae, 0, enc, "vae")
    g.link(text, 0, refl, "conditioning")
    g.link(enc, 0, refl, "latent")
    g.link(refl, 0, guid, "conditioning")
    g.link(text, 0, zero, "conditioning")
    g.link(model, 0, ks, "model")
    g.link(guid, 0, ks, "positive")
    g.link(zero, 0, ks, "negative")
    g.link(enc, 0, ks, "latent_image")
    g.link(ks, 0, dec, "samples")
    g.link(vae, 0, dec, "vae")
    g.link(dec, 0, save, "images")
    return g


GGUF_NOTE_EXTRA = (
    "Q8_0 is close to the bf16 original; Q5_K_M or Q4_K_M for 8-12 GB GPUs; Q3_K / Q2_K only when nothing else "
    "fits. Low VRAM: the transformer stays quantized in memory and each layer is dequantized when it runs; "
    "ComfyUI loads what fits and streams the rest. Two edits in a row stay in latent space: turn 1's LATENT is "
    "turn 2's reference, nothing is decoded and re-encoded in between (turn 1 is only previewed), and "
    "Kontext Keep Unchanged keeps the original wherever neither turn edited. LoraLoaderModelOnly can go between the loader and the samplers; the LoRA is applied at use.")


def low_vram_gguf_chain() -> Graph:
    g = Graph("low_vram_gguf_chain", "Low-VRAM GGUF Chain")
    gguf_line = _file_line(GGUF_FILE, "; models/unet works too")
    g.add("Note", 0, {"text": files_note(gguf_line, ONE_IMAGE, GGUF_NOTE_EXTRA)}, title="Files and how to use")
    model = g.add("KontextNativeGGUFLoader", 0, {"gguf_name": GGUF_FILE, "compute_dtype": "default"})
    clip = _text_encoders(g)
    vae = g.add("VAELoader", 0, {"vae_name": VAE_FILE})
    _latent_chain(g, model, clip, vae,
                  ["Change the season to autumn: orange and red leaves. Keep everything else the same.",
                   "Add a small red bicycle leaning against the wall, matching the lighting."],
                  "kontext/gguf_chain", steps=20)
    return g


TINY_NOTE = ("Kontext-Tiny: check the pack works, on CPU, in seconds — nothing to download.\n\n"
             "Kontext-Tiny is a 16 MB Kontext editor bundled with the pack: the same engine, nodes and sampler as "
             "FLUX.1 Kontext dev, trained to edit 64x64 pictures of coloured shapes, a sign with letters and a "
             "character. Kontext-Tiny Scene draws such a picture (change its seed for another one) and suggests an "
             "instruction; type your own in Kontext-Tiny Prompt, in its words: recolour ('make the triangle "
             "blue'), remove, add ('add a red star at the top left'), move ('move the circle left'), bigger / "
             "smaller, background ('make the background teal'), sign text ('write HE on the sign'), 'invert the "
             "colours' / 'make it black and white', 'give the character a green hat'. It only knows this world: "
             "a photo will not edit well. Its measured success rates are in the pack's README.")


def kontext_tiny() -> Graph:
    from kontext_core.tiny import DEFAULT_STEPS
    from kontext_core.tiny.edits import DEFAULT_SCENE, scene_triple

    g = Graph("kontext_tiny", "Kontext-Tiny (CPU, no download)")
    g.add("Note", 0, {"text": TINY_NOTE}, title="Kontext-Tiny: how to use")
    loader = g.add("KontextNativeTinyLoader", 0)
    scene = g.add("KontextNativeTinyScene", 1, {"seed": DEFAULT_SCENE[0], "edit_type": DEFAULT_SCENE[1]})
    shown = g.add("PreviewImage", 1, size=(200, 240), title="Picture to edit")
    prompt = g.add("KontextNativeTinyPrompt", 1, {"text": scene_triple(*DEFAULT_SCENE).instruction}, title="Edit instruction")
    ref = g.add("KontextNativeReferenceEncoder", 2, {"layout": "offset"})
    widgets = _sampler_widgets(0, DEFAULT_STEPS)
    sampler = g.add("KontextNativeSampler", 2, widgets)
    dec = g.add("VAEDecode", 3)
    save = g.add("SaveImage", 3, {"filename_prefix": "kontext/tiny"}, size=(260, 300))
    g.link(scene, 0, shown, "images")
    g.link(loader, 2, prompt, "text_encoder")
    g.link(prompt, 0, ref, "conditioning")
    g.link(loader, 1, ref, "vae")
    g.link(scene, 0, ref, "image")
    g.link(loader, 0, sampler, "model")
    g.link(ref, 0, sampler, "positive")
    g.link(sampler, 0, dec, "samples")
    g.link(loader, 1, dec, "vae")
    g.link(dec, 0, save, "images")
    return g


WORKFLOWS = [kontext_tiny, single_edit, edit_chain, composition, text_replacement, official_basic,
             low_vram_gguf_chain]


def ui_path(g: Graph) -> Path:
    return HERE / f"{g.title}.json"


def api_path(g: Graph) -> Path:
    return API_DIR / f"{g.name}.api.json"


def thumbnail_path(g: Graph) -> Path:
    return HERE / f"{g.title}.jpg"


def main() -> None:
    API_DIR.mkdir(exist_ok=True)
    for build in WORKFLOWS:
        g = build()
        ui_path(g).write_text(json.dumps(g.ui(), indent=2) + "\n")
        api_path(g).write_text(json.dumps(g.api(), indent=2) + "\n")
        print(f"wrote workflows/{ui_path(g).name} and workflows/api/{api_path(g).name}")


if __name__ == "__main__":
    main()
