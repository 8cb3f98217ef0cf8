"""Edit chains that do not drift: keep the original, take from each turn only what it changed.

Every Kontext edit re-generates the whole picture, so regions no instruction touched still pass through the model
and the autoencoder once per turn and soften a little each time (and a pixel round trip per turn adds rounding and
encoder error on top). `EditChain` keeps the original as an anchor, both as a latent and as pixels:

  * after each turn it estimates the region that turn changed (`estimate_change`: from the decoded output vs the
    decoded context, or from the latent difference), grows it a little and adds it to the union edited so far;
  * the context of the next turn is a latent canvas: the cells this turn changed come from its output, every other
    cell stays what it was (the anchor's latent where nothing was ever edited), so unchanged regions never drift;
  * `decode()` decodes the canvas and pastes the anchor's pixels back outside the edited union, with a feathered
    seam (`feather`) and the decode's colour offset removed next to the seam (`match_colours`), never inside the
    edited region.

`paste_back` is the one-turn case: an edited image whose untouched pixels are the input's, bit for bit.

Masks are (B, 1, H, W) bool tensors at pixel resolution; latents (B, C, h, w); pixels (B, 3, H, W) in [-1, 1].
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import InputError

ESTIMATORS = ("pixels", "latent")
# Change thresholds: a pixel changed when one channel moved by more than PIXEL_THRESHOLD of 255 levels between the
# decoded context and the decoded output (both pass the same decoder, so its reconstruction error cancels); a
# latent cell changed when its mean absolute difference over channels exceeds LATENT_THRESHOLD.
PIXEL_THRESHOLD = 24.0
LATENT_THRESHOLD = 0.1
GROW = 1
FEATHER = 2
_SETTINGS = ("ae", "estimator", "threshold", "grow", "feather_px", "colour_match")


def _ae_run(fn, ae, x: Tensor) -> Tensor:
    """Call the AE's encode/decode with `x` on its device and dtype; codecs without parameters (a host's VAE
    wrapped by the node pack) take `x` as it is. The result comes back as float32."""
    p = next(iter(ae.parameters()), None) if hasattr(ae, "parameters") else None
    if p is not None:
        x = x.to(device=p.device, dtype=p.dtype)
    return fn(x).float()


def _as_mask(mask: Tensor, like: Tensor, name: str) -> Tensor:
    if mask.ndim == 3:
        mask = mask.unsqueeze(1)
    if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[-2:] != like.shape[-2:] or mask.shape[0] not in (1, like.shape[0]):
        raise InputError(f"{name} must be a (B, 1, H, W) mask matching the image {tuple(like.shape)}; "
                         f"got {tuple(mask.shape)}")
    return mask.to(device=like.device, dtype=torch.bool)


def dilate(mask: Tensor, radius: int) -> Tensor:
    """Grow a (B, 1, H, W) bool mask by `radius` pixels (square neighbourhood)."""
    if radius <= 0:
        return mask
    return F.max_pool2d(mask.float(), 2 * radius + 1, stride=1, padding=radius) > 0


def feather(mask: Tensor, radius: int) -> Tensor:
    """Blend weight for compositing: 1 on `mask`, falling linearly to 0 over `radius` pixels outside it.

    At Chebyshev distance d from the mask the weight is (radius + 1 - d) / (radius + 1); beyond `radius` it is
    exactly 0, so pixels farther away are the anchor's, bit for bit.
    """
    m = mask.float()
    if radius <= 0:
        return m
    acc = m.clone()
    for r in range(1, radius + 1):
        acc += F.max_pool2d(m, 2 * r + 1, stride=1, padding=r)
    return acc / (radius + 1)


def match_colours(pixels: Tensor, anchor: Tensor, region: Tensor, band: int) -> Tensor:
    """Remove the decode's per-channel colour offset next to the seam, leaving `region` itself untouched.

    The offset is the median of (pixels - anchor) over the ring of width `band` just outside `region`, where both
    show the same unchanged content; it is subtracted outside `region` only (a recoloured object keeps its new
    colour). Items whose ring is empty are returned as they are.
    """
    region = _as_mask(region, pixels, "region")
    ring = dilate(region, max(1, band)) & ~region
    out = pixels.clone()
    for b in range(pixels.shape[0]):
        sel = ring[b if ring.shape[0] > 1 else 0, 0]
        if not bool(sel.any()):
            continue
        diff = (pixels[b] - anchor[b])[:, sel]                        # (3, n)
        offset = diff.median(dim=1).values[:, None, None]
        outside = ~region[b if region.shape[0] > 1 else 0]
        out[b] = torch.where(outside, pixels[b] - offset, pixels[b])
    return out


def composite(pixels: Tensor, anchor: Tensor, region: Tensor, *, feather_px: int = FEATHER,
              colour_match: bool = True) -> Tensor:
    """`pixels` inside `region`, `anchor` outside, a feathered seam of `feather_px` pixels between them."""
    if pixels.shape != anchor.shape:
        raise InputError(f"edited pixels {tuple(pixels.shape)} and anchor {tuple(anchor.shape)} differ in shape")
    region = _as_mask(region, pixels, "region")
    if colour_match:
        pixels = match_colours(pixels, anchor, region, feather_px + 2)
    alpha = feather(region, feather_px).to(pixels.dtype)
    blend = (alpha * pixels + (1 - alpha) * anchor).clamp(-1, 1)
    return torch.where(alpha > 0, torch.where(alpha >= 1, pixels, blend), anchor)


def estimate_change(before: Tensor, after: Tensor, threshold: float | None = None) -> Tensor:
    """Where `after` differs from `before`: pixels (3 channels, [-1, 1], threshold in 8-bit levels, largest channel
    difference) or latents (any other channel count, threshold on the mean absolute difference over channels)."""
    if before.shape != after.shape:
        raise InputError(f"cannot compare {tuple(before.shape)} with {tuple(after.shape)}")
    if before.shape[1] == 3:
        t = PIXEL_THRESHOLD if threshold is None else threshold
        return ((after - before).abs().amax(1, keepdim=True) * 127.5) > t
    t = LATENT_THRESHOLD if threshold is None else threshold
    return (after - before).abs().mean(1, keepdim=True) > t


def to_latent_mask(mask: Tensor, factor: int) -> Tensor:
    """A latent cell is in the mask when any of its factor x factor pixels is."""
    return F.max_pool2d(mask.float(), factor, stride=factor) > 0


def to_pixel_mask(mask: Tensor, factor: int) -> Tensor:
    return F.interpolate(mask.float(), scale_factor=factor, mode="nearest") > 0


@dataclass
class ChainStep:
    changed: Tensor         # (B, 1, H, W) bool: pixels this turn changed (estimated, grown)
    changed_latent: Tensor  # (B, 1, h, w) bool: latent cells taken from this turn's output


class EditChain:
    """Anchored edit chain over a batch of images. Feed `context` to the edit, give its output latent to `step`.

        chain = EditChain.from_pixels(ae, pixels)            # (B, 3, H, W) in [-1, 1]
        for prompt in prompts:
            out = edit(transformer, ae, latents=[chain.context], ..., decode=False).latent
            chain.step(out)
        images = chain.decode()
    """

    def __init__(self, ae, anchor_latent: Tensor, anchor_pixels: Tensor | None = None, *, estimator: str = "pixels",
                 threshold: float | None = None, grow: int = GROW, feather_px: int = FEATHER,
                 colour_match: bool = True):
        if estimator not in ESTIMATORS:
            raise InputError(f"unknown change estimator '{estimator}'; choose one of {', '.join(ESTIMATORS)}")
        if anchor_latent.ndim != 4:
            raise InputError(f"anchor latent must be (B, C, h, w), got {tuple(anchor_latent.shape)}")
        self.ae = ae
        self.estimator, self.threshold = estimator, threshold
        self.grow, self.feather_px, self.colour_match = grow, feather_px, colour_match
        self.anchor_latent = anchor_latent.float()
        self.canvas = self.anchor_latent.clone()
        self._canvas_pixels: Tensor | None = None
        if anchor_pixels is None:
            anchor_pixels = self._decode(self.anchor_latent)
            self._canvas_pixels = anchor_pixels
        self.anchor_pixels = anchor_pixels.float()
        b, _, h, w = self.anchor_latent.shape
        if self.anchor_pixels.ndim != 4 or self.anchor_pixels.shape[0] != b or self.anchor_pixels.shape[1] != 3:
            raise InputError(f"anchor pixels must be ({b}, 3, H, W), got {tuple(self.anchor_pixels.shape)}")
        H, W = self.anchor_pixels.shape[-2:]
        if H % h or W % w or H // h != W // w:
            raise InputError(f"anchor pixels {H}x{W} are not a whole multiple of the latent {h}x{w}")
        self.factor = H // h
        self.union = torch.zeros(b, 1, H, W, dtype=torch.bool, device=self.anchor_pixels.device)
        self.turns = 0

    @classmethod
    @torch.no_grad()
    def from_pixels(cls, ae, pixels: Tensor, **kwargs) -> "EditChain":
        return cls(ae, _ae_run(ae.encode, ae, pixels), pixels, **kwargs)

    def fork(self, **settings) -> "EditChain":
        """A copy to step further, leaving this one as it is (a node graph may re-run a later turn many times);
        `settings` (ae, estimator, threshold, grow, feather_px, colour_match) replace this chain's."""
        other = copy.copy(self)
        other.canvas, other.union = self.canvas.clone(), self.union.clone()
        for name, value in settings.items():
            if name not in _SETTINGS:
                raise TypeError(f"unknown chain setting {name!r}")
            setattr(other, name, value)
        if "ae" in settings and settings["ae"] != self.ae:
            other._canvas_pixels = None  # another decoder: the cached decode of the canvas no longer applies
        if other.estimator not in ESTIMATORS:
            raise InputError(f"unknown change estimator '{other.estimator}'; choose one of {', '.join(ESTIMATORS)}")
        return other

    @property
    def context(self) -> Tensor:
        """The latent to edit next: the anchor, with the cells changed so far taken from the turns that changed them."""
        return self.canvas

    @property
    def union_latent(self) -> Tensor:
        return to_latent_mask(self.union, self.factor)

    @torch.no_grad()
    def _decode(self, latent: Tensor) -> Tensor:
        # clamped like every picture a host shows or saves (ComfyUI's VAE clamps its decode), so the change estimate
        # and the seam blend see the same values whichever decoder runs
        return _ae_run(self.ae.decode, self.ae, latent).clamp(-1, 1)

    def canvas_pixels(self) -> Tensor:
        if self._canvas_pixels is None:
            self._canvas_pixels = self._decode(self.canvas)
        return self._canvas_pixels

    @torch.no_grad()
    def step(self, out_latent: Tensor, changed: Tensor | None = None, out_pixels: Tensor | None = None) -> ChainStep:
        """Record one turn: `out_latent` is the edit's output for `context`. `changed` (pixel mask) overrides the
        estimate, e.g. a mask the user painted; `out_pixels`, the output already decoded, saves a decode."""
        out_latent = out_latent.float().to(self.canvas.device)
        if out_latent.shape != self.canvas.shape:
            raise InputError(f"output latent {tuple(out_latent.shape)} does not match the chain's "
                             f"{tuple(self.canvas.shape)}")
        if changed is not None:
            changed = _as_mask(changed, self.anchor_pixels, "changed").expand_as(self.union)
        elif self.estimator == "pixels":
            if out_pixels is None:
                out_pixels = self._decode(out_latent)
            changed = estimate_change(self.canvas_pixels(), out_pixels.float(), self.threshold)
        else:
            changed = to_pixel_mask(estimate_change(self.canvas, out_latent, self.threshold), self.factor)
        changed = dilate(changed, self.grow)
        cells = to_latent_mask(changed, self.factor)
        self.canvas = torch.where(cells, out_latent, self.canvas)
        # The canvas is the output wherever every cell changed: its decode is then already known.
        self._canvas_pixels = out_pixels.float() if out_pixels is not None and bool(cells.all()) else None
        self.union |= changed
        self.turns += 1
        return ChainStep(changed, cells)

    @torch.no_grad()
    def decode(self) -> Tensor:
        """(B, 3, H, W) in [-1, 1]: the decoded canvas inside the edited union, the anchor's pixels elsewhere."""
        return composite(self.canvas_pixels(), self.anchor_pixels, self.union, feather_px=self.feather_px,
                         colour_match=self.colour_match)


@torch.no_grad()
def paste_back(ae, context_pixels: Tensor, out_latent: Tensor, context_latent: Tensor | None = None,
               **kwargs) -> Tensor:
    """One edit with the untouched pixels pasted back from its input: (B, 3, H, W) in [-1, 1]."""
    chain = (EditChain(ae, context_latent, context_pixels, **kwargs) if context_latent is not None
             else EditChain.from_pixels(ae, context_pixels, **kwargs))
    chain.step(out_latent)
    return chain.decode()
