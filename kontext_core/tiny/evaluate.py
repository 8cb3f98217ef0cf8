"""Exact evaluation of an edit, computed from the scene descriptions (masks, colours, glyphs), never from a model.

`score(triple, output)` returns whether the requested edit happened (per-type test below), the PSNR of the
regions the edit must not touch (vs the context image), and the PSNR vs the exact target. The per-type tests:

  recolour    >= 60 % of the object's (eroded) pixels within COLOUR_TOL of the new colour
  remove      >= 70 % of the object's former pixels within COLOUR_TOL of the background colour
  add         pixels of the named colour inside the named cell overlap the exact new shape with IoU >= 0.5
  move        same at the new place (IoU >= 0.5), and >= 60 % of the vacated pixels are background again
  size        IoU with the new size >= 0.6 and larger than the IoU with the old size
  background  >= 80 % of the (eroded) background within COLOUR_TOL of the new colour
  text        the sign's glyphs, read back by template matching at the target layout, spell the new text, and
              >= 85 % of the old and new board area around them shows what the target shows (no old letters)
  style       PSNR vs the exact target >= 22 dB (grayscale also: mean channel spread < 20)
  character   >= 60 % of the hat's pixels in the new colour, and the eyes read back as the original style
Every type except style also needs preservation >= PRESERVE_MIN_DB ("nothing else changed").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..images import tensor_to_uint8
from .edits import EDIT_TYPES as EDIT_ORDER, Triple
from .font import GLYPH_H, GLYPH_W, LETTERS, glyph
from .scene import (BOARD, COLOURS, EYES, INK, Character, Scene, cell_box, eye_rects, render, sign_layout)

COLOUR_TOL = 50.0       # RGB distance; the closest two named colours are ~100 apart
PRESERVE_MIN_DB = 22.0


@dataclass
class Score:
    kind: str
    success: bool
    edit_ok: bool
    preservation_db: float   # PSNR outside the dilated edited region vs the context (nan for global edits)
    target_db: float         # PSNR vs the exact target
    detail: str = ""


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    if mask is not None:
        if not mask.any():
            return float("nan")
        a, b = a[mask], b[mask]
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def near(img: np.ndarray, rgb, tol: float = COLOUR_TOL) -> np.ndarray:
    return np.linalg.norm(img.astype(np.float32) - np.asarray(rgb, np.float32), axis=-1) < tol


def _shift_or(m: np.ndarray, r: int, op) -> np.ndarray:
    out = m.copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            out = op(out, np.roll(np.roll(m, dy, 0), dx, 1))
    return out


def dilate(m: np.ndarray, r: int) -> np.ndarray:
    return _shift_or(np.pad(m, r), r, np.logical_or)[r:-r, r:-r] if r else m


def erode(m: np.ndarray, r: int) -> np.ndarray:
    return ~dilate(~m, r) if r else m


def frac(m: np.ndarray, hits: np.ndarray) -> float:
    return float(hits[m].mean()) if m.any() else 0.0


def iou(a: np.ndarray, b: np.ndarray) -> float:
    u = (a | b).sum()
    return float((a & b).sum() / u) if u else 0.0


def edited_region(ctx, tgt, triple: Triple) -> np.ndarray | None:
    """Pixels the edit may change (None: all of them): where the exact images differ, plus every element whose
    coverage changed (so anti-aliased borders and moved shapes count whole)."""
    if triple.kind == "style":
        return None
    region = (ctx.image != tgt.image).any(-1)
    for key in set(ctx.layers) | set(tgt.layers):
        a, b = ctx.layers.get(key), tgt.layers.get(key)
        if a is None or b is None or np.abs(a - b).max() > 0.01:
            for cov in (a, b):
                if cov is not None:
                    region |= cov > 0.02
    return region


def cell_mask(cell: int, size: int) -> np.ndarray:
    cx, cy, w = cell_box(cell, size)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    return (np.abs(xx - cx) < w / 2) & (np.abs(yy - cy) < w / 2)


def read_sign(img: np.ndarray, scene: Scene) -> str:
    """Template-match each glyph slot of `scene.sign`'s layout against the font."""
    size = img.shape[0]
    _, origins = sign_layout(scene.sign, size)
    g = max(1, size // 32)
    dist_ink = np.linalg.norm(img.astype(np.float32) - np.asarray(INK, np.float32), axis=-1)
    dist_board = np.linalg.norm(img.astype(np.float32) - np.asarray(BOARD, np.float32), axis=-1)
    inkness = dist_board / (dist_ink + dist_board + 1e-6)  # 1 = ink, 0 = board
    out = []
    for gx, gy in origins:
        patch = inkness[gy:gy + GLYPH_H * g, gx:gx + GLYPH_W * g]
        if patch.shape != (GLYPH_H * g, GLYPH_W * g):
            out.append("?")
            continue
        cells = patch.reshape(GLYPH_H, g, GLYPH_W, g).mean(axis=(1, 3))
        errs = {L: float(np.abs(cells - glyph(L)).sum()) for L in LETTERS}
        out.append(min(errs, key=errs.get))
    return "".join(out)


def read_eyes(img: np.ndarray, ch: Character, ctx_img: np.ndarray | None = None) -> str:
    """The eye style whose exact rendering is closest to `img` around the eyes."""
    size = img.shape[0]
    rects = [r for style in EYES for r in eye_rects(Character(style, ch.hat, ch.hat_colour, ch.cell), size)]
    x0 = max(0, min(r[0] for r in rects) - 1)
    y0 = max(0, min(r[1] for r in rects) - 1)
    x1, y1 = max(r[2] for r in rects) + 1, max(r[3] for r in rects) + 1
    errs = {}
    for style in EYES:
        ref = render(Scene("gray", character=Character(style, ch.hat, ch.hat_colour, ch.cell), size=size)).image
        errs[style] = float(np.mean((ref[y0:y1, x0:x1].astype(np.float32) - img[y0:y1, x0:x1]) ** 2))
    return min(errs, key=errs.get)


def score(triple: Triple, output: np.ndarray) -> Score:
    """`output`: (S, S, 3) uint8 image the model produced for `triple` (same size as the scene)."""
    ctx, tgt = render(triple.context), render(triple.target)
    size = tgt.image.shape[0]
    if output.shape != tgt.image.shape:
        raise ValueError(f"output has shape {output.shape}, the scene is {tgt.image.shape}")
    r = max(1, size // 32)
    region = edited_region(ctx, tgt, triple)
    keep = None if region is None else ~dilate(region, r)
    pres = float("nan") if keep is None else psnr(output, ctx.image, keep)
    tdb = psnr(output, tgt.image)
    info, kind = triple.info, triple.kind
    ok, detail = False, ""
    if kind in ("recolour", "add", "move", "size"):
        key, colour = info["key"], COLOURS[info["colour"]]
        new = tgt.mask(key)
        hits = near(output, colour)
        if kind == "recolour":
            f = frac(erode(new, 1), hits)
            ok, detail = f >= 0.6, f"colour match {f:.2f}"
        else:
            cells = [o.cell for o in triple.target.objects if f"obj:{o.shape}" == key]
            cells += [o.cell for o in triple.context.objects if f"obj:{o.shape}" == key]
            area = np.zeros_like(new)
            for c in cells:
                area |= cell_mask(c, size)
            pred = hits & area
            j = iou(pred, new)
            if kind == "add":
                ok, detail = j >= 0.5, f"IoU {j:.2f}"
            elif kind == "move":
                vacated = ctx.mask(key) & ~dilate(new, 1)
                v = frac(vacated, near(output, COLOURS[triple.context.background]))
                ok, detail = j >= 0.5 and v >= 0.6, f"IoU {j:.2f}, vacated bg {v:.2f}"
            else:
                j_old = iou(pred, ctx.mask(key))
                ok, detail = j >= 0.6 and j > j_old, f"IoU new {j:.2f} old {j_old:.2f}"
    elif kind == "remove":
        f = frac(erode(ctx.mask(info["key"]), 1), near(output, COLOURS[triple.context.background]))
        ok, detail = f >= 0.7, f"background match {f:.2f}"
    elif kind == "background":
        f = frac(erode(tgt.foreground() < 0.02, r), near(output, COLOURS[info["colour"]]))
        ok, detail = f >= 0.8, f"background match {f:.2f}"
    elif kind == "text":
        read = read_sign(output, triple.target)
        board, text = tgt.mask("sign"), tgt.mask("sign:text")
        edge = dilate(board & ~erode(board, 1), 1)
        rest = erode(board | ctx.mask("sign"), 1) & ~dilate(text, 1) & ~edge  # old letters must be gone
        agree = np.linalg.norm(output.astype(np.float32) - tgt.image, axis=-1) < COLOUR_TOL
        clean = frac(rest, agree) if rest.any() else 1.0
        ok, detail = read == info["text"] and clean >= 0.85, f"read {read!r}, clean board {clean:.2f}"
    elif kind == "style":
        ok = tdb >= 22.0
        detail = f"PSNR {tdb:.1f}"
        if info["style"] == "grayscale":
            spread = float((output.max(-1).astype(np.int16) - output.min(-1)).mean())
            ok = ok and spread < 20
            detail += f", channel spread {spread:.1f}"
    elif kind == "character":
        f = frac(erode(tgt.mask("char:hat"), 1), near(output, COLOURS[info["colour"]]))
        eyes = read_eyes(output, triple.target.character)
        ok, detail = f >= 0.6 and eyes == info["eyes"], f"hat colour {f:.2f}, eyes {eyes}"
    else:  # pragma: no cover
        raise ValueError(kind)
    preserved = keep is None or not (pres < PRESERVE_MIN_DB)
    return Score(kind, bool(ok and preserved), bool(ok), pres, tdb, detail)


# --- running a model over triples and summarising ------------------------------------------------------------
to_uint8 = tensor_to_uint8  # (B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8; the engine's conversion


def edit_triples(tiny, triples, *, steps: int | None = None, batch: int = 48, seed: int = 0,
                 guidance: float | None = None) -> list[np.ndarray]:
    """Run `tiny` (a `KontextTiny`) on every triple's context and instruction; item i uses seed `seed + i`."""
    import torch

    from . import DEFAULT_GUIDANCE, DEFAULT_STEPS

    outs: list[np.ndarray] = []
    for i in range(0, len(triples), batch):
        chunk = triples[i:i + batch]
        ctx = torch.from_numpy(np.stack([render(t.context).image for t in chunk])).permute(0, 3, 1, 2).float() / 255
        res = tiny.edit(ctx, [t.instruction for t in chunk], steps=steps or DEFAULT_STEPS,
                        guidance=DEFAULT_GUIDANCE if guidance is None else guidance,
                        seed=[seed + i + j for j in range(len(chunk))])
        outs.extend(to_uint8(res.pixels))
    return outs


def summarize(scores: list[Score]) -> dict:
    """Per edit type and overall: n, success rate, edit-only rate, preservation and target PSNR (medians)."""
    def agg(ss: list[Score]) -> dict:
        pres = [s.preservation_db for s in ss if not math.isnan(s.preservation_db)]
        pres = [min(p, 99.0) for p in pres]
        tdb = [min(s.target_db, 99.0) for s in ss]
        return {"n": len(ss), "success": float(np.mean([s.success for s in ss])) if ss else float("nan"),
                "edit_ok": float(np.mean([s.edit_ok for s in ss])) if ss else float("nan"),
                "preservation_db_median": float(np.median(pres)) if pres else float("nan"),
                "preservation_db_mean": float(np.mean(pres)) if pres else float("nan"),
                "target_db_median": float(np.median(tdb)) if tdb else float("nan")}

    kinds = sorted({s.kind for s in scores}, key=lambda k: EDIT_ORDER.index(k) if k in EDIT_ORDER else 99)
    out = {k: agg([s for s in scores if s.kind == k]) for k in kinds}
    out["all"] = agg(scores)
    return out


def summary_table(summary: dict) -> str:
    lines = ["| edit type | n | success | edit done | preservation PSNR (median) | PSNR vs target (median) |",
             "|---|---|---|---|---|---|"]
    for k, v in summary.items():
        lines.append(f"| {k} | {v['n']} | {100 * v['success']:.0f} % | {100 * v['edit_ok']:.0f} % | "
                     f"{v['preservation_db_median']:.1f} dB | {v['target_db_median']:.1f} dB |")
    return "\n".join(lines)


# --- chains: what no turn has edited so far, and global shifts ------------------------------------------------
def chain_keep_masks(chain: list[Triple]) -> list[np.ndarray]:
    """Per turn k: the pixels no turn up to k may have changed (the union of the turns' edited regions, dilated
    like `score` does, inverted). A global edit leaves nothing to keep (all False)."""
    union = None
    out = []
    for t in chain:
        ctx, tgt = render(t.context), render(t.target)
        region = edited_region(ctx, tgt, t)
        if region is None:
            region = np.ones(tgt.image.shape[:2], bool)
        union = region if union is None else union | region
        out.append(~dilate(union, max(1, tgt.image.shape[0] // 32)))
    return out


def global_shift(moved: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(dy, dx) such that `moved` ~ `reference` shifted by (dy, dx) pixels: phase correlation of the grayscale
    images (numpy FFT) with a parabolic sub-pixel refinement of the peak."""
    def gray(a):
        a = np.asarray(a, np.float64)
        a = a.mean(-1) if a.ndim == 3 else a
        return a - a.mean()

    a, b = gray(moved), gray(reference)
    if a.shape != b.shape:
        raise ValueError(f"images differ in size: {a.shape} vs {b.shape}")
    cross = np.fft.fft2(a) * np.conj(np.fft.fft2(b))
    corr = np.real(np.fft.ifft2(cross / (np.abs(cross) + 1e-9)))
    py, px = np.unravel_index(int(np.argmax(corr)), corr.shape)

    def refine(c_m, c_0, c_p):
        den = c_m - 2 * c_0 + c_p
        return 0.0 if abs(den) < 1e-12 else float(np.clip(0.5 * (c_m - c_p) / den, -0.5, 0.5))

    h, w = corr.shape
    dy = py + refine(corr[(py - 1) % h, px], corr[py, px], corr[(py + 1) % h, px])
    dx = px + refine(corr[py, (px - 1) % w], corr[py, px], corr[py, (px + 1) % w])
    dy = dy - h if dy > h / 2 else dy
    dx = dx - w if dx > w / 2 else dx
    return float(dy), float(dx)
