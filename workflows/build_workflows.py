"""Writes the example workflows in both formats from one description, so the twins never drift apart.

    python workflows/build_workflows.py        # rewrites workflows/*.json

UI format (`<name>.json`): what the ComfyUI frontend saves and loads (nodes with id/type/pos/size/inputs/
outputs/widgets_values, a links array, version 0.4). API format (`<name>.api.json`): what the /prompt endpoint
and scripts take. Only core nodes and this pack's nodes are used; file names are the usual download names and
images are placeholders (example.png ...) to replace in LoadImage.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent

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
}
FRONTEND_ONLY = {"Note"}  # not executed: absent from the API format

MODEL_FILE = "flux1-kontext-dev.safetensors"
T5_FILE = "t5xxl_fp16.safetensors"
CLIP_FILE = "clip_l.safetensors"
VAE_FILE = "ae.safetensors"
GGUF_FILE = "flux1-kontext-dev-Q4_K_M.gguf"
T5_FP8_FILE = "t5xxl_fp8_e4m3fn_scaled.safetensors"

FILES_NOTE = (
    "Files to place (paths inside your ComfyUI folder):\n"
    f"- models/diffusion_models/{MODEL_FILE}: the FLUX.1 Kontext [dev] transformer (an fp8 version works too; "
    "GGUF quantizations also go in this folder)\n"
    f"- models/text_encoders/{T5_FILE} (or t5xxl_fp8_e4m3fn_scaled.safetensors) and "
    f"models/text_encoders/{CLIP_FILE}\n"
    f"- models/vae/{VAE_FILE}: the FLUX autoencoder\n"
    "- your image(s) in input/ (or upload them in the LoadImage node)\n\n"
    "Tip: save a prompt once with 'Save Kontext Conditioning' and swap DualCLIPLoader + CLIPTextEncode for "
    "'Load Kontext Conditioning' (models/kontext_conditioning): T5 never has to be loaded again."
)


class Graph:
    def __init__(self, name: str):
        self.name = name
        self.nodes: list[dict] = []
        self.links: list[list] = []

    def add(self, type_: str, pos, widgets: dict | None = None, size=None, title: str | None = None) -> int:
        if type_ not in SPECS:
            raise KeyError(f"no spec for node type {type_}")
        nid = len(self.nodes) + 1
        self.nodes.append(dict(id=nid, type=type_, pos=list(pos), size=list(size or (320, 130)),
                               widgets=dict(widgets or {}), title=title, inputs={}))
        return nid

    def link(self, src: int, src_slot: int, dst: int, dst_input: str) -> None:
        node = self.nodes[dst - 1]
        if dst_input in node["inputs"]:
            raise ValueError(f"{self.name}: input {dst_input} of node {dst} is linked twice")
        node["inputs"][dst_input] = (src, src_slot)

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
        nodes = []
        for node in self.nodes:
            inputs, outputs, widgets = SPECS[node["type"]]
            entry = {
                "id": node["id"], "type": node["type"], "pos": node["pos"], "size": node["size"], "flags": {},
                "order": order[node["id"]], "mode": 0,
                "inputs": [{"name": n, "type": t, "link": in_links.get((node["id"], n))} for n, t in inputs],
                "outputs": [{"name": n, "type": t, "links": out_links.get((node["id"], i), []),
                             **({"slot_index": i} if out_links.get((node["id"], i)) else {})}
                            for i, (n, t) in enumerate(outputs)],
                "properties": {} if node["type"] in FRONTEND_ONLY else {"Node name for S&R": node["type"]},
                "widgets_values": [self._widget_value(node, w) for w in widgets],
            }
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
                                    "_meta": {"title": node["title"] or node["type"]}}
        return out


# ------------------------------------------------------------------------------------------------ workflows

def _common(g: Graph, note_extra: str = ""):
    g.add("Note", (40, 40), {"text": FILES_NOTE + note_extra}, size=(420, 330), title="Files and how to use")
    model = g.add("KontextNativeModelLoader", (40, 420), {"model_name": MODEL_FILE, "weight_dtype": "default"},
                  size=(340, 90))
    clip = g.add("DualCLIPLoader", (40, 560), {"clip_name1": CLIP_FILE, "clip_name2": T5_FILE, "type": "flux",
                                              "device": "default"}, size=(340, 130))
    vae = g.add("VAELoader", (40, 740), {"vae_name": VAE_FILE}, size=(340, 60))
    return model, clip, vae


def _sampler_widgets(seed: int, steps: int = 28) -> dict:
    return {"seed": seed, CONTROL: "fixed", "steps": steps, "guidance": 2.5, "true_cfg": 1.0, "solver": "euler",
            "scheduler": "kontext", "denoise": 1.0, "width": 0, "height": 0, "batch_size": 1}


def _single(name: str, prompt: str, prefix: str, note: str) -> Graph:
    g = Graph(name)
    model, clip, vae = _common(g, note)
    text = g.add("CLIPTextEncode", (420, 560), {"text": prompt}, size=(400, 160), title="Edit instruction")
    img = g.add("LoadImage", (500, 40), {"image": "example.png"}, size=(320, 330))
    bucket = g.add("KontextNativeImageBucket", (860, 40), {"mode": "stretch"}, size=(280, 110))
    ref = g.add("KontextNativeReferenceEncoder", (860, 420), {"layout": "offset"}, size=(300, 140))
    sampler = g.add("KontextNativeSampler", (1200, 420), _sampler_widgets(0), size=(320, 340))
    dec = g.add("VAEDecode", (1560, 420), size=(200, 50))
    save = g.add("SaveImage", (1560, 520), {"filename_prefix": prefix}, size=(400, 420))
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
    return _single("single_edit", "Change the car's color to deep red. Keep the background, lighting and "
                                  "composition exactly the same.", "kontext/single_edit",
                   "\n\nOne edit: LoadImage -> Kontext Image Bucket -> Kontext Reference -> Kontext Sampler.")


def text_replacement() -> Graph:
    return _single("text_replacement", 'Replace the text "OPEN" with "CLOSED" on the sign. Keep the same font, '
                                       "color and position; change nothing else.", "kontext/text_replacement",
                   '\n\nText edits work best with the exact old text in quotes: Replace "old" with "new".')


def _latent_chain(g: Graph, model: int, clip: int, vae: int, prompts: list[str], save_prefix: str,
                  steps: int | None = None) -> None:
    """Image -> bucket, then one reference + sampler per prompt; each turn's LATENT is the next reference's
    latent (no decode/encode between turns); earlier turns are previewed, the last one saved."""
    img = g.add("LoadImage", (500, 40), {"image": "example.png"}, size=(320, 330))
    bucket = g.add("KontextNativeImageBucket", (860, 40), {"mode": "stretch"}, size=(280, 110))
    g.link(img, 0, bucket, "image")
    g.link(img, 1, bucket, "mask")
    prev = None
    for turn, prompt in enumerate(prompts):
        x = 420 + turn * 520
        text = g.add("CLIPTextEncode", (x, 900), {"text": prompt}, size=(400, 140), title=f"Turn {turn + 1}")
        g.link(clip, 0, text, "clip")
        ref = g.add("KontextNativeReferenceEncoder", (x, 420), {"layout": "offset"}, size=(300, 140),
                    title=f"Reference (turn {turn + 1})")
        g.link(text, 0, ref, "conditioning")
        if prev is None:
            g.link(vae, 0, ref, "vae")
            g.link(bucket, 0, ref, "image")
        else:
            g.link(prev, 0, ref, "latent")
        widgets = _sampler_widgets(turn) if steps is None else _sampler_widgets(turn, steps=steps)
        sampler = g.add("KontextNativeSampler", (x + 120, 580), widgets, size=(320, 340),
                        title=f"Kontext Sampler (turn {turn + 1})")
        g.link(model, 0, sampler, "model")
        g.link(ref, 0, sampler, "positive")
        dec = g.add("VAEDecode", (x + 120, 1100), size=(200, 50))
        g.link(sampler, 0, dec, "samples")
        g.link(vae, 0, dec, "vae")
        if turn < len(prompts) - 1:
            out = g.add("PreviewImage", (x + 120, 1180), size=(320, 320), title=f"Turn {turn + 1}")
        else:
            out = g.add("SaveImage", (x + 120, 1180), {"filename_prefix": save_prefix}, size=(400, 420))
        g.link(dec, 0, out, "images")
        prev = sampler


def edit_chain() -> Graph:
    g = Graph("edit_chain_3_turns")
    model, clip, vae = _common(g, "\n\nThree edits in a row without leaving latent space: each Kontext Sampler's "
                                  "LATENT is the next Kontext Reference's latent, so there is no decode/encode "
                                  "round trip (and no compounding artifacts) between turns. The previews only "
                                  "show each turn.")
    _latent_chain(g, model, clip, vae,
                  ["Make it a snowy winter evening. Keep the subject unchanged.",
                   "Add warm light glowing from the windows.",
                   "Turn the image into a watercolor painting, same composition."], "kontext/edit_chain")
    return g


def composition() -> Graph:
    g = Graph("two_reference_composition")
    model, clip, vae = _common(g, "\n\nTwo references: the scene comes first (it sets the output size), the "
                                  "character second; the 'offset' layout places them side by side as Kontext "
                                  "expects. Load your images as scene.png and character.png, or pick others.")
    text = g.add("CLIPTextEncode", (420, 560), {"text": "Place the character from the second image into the "
                                                        "scene, standing on the path, matching the scene's "
                                                        "lighting and perspective."},
                 size=(400, 160), title="Instruction")
    g.link(clip, 0, text, "clip")
    scene = g.add("LoadImage", (500, 40), {"image": "scene.png"}, size=(320, 330), title="Scene")
    char = g.add("LoadImage", (860, 40), {"image": "character.png"}, size=(320, 330), title="Character")
    b1 = g.add("KontextNativeImageBucket", (1220, 40), {"mode": "stretch"}, size=(280, 110))
    b2 = g.add("KontextNativeImageBucket", (1220, 200), {"mode": "stretch"}, size=(280, 110))
    g.link(scene, 0, b1, "image")
    g.link(scene, 1, b1, "mask")
    g.link(char, 0, b2, "image")
    g.link(char, 1, b2, "mask")
    r1 = g.add("KontextNativeReferenceEncoder", (860, 420), {"layout": "offset"}, size=(300, 140),
               title="Reference 1 (scene)")
    r2 = g.add("KontextNativeReferenceEncoder", (860, 620), {"layout": "offset"}, size=(300, 140),
               title="Reference 2 (character)")
    g.link(text, 0, r1, "conditioning")
    g.link(vae, 0, r1, "vae")
    g.link(b1, 0, r1, "image")
    g.link(r1, 0, r2, "conditioning")
    g.link(vae, 0, r2, "vae")
    g.link(b2, 0, r2, "image")
    sampler = g.add("KontextNativeSampler", (1220, 420), _sampler_widgets(0), size=(320, 340))
    g.link(model, 0, sampler, "model")
    g.link(r2, 0, sampler, "positive")
    dec = g.add("VAEDecode", (1580, 420), size=(200, 50))
    save = g.add("SaveImage", (1580, 520), {"filename_prefix": "kontext/composition"}, size=(400, 420))
    g.link(sampler, 0, dec, "samples")
    g.link(vae, 0, dec, "vae")
    g.link(dec, 0, save, "images")
    return g


def official_basic() -> Graph:
    g = Graph("kontext_official_basic")
    model, clip, vae = _common(g, "\n\nComfyUI's basic Kontext graph (core nodes, KSampler euler/simple, cfg 1, "
                                  "FluxGuidance 2.5) with only the model loader swapped for the native one.")
    text = g.add("CLIPTextEncode", (420, 560), {"text": "Change the car's color to deep red. Keep everything "
                                                        "else the same."}, size=(400, 160))
    g.link(clip, 0, text, "clip")
    img = g.add("LoadImage", (500, 40), {"image": "example.png"}, size=(320, 330))
    scale = g.add("FluxKontextImageScale", (860, 40), size=(270, 30))
    enc = g.add("VAEEncode", (860, 140), size=(200, 50))
    refl = g.add("ReferenceLatent", (860, 420), size=(200, 50))
    guid = g.add("FluxGuidance", (860, 520), {"guidance": 2.5}, size=(280, 60))
    zero = g.add("ConditioningZeroOut", (860, 640), size=(240, 30))
    ks = g.add("KSampler", (1180, 420), {"seed": 0, CONTROL: "fixed", "steps": 20, "cfg": 1.0,
                                         "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0},
               size=(320, 270))
    dec = g.add("VAEDecode", (1540, 420), size=(200, 50))
    save = g.add("SaveImage", (1540, 520), {"filename_prefix": "kontext/official_basic"}, size=(400, 420))
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


GGUF_NOTE = (
    "Files to place (paths inside your ComfyUI folder):\n"
    f"- models/diffusion_models/{GGUF_FILE}: a GGUF quantization of the FLUX.1 Kontext [dev] transformer "
    "(flux1-kontext-dev-Q8_0 / Q6_K / Q5_K_M / Q4_K_M / Q3_K_M .gguf; models/unet works too). Q8_0 is close to "
    "the bf16 original; Q5_K_M or Q4_K_M for 8-12 GB GPUs; Q3_K / Q2_K only when nothing else fits\n"
    f"- models/text_encoders/{T5_FP8_FILE} (or t5xxl_fp16.safetensors) and models/text_encoders/{CLIP_FILE}\n"
    f"- models/vae/{VAE_FILE}: the FLUX autoencoder\n"
    "- your image in input/ (or upload it in the LoadImage node)\n\n"
    "Low VRAM: the transformer stays quantized in memory and each layer is dequantized when it runs; ComfyUI "
    "loads what fits and streams the rest. Two edits in a row stay in latent space: turn 1's LATENT is turn 2's "
    "reference, nothing is decoded and re-encoded in between (turn 1 is only previewed). "
    "LoraLoaderModelOnly can go between the loader and the samplers; the LoRA is applied at use."
)


def low_vram_gguf_chain() -> Graph:
    g = Graph("low_vram_gguf_chain")
    g.add("Note", (40, 40), {"text": GGUF_NOTE}, size=(420, 380), title="Files and how to use")
    model = g.add("KontextNativeGGUFLoader", (40, 460), {"gguf_name": GGUF_FILE, "compute_dtype": "default"},
                  size=(340, 90))
    clip = g.add("DualCLIPLoader", (40, 600), {"clip_name1": CLIP_FILE, "clip_name2": T5_FP8_FILE, "type": "flux",
                                              "device": "default"}, size=(340, 130))
    vae = g.add("VAELoader", (40, 780), {"vae_name": VAE_FILE}, size=(340, 60))
    _latent_chain(g, model, clip, vae,
                  ["Change the season to autumn: orange and red leaves. Keep everything else the same.",
                   "Add a small red bicycle leaning against the wall, matching the lighting."],
                  "kontext/gguf_chain", steps=20)
    return g


WORKFLOWS = [single_edit, edit_chain, composition, text_replacement, official_basic, low_vram_gguf_chain]


def main() -> None:
    for build in WORKFLOWS:
        g = build()
        (HERE / f"{g.name}.json").write_text(json.dumps(g.ui(), indent=2) + "\n")
        (HERE / f"{g.name}.api.json").write_text(json.dumps(g.api(), indent=2) + "\n")
        print(f"wrote workflows/{g.name}.json and .api.json")


if __name__ == "__main__":
    main()
