"""Scene descriptions of the Kontext-Tiny editing task and their exact rendering.

A scene is a background colour plus up to six elements, each in its own cell of a 3x3 grid: objects (a shape in a
named colour and size), at most one sign (1-2 letters of `font`) and at most one character (a face whose identity
is its eye style and hat shape). `render` draws a scene anti-aliased (4x supersampling) and returns, besides the
image, the exact coverage of every element, which is what the evaluation measures against.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image, ImageDraw

from .font import GLYPH_H, GLYPH_W, glyph

OBJECT_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40), "green": (40, 165, 60), "blue": (40, 80, 215), "yellow": (240, 210, 40),
    "orange": (245, 135, 25), "purple": (135, 55, 180), "white": (248, 248, 248), "black": (25, 25, 25),
}
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128), "beige": (225, 205, 160), "pink": (240, 170, 195), "teal": (40, 130, 130),
    "navy": (30, 40, 95), "mint": (170, 230, 190),
}
COLOURS = {**OBJECT_COLOURS, **BACKGROUND_COLOURS}
SHAPES = ("circle", "square", "triangle", "star", "ring")
SIZES = ("small", "medium", "large")
_RADIUS = {"small": 0.27, "medium": 0.36, "large": 0.46}  # in cell widths
PLACES = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
EYES = ("dots", "wide", "tall")
HATS = ("none", "cap", "cone")
SKIN = (250, 205, 160)
INK = (20, 20, 20)
BOARD = (236, 236, 222)
SS = 4  # supersampling factor of the renderer


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    cell: int
    size: str = "medium"


@dataclass(frozen=True)
class Sign:
    text: str
    cell: int


@dataclass(frozen=True)
class Character:
    eyes: str
    hat: str
    hat_colour: str
    cell: int


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[Obj, ...] = ()
    sign: Sign | None = None
    character: Character | None = None
    style: str | None = None  # None | "grayscale" | "invert": a global filter over the rendered picture
    size: int = 64

    def obj(self, shape: str) -> Obj | None:
        return next((o for o in self.objects if o.shape == shape), None)

    def used_cells(self) -> set[int]:
        cells = {o.cell for o in self.objects}
        if self.sign:
            cells.add(self.sign.cell)
        if self.character:
            cells.add(self.character.cell)
        return cells

    def replace(self, **kw) -> "Scene":
        return replace(self, **kw)


def cell_box(cell: int, size: int) -> tuple[float, float, float]:
    """(centre x, centre y, cell width) in pixels of grid cell 0..8 (row-major)."""
    r, c = divmod(cell, 3)
    w = size / 3.0
    return (c + 0.5) * w, (r + 0.5) * w, w


def _canvas(size: int):
    img = Image.new("L", (size * SS, size * SS), 0)
    return img, ImageDraw.Draw(img)


def _coverage(img: Image.Image, size: int) -> np.ndarray:
    a = np.asarray(img, dtype=np.float32).reshape(size, SS, size, SS) / 255.0
    return a.mean(axis=(1, 3))


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    pts = []
    for i in range(10):
        rad = r if i % 2 == 0 else 0.45 * r
        a = -np.pi / 2 + i * np.pi / 5
        pts.append((cx + rad * np.cos(a), cy + rad * np.sin(a) + 0.08 * r))
    return pts


def object_coverage(o: Obj, size: int) -> np.ndarray:
    cx, cy, w = cell_box(o.cell, size)
    cx, cy, r = cx * SS, cy * SS, _RADIUS[o.size] * w * SS
    img, d = _canvas(size)
    if o.shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif o.shape == "square":
        h = 0.82 * r
        d.rectangle([cx - h, cy - h, cx + h, cy + h], fill=255)
    elif o.shape == "triangle":
        d.polygon([(cx, cy - r), (cx - 0.95 * r, cy + 0.8 * r), (cx + 0.95 * r, cy + 0.8 * r)], fill=255)
    elif o.shape == "star":
        d.polygon(_star(cx, cy, 1.1 * r), fill=255)
    elif o.shape == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        ri = 0.5 * r
        d.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=0)
    else:
        raise ValueError(f"unknown shape {o.shape!r}; known: {SHAPES}")
    return _coverage(img, size)


def _unit(size: int) -> int:
    """Pixels per font/eye dot: 2 at 64x64, 4 at 128x128."""
    return max(1, size // 32)


def sign_layout(sign: Sign, size: int) -> tuple[tuple[int, int, int, int], list[tuple[int, int]]]:
    """Board box (x0, y0, x1, y1) and the top-left pixel of each glyph, all on the pixel grid."""
    g = _unit(size)
    n = len(sign.text)
    tw = n * GLYPH_W * g + (n - 1) * g
    bw, bh = tw + 2 * g, GLYPH_H * g + 2 * g
    cx, cy, _ = cell_box(sign.cell, size)
    x0, y0 = int(round(cx - bw / 2)), int(round(cy - bh / 2))
    glyphs = [(x0 + g + i * (GLYPH_W + 1) * g, y0 + g) for i in range(n)]
    return (x0, y0, x0 + bw, y0 + bh), glyphs


def _pixel_rects(size: int, rects) -> np.ndarray:
    cov = np.zeros((size, size), np.float32)
    for x0, y0, x1, y1 in rects:
        cov[max(0, y0):max(0, y1), max(0, x0):max(0, x1)] = 1.0
    return cov


def sign_coverages(sign: Sign, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(board, text) coverage."""
    (x0, y0, x1, y1), origins = sign_layout(sign, size)
    g = _unit(size)
    rects = []
    for letter, (gx, gy) in zip(sign.text, origins):
        for r, c in zip(*np.nonzero(glyph(letter))):
            rects.append((gx + c * g, gy + r * g, gx + (c + 1) * g, gy + (r + 1) * g))
    return _pixel_rects(size, [(x0, y0, x1, y1)]), _pixel_rects(size, rects)


