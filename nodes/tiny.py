"""Kontext-Tiny in ComfyUI: check that the pack works on CPU in seconds, before downloading 24 GB.

    Load Kontext-Tiny        MODEL (the engine's Flux, same wrapper as the real loader) + VAE (core
                             VAEEncode/VAEDecode accept it) + its text encoder
    Kontext-Tiny Prompt      text -> CONDITIONING (prompt embeddings + pooled vector, as CLIPTextEncode gives)
    Kontext-Tiny Scene       a 64x64 picture of the kind Kontext-Tiny was trained on, with a matching instruction
"""

from __future__ import annotations

import numpy as np
import torch
from comfy_api.latest import io

from kontext_core import tiny as kt
from kontext_core.tiny.edits import DEFAULT_SCENE, EDIT_TYPES, scene_triple
from kontext_core.tiny.scene import render

from . import comfy_model

CATEGORY = "KontextNative/Kontext-Tiny"
TinyTextEncoder = io.Custom("KONTEXT_TINY_TEXT_ENCODER")
DEFAULT_SCENE_SEED, DEFAULT_SCENE_EDIT = DEFAULT_SCENE


class TinyLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KontextNativeTinyLoader",
            display_name="Load Kontext-Tiny",
            category=CATEGORY,
            description="Loads Kontext-Tiny, the small trained Kontext editor bundled with the pack (about "
                        "16 MB, edits 64x64 pictures of coloured shapes, signs and a character). It runs through "
                        "the same engine and nodes as FLUX.1 Kontext dev, on CPU in seconds.",
            inputs=[],
            outputs=[io.Model.Output(tooltip="Kontext-Tiny's transformer (the engine's FLUX DiT at a small size)."),
                     io.Vae.Output(tooltip="Kontext-Tiny's autoencoder, for core VAE Encode / VAE Decode."),
                     TinyTextEncoder.Output(display_name="TEXT_ENCODER",
                                            tooltip="Kontext-Tiny's text encoder, for Kontext-Tiny Prompt.")],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        paths = kt.weight_paths()
        ae, text_encoder = kt.load_ae_and_text_encoder(paths)
        model = comfy_model.load_transformer_model(str(paths["transformer"]))
        return io.NodeOutput(model, comfy_model.engine_vae(ae), text_encoder)


class TinyPrompt(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KontextNativeTinyPrompt",
            display_name="Kontext-Tiny Prompt",
            category=CATEGORY,
            description="Encodes an edit instruction with Kontext-Tiny's text encoder into a CONDITIONING "
                        "(prompt embeddings + pooled vector, the form core's CLIP Text Encode gives for FLUX).",
            inputs=[
                TinyTextEncoder.Input("text_encoder", tooltip="From Load Kontext-Tiny."),
                io.String.Input("text", multiline=True, default=scene_triple(DEFAULT_SCENE_SEED,
                                                                             DEFAULT_SCENE_EDIT).instruction,
                                tooltip="The edit, in Kontext-Tiny's words: 'make the triangle blue', 'remove the "
                                        "star', 'add a red circle at the top left', 'move the square left', "
                                        "'make the background teal', 'write HE on the sign', 'invert the "
                                        "colours', 'give the character a green hat'."),
            ],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, text_encoder, text) -> io.NodeOutput:
        with torch.no_grad():
            embeds, pooled = text_encoder([text])
        return io.NodeOutput([[embeds.float().cpu(), {"pooled_output": pooled.float().cpu()}]])


class TinyScene(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="KontextNativeTinyScene",
            display_name="Kontext-Tiny Scene",
            category=CATEGORY,
            description="Draws a 64x64 scene of the kind Kontext-Tiny edits (from a held-out seed it never saw "
                        "in training) and an instruction that fits it.",
            inputs=[
                io.Int.Input("seed", default=DEFAULT_SCENE_SEED, min=0, max=999_999,
                             tooltip="Which scene; every seed is a different picture."),
                io.Combo.Input("edit_type", options=list(EDIT_TYPES), default=DEFAULT_SCENE_EDIT,
                               tooltip="The kind of edit the suggested instruction asks for."),
            ],
            outputs=[io.Image.Output(tooltip="The scene, 64x64."),
                     io.String.Output(display_name="instruction",
                                      tooltip="An instruction for this scene (connect it to a Kontext-Tiny "
                                              "Prompt, or type your own).")],
        )

    @classmethod
    def execute(cls, seed, edit_type) -> io.NodeOutput:
        t = scene_triple(seed, edit_type)
        img = torch.from_numpy(render(t.context).image.astype(np.float32) / 255.0)[None]
        return io.NodeOutput(img, t.instruction)


NODES = [TinyLoader, TinyPrompt, TinyScene]
