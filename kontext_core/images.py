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

from .errors import InputError, KontextError
from .validation import check_size

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


# Values of float pixel data this far outside [0, 1] are rounding noise, clamped; beyond it the range is
# ambiguous (0..255? [-1, 1]?) and refused rather than guessed.
RANGE_TOLERANCE = 1e-3
_ACCEPTED = ("a PIL image; a tensor or numpy array shaped (H, W), (H, W, C), (C, H, W) or (1, ...) with C in "
             "1/3/4, holding floats in [0, 1], uint8 (0..255) or uint16 (0..65535)")


def _as_unit_float(a: np.ndarray, what: str) -> np.ndarray:
    """Pixel data -> float32 in [0, 1]: integers are scaled by their type's range, floats must already be."""
    if a.dtype == np.bool_:
        return a.astype(np.float32)
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    if a.dtype == np.uint16:
        return a.astype(np.float32) / 65535.0
    if not np.issubdtype(a.dtype, np.floating):
        raise InputError(f"{what} has dtype {a.dtype}; expected {_ACCEPTED}")
    a = a.astype(np.float32)
    if not np.isfinite(a).all():
        raise InputError(f"{what} contains NaN or Inf values; expected pixel values in [0, 1]")
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if lo < -RANGE_TOLERANCE or hi > 1.0 + RANGE_TOLERANCE:
        raise InputError(f"{what} holds floats in [{lo:.3g}, {hi:.3g}]; expected [0, 1]. For 0..255 data pass "
                         "uint8 values (or divide by 255); for [-1, 1] data pass (x + 1) / 2.")
    return np.clip(a, 0.0, 1.0)


def _array_to_pil(a: np.ndarray, what: str) -> Image.Image:
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)  # CHW -> HWC
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        hint = " (a batch: pass its images one by one)" if a.ndim == 4 else ""
        raise InputError(f"{what} has shape {tuple(a.shape)}{hint}; expected {_ACCEPTED}")
    if min(a.shape[:2]) < 1:
        raise InputError(f"{what} is empty: shape {tuple(a.shape)}")
    u8 = (_as_unit_float(a, what) * 255.0 + 0.5).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(u8))


def to_pil(image, what: str = "image") -> Image.Image:
    """PIL images pass through (16-bit ones scaled to 8 bits); tensors / arrays are converted by dtype:
    floats must be in [0, 1], uint8 and uint16 are scaled by their range. Anything ambiguous is refused."""
    if isinstance(image, Image.Image):
        return _pil_to_8bit(image, what)
    if isinstance(image, Tensor):
        t = image.detach().cpu()
        if t.dtype == torch.uint16:
            t = t.to(torch.int32)
            return _array_to_pil(t.numpy().astype(np.uint16), what)
        if t.is_floating_point() and t.dtype != torch.float32:
            t = t.float()
        return _array_to_pil(t.numpy(), what)
    if isinstance(image, np.ndarray):
        return _array_to_pil(image, what)
    raise InputError(f"{what} is a {type(image).__name__}; expected {_ACCEPTED}")


def _pil_to_8bit(img: Image.Image, what: str) -> Image.Image:
    """16/32-bit integer and float PIL modes: PIL's own convert('RGB') clips them (a 16-bit PNG turns white)."""
    if img.mode.startswith("I;16"):
        return _array_to_pil(np.asarray(img).astype(np.uint16), what)
    if img.mode == "I":  # how Pillow opens 16-bit greyscale PNGs: 32-bit ints holding 0..65535
        a = np.asarray(img)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise InputError(f"{what} is a 32-bit integer image with values in [{a.min()}, {a.max()}]; expected "
                             "16-bit data (0..65535). Convert it to 8 or 16 bits first.")
        return _array_to_pil(a.astype(np.uint16), what)
    if img.mode == "F":
        return _array_to_pil(np.asarray(img, dtype=np.float32), what)
    return img


def open_image(path, load: bool = True) -> Image.Image:
    """A picture file as PIL; load=False reads only its header (size, format): cheap enough to check thousands
    of files up front, while a file whose pixel data is corrupt only fails when it is loaded."""
    try:
        img = Image.open(path)
        if load:
            img.load()
        else:
            img.close()  # size and mode stay readable; the file handle is not kept open
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise KontextError(f"{path}: cannot read the image ({e})") from None
    return img


def flatten_alpha(img: Image.Image, background=(255, 255, 255)) -> Image.Image:
    """RGB image; transparent pixels are composited on `background` instead of keeping garbage colour."""
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, background + (255,))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")


def check_resize_mode(mode: str) -> str:
    if mode not in RESIZE_MODES:
        raise InputError(f"unknown resize mode '{mode}'; choose one of {', '.join(RESIZE_MODES)}")
    return mode


def fit(img: Image.Image, size: tuple[int, int], mode: str = "stretch", pad_color=(0, 0, 0)) -> Image.Image:
    """Resize a PIL image to size=(w, h): stretch, crop (cover then centre-crop), or pad (contain then pad)."""
    check_resize_mode(mode)
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


def tensor_to_uint8(x: Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, as a PNG stores it."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def tensor_to_pil(x: Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images."""
    return [Image.fromarray(a) for a in tensor_to_uint8(x)]


def prepare_image(image, mode: str = "stretch", size: tuple[int, int] | None = None,
                  what: str = "image") -> Tensor:
    """PIL / tensor in [0, 1] -> (1, 3, H, W) in [-1, 1] at `size` or the size `mode` picks (within the
    engine's pixel limit: 'keep' on a huge image is refused before anything large is allocated)."""
    check_resize_mode(mode)
    img = flatten_alpha(to_pil(image, what))
    size = size or target_size(*img.size, mode)
    check_size(*size, what=f"{what} ({img.size[0]}x{img.size[1]}, resize '{mode}') working size",
               hint="; resize it with 'stretch' (Kontext's own sizes) or downscale it first")
    return pil_to_tensor(fit(img, size, mode))
