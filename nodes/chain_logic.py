"""Anchored edit chains in a node graph, without ComfyUI: the host VAE as an engine codec, and one turn of
`kontext_core.chain.EditChain` per Kontext Keep Unchanged node.

The chain's state (the original as latent and pixels, the canvas, the union of regions edited so far) travels
inside the LATENT dict the node outputs, under CHAIN_KEY, so the next turn's node continues it from its
`previous` input; every other node sees an ordinary LATENT ("samples"). A node never mutates the state it
receives (ComfyUI may re-run a later turn on the same cached input), it steps a fork.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kontext_core.chain import ESTIMATORS, FEATHER, EditChain
from kontext_core.errors import InputError

from .logic import check_latent

CHAIN_KEY = "kontext_chain"
ESTIMATOR_NAMES: tuple[str, ...] = tuple(ESTIMATORS)
DEFAULT_FEATHER = FEATHER


class VAECodec:
    """The engine's AE interface, (B, 3, H, W) in [-1, 1], around a host VAE that encodes and decodes
    (B, H, W, 3) images in [0, 1] (ComfyUI's VAE; it moves tensors to its own device itself)."""

    def __init__(self, vae):
        self.vae = vae

    def __eq__(self, other) -> bool:
        return isinstance(other, VAECodec) and other.vae is self.vae

    def __hash__(self) -> int:
        return id(self.vae)

    def encode(self, pixels: Tensor) -> Tensor:
        return self.vae.encode(((pixels.float() + 1) / 2).clamp(0, 1).movedim(1, -1)).float().cpu()

    def decode(self, latent: Tensor) -> Tensor:
        img = self.vae.decode(latent)
        if img.ndim == 5:  # VAEs that decode video frames: (B, T, H, W, C)
            img = img.reshape(-1, *img.shape[-3:])
        return (img[..., :3].float().movedim(-1, 1) * 2 - 1).cpu()


def keep_unchanged(samples, vae, image: Tensor | None = None, previous=None, estimator: str = "pixels",
                   threshold: float = 0.0, feather: int = DEFAULT_FEATHER, colour_match: bool = True):
    """One anchored turn. `samples`: this turn's edited LATENT; `image`: the original (first turn) or `previous`:
    the LATENT a Keep Unchanged node gave the turn before. Returns (LATENT carrying the chain, IMAGE (B, H, W, 3)
    in [0, 1]: the edit with the never-edited pixels the original's, MASK (B, H, W): the region edited so far)."""
    out = check_latent(samples, "samples")
    if (image is None) == (previous is None):
        raise InputError("Kontext Keep Unchanged needs exactly one of: image (the original picture, on the first "
                         "turn) or previous (the LATENT output of the previous turn's Kontext Keep Unchanged)")
    settings = dict(ae=VAECodec(vae), estimator=estimator, threshold=None if threshold <= 0 else float(threshold),
                    feather_px=int(feather), colour_match=bool(colour_match))
    if previous is not None:
        state = previous.get(CHAIN_KEY) if isinstance(previous, dict) else None
        if not isinstance(state, EditChain):
            raise InputError("previous is a LATENT without a chain: connect the LATENT output of the previous "
                             "turn's Kontext Keep Unchanged (not a sampler's), or give the original image instead")
        chain = state.fork(**settings)
    else:
        if image.ndim != 4 or image.shape[-1] < 3:
            raise InputError(f"image must be a (B, H, W, 3) IMAGE, got {tuple(image.shape)}")
        pixels = image[..., :3].float().movedim(-1, 1).cpu() * 2 - 1
        codec = settings.pop("ae")
        chain = EditChain.from_pixels(codec, pixels, **settings)
    chain.step(out.float().cpu())
    pixels = chain.decode()
    latent = {"samples": chain.canvas.to(out.dtype), CHAIN_KEY: chain}
    return latent, ((pixels + 1) / 2).clamp(0, 1).movedim(1, -1), chain.union[:, 0].float()
