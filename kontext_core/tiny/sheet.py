"""Contact sheets: rows of (context · instruction · output · exact target) images with their verdicts."""

from __future__ import annotations

import textwrap

import numpy as np
from PIL import Image, ImageDraw

SCALE = 2


def _tile(img: np.ndarray) -> Image.Image:
    im = Image.fromarray(img)
    return im.resize((im.width * SCALE, im.height * SCALE), Image.NEAREST)


def contact_sheet(rows, path, title: str = "") -> None:
    """rows: dicts with 'context', 'output' (uint8 HxWx3), optional 'target', 'instruction', 'verdict', 'ok'."""
    if not rows:
        return
    side = rows[0]["context"].shape[0] * SCALE
    text_w, pad, head = 220, 6, 22 if title else 0
    cols = 3 if any("target" in r for r in rows) else 2
    width = pad + cols * (side + pad) + text_w
    sheet = Image.new("RGB", (width, head + len(rows) * (side + pad) + pad + 14), "white")
    d = ImageDraw.Draw(sheet)
    if title:
        d.text((pad, 4), title, fill="black")
    labels = ["context", "output", "exact target"][:cols]
    for i, lab in enumerate(labels):
        d.text((pad + i * (side + pad), head), lab, fill=(90, 90, 90))
    for r, row in enumerate(rows):
        y = head + 14 + r * (side + pad)
        images = [row["context"], row["output"]] + ([row["target"]] if cols == 3 else [])
        for i, img in enumerate(images):
            if img is not None:
                sheet.paste(_tile(img), (pad + i * (side + pad), y))
        x = pad + cols * (side + pad)
        ok = row.get("ok")
        colour = (20, 130, 40) if ok else (200, 30, 30) if ok is not None else (0, 0, 0)
        lines = textwrap.wrap(row.get("instruction", ""), 32)
        if row.get("verdict"):
            lines += textwrap.wrap(row["verdict"], 34)
        for j, line in enumerate(lines[: side // 12]):
            d.text((x, y + 2 + 12 * j), line, fill=colour if j >= len(lines) - 2 and row.get("verdict") else "black")
    sheet.save(path)
