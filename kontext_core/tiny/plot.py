"""Minimal line plots with PIL (no plotting dependency): loss curves and per-turn metrics."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]


def _smooth(y: np.ndarray, k: int) -> np.ndarray:
    if k <= 1 or len(y) < k:
        return y
    c = np.cumsum(np.insert(y, 0, 0.0))
    s = (c[k:] - c[:-k]) / k
    return np.concatenate([y[: k - 1], s])


def line_plot(panels, path, *, log_y: bool = False, smooth: int = 1, size=(520, 300), series_of=None) -> None:
    """panels: list of (title, x, y) or (title, [(label, x, y), ...]); one panel per row."""
    w, h = size
    img = Image.new("RGB", (w, h * len(panels)), "white")
    d = ImageDraw.Draw(img)
    for p, panel in enumerate(panels):
        title = panel[0]
        series = panel[1] if len(panel) == 2 else [("", panel[1], panel[2])]
        top = p * h
        x0, y0, x1, y1 = 60, top + 28, w - 15, top + h - 30
        d.text((x0, top + 8), title, fill="black")
        d.rectangle([x0, y0, x1, y1], outline=(120, 120, 120))
        ys = [np.asarray(_smooth(np.asarray(s[2], float), smooth)) for s in series]
        xs = [np.asarray(s[1], float) for s in series]
        f = (lambda v: np.log10(np.maximum(v, 1e-12))) if log_y else (lambda v: v)
        all_y = np.concatenate([f(y) for y in ys]) if ys else np.zeros(1)
        lo, hi = float(np.nanmin(all_y)), float(np.nanmax(all_y))
        hi = hi if hi > lo else lo + 1
        xl, xh = float(min(x.min() for x in xs)), float(max(x.max() for x in xs))
        xh = xh if xh > xl else xl + 1
        for i, tick in enumerate(np.linspace(lo, hi, 5)):
            yy = y1 - (tick - lo) / (hi - lo) * (y1 - y0)
            label = f"{10 ** tick:.3g}" if log_y else f"{tick:.3g}"
            d.text((4, yy - 6), label, fill=(80, 80, 80))
        d.text((x0, y1 + 6), f"{xl:g}", fill=(80, 80, 80))
        d.text((x1 - 40, y1 + 6), f"{xh:g}", fill=(80, 80, 80))
        for k, ((label, _, _), x, y) in enumerate(zip(series, xs, ys)):
            col = _COLOURS[k % len(_COLOURS)]
            pts = [(x0 + (a - xl) / (xh - xl) * (x1 - x0), y1 - (f(b) - lo) / (hi - lo) * (y1 - y0))
                   for a, b in zip(x, y) if not math.isnan(float(b))]
            if len(pts) > 1:
                d.line(pts, fill=col, width=2)
            if label:
                d.text((x1 - 170, y0 + 6 + 14 * k), label, fill=col)
    img.save(path)
