"""Kontext-Tiny: a small trained Kontext editor shipped with the engine (see weights/MODEL_CARD.md).

It is the same model family as FLUX.1 Kontext, run by the same code: the engine's `Flux` DiT (BFL keys, bf16) and
`AutoEncoder` (LDM `ae.safetensors` keys), loaded by `load_transformer` / `load_autoencoder` and sampled by
`pipeline.sample`. Only the text encoder is its own (`text_encoder.TinyTextEncoder`). It edits 64x64 pictures of
the generated scenes it was trained on (`edits.py`): recolour, remove, add, move, resize, background, sign text,
grayscale/invert, and a character's hat.

    tiny = kontext_core.tiny.load()
    result = tiny.edit(image, "make the triangle blue", seed=0)
    result.images[0].save("out.png")

Runtime code here never imports the training code (`train.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
TRANSFORMER_FILE = "kontext_tiny_transformer.safetensors"
AE_FILE = "kontext_tiny_ae.safetensors"
TEXT_ENCODER_FILE = "kontext_tiny_text_encoder.safetensors"
DEFAULT_STEPS = 12
DEFAULT_GUIDANCE = 2.5
IMAGE_SIZE = 64


def weight_paths(weights_dir: str | Path | None = None) -> dict[str, Path]:
    """The three files (transformer, ae, text_encoder); a clear error when any is missing."""
    from ..errors import CheckpointError

    d = Path(weights_dir) if weights_dir else WEIGHTS_DIR
    paths = {"transformer": d / TRANSFORMER_FILE, "ae": d / AE_FILE, "text_encoder": d / TEXT_ENCODER_FILE}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise CheckpointError(f"Kontext-Tiny weights not found: {', '.join(missing)}. They ship with the package "
                              "(kontext_core/tiny/weights/); reinstall it, or train them with "
                              "`python -m kontext_core.tiny.train --out DIR` and pass that folder.")
    return paths


def load_ae_and_text_encoder(paths: dict[str, Path], device="cpu", dtype: torch.dtype | None = torch.float32):
    from ..weights.ae_layout import load_autoencoder
    from .text_encoder import TinyTextEncoder

    return (load_autoencoder(paths["ae"], device=device, dtype=dtype).eval(),
            TinyTextEncoder.load(paths["text_encoder"], device=device))


@dataclass
class KontextTiny:
    transformer: torch.nn.Module
    ae: torch.nn.Module
    text_encoder: torch.nn.Module

    @torch.no_grad()
    def encode_prompt(self, prompts: str | Sequence[str]) -> tuple[Tensor, Tensor]:
        return self.text_encoder(prompts)

    @torch.no_grad()
    def encode_images(self, images) -> Tensor:
        """PIL images / (B, 3, H, W) tensors in [0, 1] -> context latents (B, 16, H/8, W/8), sizes kept."""
        from ..images import prepare_image

        if isinstance(images, Tensor) and images.ndim == 4:
            x = images.float() * 2 - 1
        else:
            x = torch.cat([prepare_image(im, "keep") for im in (images if isinstance(images, (list, tuple))
                                                                  else [images])])
        p = next(self.ae.parameters())
        return self.ae.encode(x.to(device=p.device, dtype=p.dtype)).float()

    @torch.no_grad()
    def edit(self, image=None, prompt: str | Sequence[str] = "", *, latent: Tensor | None = None,
             steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE, seed: int | Sequence[int] = 0,
             decode: bool = True, callback=None):
        """Edit one image (or a batch: a (B, 3, H, W) tensor / list of images with a list of prompts) or a latent.

        Each batch item gets the noise of its own seed (`seed` may be a list), so a result does not depend on
        what else is in the batch. Returns the engine's `EditResult`.
        """
        from ..pipeline import edit, make_noise

        ctx = latent if latent is not None else self.encode_images(image)
        b = ctx.shape[0]
        prompts = [prompt] * b if isinstance(prompt, str) else list(prompt)
        seeds = [seed] * b if isinstance(seed, int) else list(seed)
        if len(prompts) != b or len(seeds) != b:
            raise ValueError(f"{b} images but {len(prompts)} prompts and {len(seeds)} seeds")
        embeds, pooled = self.encode_prompt(prompts)
        noise = torch.cat([make_noise((1, *ctx.shape[1:]), s) for s in seeds])
        return edit(self.transformer, self.ae, latents=[ctx], prompt_embeds=embeds, pooled_prompt_embeds=pooled,
                    noise=noise, steps=steps, guidance=guidance, decode=decode, callback=callback)


def load(weights_dir: str | Path | None = None, device="cpu", dtype: torch.dtype | None = torch.float32) -> KontextTiny:
    """Load the shipped weights through the engine's loaders (the transformer file is bf16, upcast per layer)."""
    from ..weights.loader import load_transformer

    paths = weight_paths(weights_dir)
    ae, te = load_ae_and_text_encoder(paths, device, dtype)
    return KontextTiny(load_transformer(paths["transformer"], device=device).eval(), ae, te)