def face_geometry(ch: Character, size: int) -> tuple[float, float, float]:
    cx, cy, w = cell_box(ch.cell, size)
    return cx, cy + 0.12 * w, 0.3 * w


def eye_rects(ch: Character, size: int) -> list[tuple[int, int, int, int]]:
    fx, fy, r = face_geometry(ch, size)
    e = _unit(size) // 2 or 1
    w, h = {"dots": (2, 2), "wide": (4, 2), "tall": (2, 4)}[ch.eyes]
    w, h = w * e, h * e
    out = []
    for side in (-1, 1):
        ex, ey = fx + side * 0.42 * r, fy - 0.2 * r
        x0, y0 = int(round(ex - w / 2)), int(round(ey - h / 2))
        out.append((x0, y0, x0 + w, y0 + h))
    return out


def character_coverages(ch: Character, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(face, eyes, hat) coverage; hat is all zeros for hat='none'."""
    fx, fy, r = face_geometry(ch, size)
    img, d = _canvas(size)
    d.ellipse([(fx - r) * SS, (fy - r) * SS, (fx + r) * SS, (fy + r) * SS], fill=255)
    face = _coverage(img, size)
    eyes = _pixel_rects(size, eye_rects(ch, size))
    img, d = _canvas(size)
    top = fy - 0.85 * r
    if ch.hat == "cap":
        d.rectangle([(fx - 0.8 * r) * SS, (top - 0.55 * r) * SS, (fx + 0.8 * r) * SS, top * SS], fill=255)
        d.rectangle([(fx - 1.15 * r) * SS, (top - 0.05 * r) * SS, (fx + 1.15 * r) * SS, (top + 0.2 * r) * SS],
                    fill=255)
    elif ch.hat == "cone":
        d.polygon([(fx * SS, (top - 1.0 * r) * SS), ((fx - 0.8 * r) * SS, (top + 0.15 * r) * SS),
                   ((fx + 0.8 * r) * SS, (top + 0.15 * r) * SS)], fill=255)
    elif ch.hat != "none":
        raise ValueError(f"unknown hat {ch.hat!r}; known: {HATS}")
    return face, eyes, _coverage(img, size)


@dataclass
class Rendering:
    image: np.ndarray                       # (S, S, 3) uint8
    layers: dict[str, np.ndarray] = field(default_factory=dict)  # element key -> coverage (S, S) in [0, 1]

    def mask(self, key: str, threshold: float = 0.5) -> np.ndarray:
        return self.layers[key] > threshold

    def foreground(self) -> np.ndarray:
        """Coverage of everything that is not background."""
        keys = [k for k in self.layers if k.count(":") <= 1 and not k.startswith(("sign:", "char:"))]
        cov = np.zeros(self.image.shape[:2], np.float32)
        for k in keys:
            cov = np.maximum(cov, self.layers[k])
        return cov


def apply_style(img: np.ndarray, style: str | None) -> np.ndarray:
    if style is None:
        return img
    if style == "grayscale":
        y = img.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        return np.repeat(np.clip(np.round(y), 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    if style == "invert":
        return 255 - img
    raise ValueError(f"unknown style {style!r}; known: grayscale, invert")


def render(scene: Scene) -> Rendering:
    s = scene.size
    canvas = np.empty((s, s, 3), np.float32)
    canvas[:] = COLOURS[scene.background]
    layers: dict[str, np.ndarray] = {}

    def paint(cov: np.ndarray, rgb) -> None:
        canvas[:] = canvas * (1.0 - cov[..., None]) + np.asarray(rgb, np.float32) * cov[..., None]

    for o in scene.objects:
        cov = object_coverage(o, s)
        layers[f"obj:{o.shape}"] = cov
        paint(cov, OBJECT_COLOURS[o.colour])
    if scene.sign is not None:
        board, text = sign_coverages(scene.sign, s)
        layers["sign"], layers["sign:text"] = board, text
        paint(board, BOARD)
        paint(text, INK)
    if scene.character is not None:
        face, eyes, hat = character_coverages(scene.character, s)
        layers["char"] = np.maximum(face, hat)
        layers["char:face"], layers["char:eyes"], layers["char:hat"] = face, eyes, hat
        paint(face, SKIN)
        paint(eyes, INK)
        if scene.character.hat != "none":
            paint(hat, OBJECT_COLOURS[scene.character.hat_colour])
    img = np.clip(np.round(canvas), 0, 255).astype(np.uint8)
    return Rendering(apply_style(img, scene.style), layers)
