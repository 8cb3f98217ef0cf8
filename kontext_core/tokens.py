"""Latents <-> DiT tokens, and the position ids that tell Kontext which tokens are target and which context.

A 16-channel latent (B, C, H, W) becomes (B, ceil(H/2)*ceil(W/2), C*4) tokens of 2x2 patches. Odd latent
sizes are padded circularly (as ComfyUI does) and the prediction is cropped back, so any image size that is a
multiple of 8 pixels works without a silent resize.

Ids are (index, row, col) per token: the target uses index 0, context images index 1 (`offset`, the default
and what Kontext was trained with), 1, 2, 3… (`index`), or index 0 placed diagonally past the target canvas
(`uxo`). Text ids are all zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import InputError

PATCH = 2
REFERENCE_LAYOUTS = ("offset", "index", "uxo")


def pack(latent: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, ceil(H/2)*ceil(W/2), C*4), channel-major inside each patch: (c, ph, pw)."""
    if latent.ndim != 4:
        raise InputError(f"expected a latent of shape (B, C, H, W), got {tuple(latent.shape)}")
    b, c, h, w = latent.shape
    ph, pw = (-h) % PATCH, (-w) % PATCH
    if ph or pw:
        latent = F.pad(latent, (0, pw, 0, ph), mode="circular")
    hp, wp = (h + ph) // PATCH, (w + pw) // PATCH
    x = latent.reshape(b, c, hp, PATCH, wp, PATCH).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, hp * wp, c * PATCH * PATCH)


def unpack(tokens: Tensor, height: int, width: int) -> Tensor:
    """Inverse of `pack` for a latent of (height, width) cells, cropping the padding of odd sizes."""
    b, n, d = tokens.shape
    hp, wp = -(-height // PATCH), -(-width // PATCH)
    if n != hp * wp:
        raise InputError(f"{n} tokens cannot be unpacked to a {height}x{width} latent (needs {hp * wp})")
    c = d // (PATCH * PATCH)
    x = tokens.reshape(b, hp, wp, c, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, hp * PATCH, wp * PATCH)[:, :, :height, :width]


def grid_ids(height: int, width: int, index: int = 0, row_offset: int = 0, col_offset: int = 0,
             batch: int = 1, device=None, dtype=torch.float32) -> Tensor:
    """Ids (B, hp*wp, 3) for a latent of height x width cells; offsets are in latent cells (rounded to patches)."""
    hp, wp = -(-height // PATCH), -(-width // PATCH)
    r0, c0 = (row_offset + PATCH // 2) // PATCH, (col_offset + PATCH // 2) // PATCH
    ids = torch.zeros(hp, wp, 3, device=device, dtype=dtype)
    ids[..., 0] = index
    ids[..., 1] = torch.arange(r0, r0 + hp, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(c0, c0 + wp, device=device, dtype=dtype)[None, :]
    return ids.reshape(1, hp * wp, 3).expand(batch, -1, -1)


@dataclass(frozen=True)
class Placement:
    index: int
    row_offset: int
    col_offset: int


def reference_placements(target_hw: tuple[int, int], ref_hws: Sequence[tuple[int, int]],
                         layout: str = "offset") -> list[Placement]:
    """Where each context latent sits in position space, in latent cells.

    offset: index 1 for all; each further reference goes below or right of the ones before, whichever keeps the
            combined canvas closer to square (one reference: at the origin, exactly as BFL/diffusers place it).
    index:  reference i gets index i (1-based), all at the origin.
    uxo:    index 0, each reference shifted diagonally past the target canvas and the references before it.
    """
    if layout not in REFERENCE_LAYOUTS:
        raise InputError(f"unknown reference layout '{layout}'; choose one of {', '.join(REFERENCE_LAYOUTS)}")
    th, tw = target_hw
    out: list[Placement] = []
    ext_h = ext_w = 0
    for i, (h, w) in enumerate(ref_hws):
        if layout == "index":
            out.append(Placement(i + 1, 0, 0))
        elif layout == "uxo":
            out.append(Placement(0, -(-th // PATCH) * PATCH + ext_h, -(-tw // PATCH) * PATCH + ext_w))
            ext_h += h
            ext_w += w
        else:
            row = col = 0
            if h + ext_h > w + ext_w:
                col = ext_w
            else:
                row = ext_h
            out.append(Placement(1, row, col))
            ext_h = max(ext_h, h + row)
            ext_w = max(ext_w, w + col)
    return out


def kontext_tokens(target: Tensor, references: Sequence[Tensor] = (), layout: str = "offset"):
    """Pack the target latent and its context latents into one token sequence.

    Returns (tokens, ids, n_target): tokens = [target ‖ ref1 ‖ ref2 …]; the DiT's prediction for the first
    n_target tokens is the velocity of the target.
    """
    b, _, h, w = target.shape
    dev = target.device
    toks = [pack(target)]
    ids = [grid_ids(h, w, 0, batch=b, device=dev)]
    refs = list(references)
    for ref in refs:
        if ref.ndim != 4 or ref.shape[1] != target.shape[1]:
            raise InputError(f"context latent has shape {tuple(ref.shape)}; expected (B, {target.shape[1]}, H, W)")
    places = reference_placements((h, w), [tuple(r.shape[-2:]) for r in refs], layout)
    for ref, p in zip(refs, places):
        if ref.shape[0] not in (1, b):
            raise InputError(f"context latent batch {ref.shape[0]} does not match target batch {b}")
        ref = ref.to(device=dev, dtype=target.dtype).expand(b, -1, -1, -1)
        toks.append(pack(ref))
        ids.append(grid_ids(ref.shape[-2], ref.shape[-1], p.index, p.row_offset, p.col_offset, batch=b, device=dev))
    return torch.cat(toks, dim=1), torch.cat(ids, dim=1), toks[0].shape[1]


def text_ids(batch: int, length: int, device=None) -> Tensor:
    return torch.zeros(batch, length, 3, device=device)
