"""Tiled AE encode/decode: bounded activation memory for large images.

The image (or latent) is cut into overlapping tiles on the latent grid; every tile is run through the AE on
its own and the results are blended with linear ("feathered") weights: inside a tile the weight ramps up
over the overlap on every side that has a neighbour, and the sum of weights is divided out, so each output
cell is a convex combination of the tiles covering it and there are no hard seams.

Tiling is an approximation: a tile's border sees zero padding instead of its neighbours, its GroupNorm
statistics are the tile's own, and the mid-block attention only sees the tile. With the real FLUX AE the
difference is small; with random weights it is much larger (see tests/unit/test_ae_tiling.py).

`tile_size_for_budget` picks the largest tile whose estimated activation memory fits a byte budget.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .autoencoder import AutoEncoder, AutoEncoderParams


def _starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size `tile` covering [0, length), consecutive tiles sharing >= `overlap`."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)  # the last tile ends exactly at the border (may overlap more)
    return sorted(set(starts))


def _ramp(size: int, ramp: int, left: bool, right: bool) -> torch.Tensor:
    """1-d blend weight: 1 in the middle, rising linearly over `ramp` cells on sides with a neighbour.

    Values are (i+1)/(ramp+1), never 0, so cells covered by a single tile keep a positive weight, and two
    tiles overlapping by exactly `ramp` cells have weights summing to 1 there.
    """
    w = torch.ones(size, dtype=torch.float32)
    ramp = min(ramp, size)
    if ramp > 0:
        up = torch.arange(1, ramp + 1, dtype=torch.float32) / (ramp + 1)
        if left:
            w[:ramp] = torch.minimum(w[:ramp], up)
        if right:
            w[size - ramp:] = torch.minimum(w[size - ramp:], up.flip(0))
    return w


def _grid(hl: int, wl: int, tile: int, overlap: int):
    """Yield (y0, y1, x0, x1, has_top, has_bottom, has_left, has_right) latent tiles."""
    ys, xs = _starts(hl, tile, overlap), _starts(wl, tile, overlap)
    for iy, y0 in enumerate(ys):
        for ix, x0 in enumerate(xs):
            yield (y0, min(y0 + tile, hl), x0, min(x0 + tile, wl),
                   iy > 0, iy < len(ys) - 1, ix > 0, ix < len(xs) - 1)


def _normalise(tile: int, overlap: int) -> tuple[int, int]:
    tile = max(int(tile), 2)
    overlap = max(0, min(int(overlap), tile // 2))
    return tile, overlap


def _blend(run: Callable[[torch.Tensor], torch.Tensor], src: torch.Tensor, hl: int, wl: int, tile: int,
           overlap: int, f_in: int, f_out: int, out_hw: tuple[int, int], out_dtype: torch.dtype,
           progress: Callable[[int, int], None] | None) -> torch.Tensor:
    """Shared loop. Tiles are laid on the latent grid (hl x wl); `f_in` / `f_out` convert latent cells to
    the units of the input / output tensors (encode: 8 -> 1, decode: 1 -> 8)."""
    tiles = list(_grid(hl, wl, tile, overlap))
    acc = None
    wsum = None
    H_in, W_in = src.shape[-2:]
    for n, (y0, y1, x0, x1, top, bottom, left, right) in enumerate(tiles):
        # The last tile on an axis takes the input up to the border (encode: the < 8 leftover pixels).
        iy1 = H_in if not bottom else y1 * f_in
        ix1 = W_in if not right else x1 * f_in
        part = run(src[..., y0 * f_in:iy1, x0 * f_in:ix1])
        oh, ow = (y1 - y0) * f_out, (x1 - x0) * f_out
        part = part[..., :oh, :ow].float()
        if acc is None:
            acc = torch.zeros(*part.shape[:2], *out_hw, dtype=torch.float32, device=part.device)
            wsum = torch.zeros(out_hw, dtype=torch.float32, device=part.device)
        wy = _ramp(oh, overlap * f_out, top, bottom)
        wx = _ramp(ow, overlap * f_out, left, right)
        w = (wy[:, None] * wx[None, :]).to(part.device)
        acc[..., y0 * f_out:y1 * f_out, x0 * f_out:x1 * f_out] += part * w
        wsum[y0 * f_out:y1 * f_out, x0 * f_out:x1 * f_out] += w
        if progress is not None:
            progress(n + 1, len(tiles))
    return (acc / wsum).to(out_dtype)


def encode_tiled(ae: AutoEncoder, x: torch.Tensor, tile: int = 512, overlap: int = 64, *,
                 progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """`ae.encode(x)` in overlapping tiles. `tile` / `overlap` are in pixels (rounded down to the AE's 8-pixel
    grid). Images that fit in one tile are encoded directly."""
    f = ae.downscale
    H, W = x.shape[-2:]
    hl, wl = H // f, W // f
    t, o = _normalise(tile // f, overlap // f)
    if hl <= t and wl <= t:
        return ae.encode(x)
    return _blend(ae.encode, x, hl, wl, t, o, f, 1, (hl, wl), ae.dtype, progress)


def decode_tiled(ae: AutoEncoder, z: torch.Tensor, tile: int = 64, overlap: int = 8, *,
                 progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """`ae.decode(z)` in overlapping tiles. `tile` / `overlap` are in latent cells (64 cells = 512 pixels).
    Latents that fit in one tile are decoded directly."""
    f = ae.downscale
    hl, wl = z.shape[-2:]
    t, o = _normalise(tile, overlap)
    if hl <= t and wl <= t:
        return ae.decode(z)
    return _blend(ae.decode, z, hl, wl, t, o, 1, f, (hl * f, wl * f), ae.dtype, progress)


# --- memory estimate -------------------------------------------------------------------------------------

# Tensors alive at once at a resolution level, in units of the widest activation there: a ResBlock's input
# (kept for the skip), its normalised and swish-activated copies, and the conv output. Measured peaks on CPU are
# ~3x the widest tensor; 4x leaves room for conv workspaces.
_LIVE_TENSORS = 4


def estimate_tile_bytes(tile: int, params: AutoEncoderParams, dtype: torch.dtype, mode: str = "decode", *,
                        batch: int = 1, efficient_attention: bool = False) -> int:
    """Estimated peak activation bytes for one square tile (`tile` in latent cells for decode, pixels for
    encode), weights and the blended output excluded.

    Assumptions: at each resolution level the peak is `_LIVE_TENSORS` tensors as wide as the widest activation
    at that level (for the decoder's full-resolution level that is the upsampled `ch * ch_mult[1]` input, then
    `ch * ch_mult[0]`); the largest level dominates, which is the full-resolution one for the FLUX widths. The
    single-head mid-block attention adds its (HW)^2 score matrix twice (scores and softmax) at the latent
    resolution, unless `efficient_attention` (a flash / memory-efficient SDPA kernel that never materialises
    it) is assumed.
    """
    f = params.downscale
    itemsize = dtype.itemsize
    widths = [params.ch * m for m in params.ch_mult]
    if mode == "decode":
        side = tile * f
        lat = tile
    elif mode == "encode":
        side = tile
        lat = tile // f
    else:
        raise ValueError(f"mode must be 'decode' or 'encode', got {mode!r}")
    peak = 0
    for lvl, w in enumerate(widths):
        s = side // (2 ** lvl)
        if mode == "decode":
            incoming = widths[lvl + 1] if lvl + 1 < len(widths) else w
        else:
            incoming = widths[lvl - 1] if lvl > 0 else params.ch
        peak = max(peak, _LIVE_TENSORS * s * s * max(w, incoming))
    tokens = lat * lat
    attn = 4 * tokens * widths[-1] + (0 if efficient_attention else 2 * tokens * tokens)
    return int(batch * itemsize * (peak + attn))


def tile_size_for_budget(budget_bytes: int, params: AutoEncoderParams, dtype: torch.dtype,
                         mode: str = "decode", *, batch: int = 1, efficient_attention: bool = False) -> int:
    """Largest tile (latent cells for decode, in steps of 8; pixels for encode, in steps of 64) whose
    `estimate_tile_bytes` fits `budget_bytes`. Returns the smallest candidate (8 cells / 64 px) if nothing
    fits; the caller then runs over budget rather than failing."""
    if mode == "decode":
        candidates = range(8, 513, 8)
    elif mode == "encode":
        candidates = range(64, 4097, 64)
    else:
        raise ValueError(f"mode must be 'decode' or 'encode', got {mode!r}")
    best = candidates[0]
    for t in candidates:
        if estimate_tile_bytes(t, params, dtype, mode, batch=batch, efficient_attention=efficient_attention) \
                <= budget_bytes:
            best = t
        else:
            break  # the estimate grows with the tile
    return best
