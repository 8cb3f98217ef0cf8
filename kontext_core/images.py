"""Image sizing for Kontext: the 17 preferred resolutions and conversions between PIL / tensors.

Kontext was trained on a fixed set of ~1 MP resolutions; BFL's reference picks the one nearest in aspect
ratio and stretches the image to it (LANCZOS). We also offer crop / pad (no distortion) and keeping the
input size snapped to multiples of 16.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .errors import InputError

_BASE = [(672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184),
         (944, 1104), (1024, 1024)]
# (width, height) pairs: the 9 above and their 8 transposes (1024x1024 is its own).
KONTEXT_BUCKETS: tuple[tuple[int, int], ...] = tuple(_BASE + [(h, w) for (w, h) in _BASE if w != h])
RESIZE_MODES = ("stretch", "crop", "pad", "keep")


def nearest_bucket(width: int, height: int, buckets: Iterable[tuple[int, int]] = KONTEXT_BUCKETS) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest to width/height (first one wins ties, as in BFL's code)."""
    if width <= 0 or height <= 0:
        raise InputError(f"image size must be positive, got {width}x{height}")
    ar = width / height
    return min(buckets, key=lambda wh: abs(ar - wh[0] / wh[1]))


def snap16(width: int, height: int) -> tuple[int, int]:
    """Round sizes down to multiples of 16 (one latent patch), minimum 16."""
    w, h = max(16, (width // 16) * 16), max(16, (height // 16) * 16)
    return w, h


def to_pil(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, Tensor):
        t = image.detach().float().cpu()
        if t.ndim == 4:
            if t.shape[0] != 1:
                raise InputError("to_pil takes one image; split batches first")
            t = t[0]
        if t.ndim == 3 and t.shape[0] in (1, 3, 4) and t.shape[-1] not in (1, 3, 4):
            t = t.permute(1, 2, 0)
        arr = (t.clamp(0, 1).numpy() * 255.0 + 0.5).astype(np.uint8)
        return Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    if isinstance(image, np.ndarray):
        return Image.fromarray(image)
    raise InputError(f"expected a PIL image or a tensor, got {type(image).__name__}")


def flatten_alpha(img: Image.Image, background=(255, 255, 255)) -> Image.Image:
    """RGB image; transparent pixels are composited on `background` instead of keeping garbage colour."""
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, background + (255,))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")


def fit(img: Image.Image, size: tuple[int, int], mode: str = "stretch", pad_color=(0, 0, 0)) -> Image.Image:
    """Resize a PIL image to size=(w, h): stretch, crop (cover then centre-crop), or pad (contain then pad)."""
    if mode not in RESIZE_MODES:
        raise InputError(f"unknown resize mode '{mode}'; choose one of {', '.join(RESIZE_MODES)}")
    w, h = size
    if img.size == (w, h):
        return img
    if mode in ("stretch", "keep"):
        return img.resize((w, h), Image.Resampling.LANCZOS)
    sw, sh = img.size
    if mode == "crop":
        s = max(w / sw, h / sh)
        rw, rh = max(w, round(sw * s)), max(h, round(sh * s))
        r = img.resize((rw, rh), Image.Resampling.LANCZOS)
        left, top = (rw - w) // 2, (rh - h) // 2
        return r.crop((left, top, left + w, top + h))
    s = min(w / sw, h / sh)
    rw, rh = max(1, round(sw * s)), max(1, round(sh * s))
    r = img.resize((rw, rh), Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (w, h), pad_color)
    canvas.paste(r, ((w - rw) // 2, (h - rh) // 2))
    return canvas


def target_size(width: int, height: int, mode: str = "stretch") -> tuple[int, int]:
    """The size an input of width x height is brought to: its Kontext bucket, or itself snapped to 16 ('keep')."""
    return snap16(width, height) if mode == "keep" else nearest_bucket(width, height)


def pil_to_tensor(img: Image.Image) -> Tensor:
    """PIL RGB -> (1, 3, H, W) float32 in [-1, 1] (the AE's input range)."""
    arr = np.asarray(flatten_alpha(img), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).contiguous()


def tensor_to_pil(x: Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in x]


def prepare_image(image, mode: str = "stretch", size: tuple[int, int] | None = None) -> Tensor:
    """PIL / tensor in [0, 1] -> (1, 3, H, W) in [-1, 1] at `size` or the size `mode` picks."""
    img = flatten_alpha(to_pil(image))
    size = size or target_size(*img.size, mode)
    return pil_to_tensor(fit(img, size, mode))
