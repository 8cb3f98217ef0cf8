"""Seeded editing triples: (context scene, instruction, target scene), one of nine edit types.

`make_triple(seed)` is a pure function of the seed. Training draws seeds from `TRAIN_SEEDS`; the evaluation uses
`HELD_OUT_SEEDS`, which training never sees.
"""

from __future__ import annotations

import random

import numpy as np
from dataclasses import dataclass, field

from .font import LETTERS
from .scene import (BACKGROUND_COLOURS, DIRECTIONS, EYES, HATS, OBJECT_COLOURS, PLACES, SHAPES, SIZES, Character,
                    Obj, Scene, Sign)

EDIT_TYPES = ("recolour", "remove", "add", "move", "size", "background", "text", "style", "character")
TRAIN_SEEDS = range(0, 1_000_000_000)
HELD_OUT_SEEDS = range(1_000_000_000, 1_100_000_000)


SCENE_NODE_SEED_BASE = HELD_OUT_SEEDS.start + 8_000_000
DEFAULT_SCENE = (3, "recolour")  # what the Kontext-Tiny Scene node and workflow start with


@dataclass(frozen=True)
class Triple:
    seed: int
    kind: str
    context: Scene
    target: Scene
    instruction: str
    info: dict = field(default_factory=dict, compare=False)  # what changed: element key, colour, text, ...


_RECOLOUR = ["make the {shape} {colour}", "make the {old} {shape} {colour}", "turn the {shape} {colour}",
             "change the colour of the {shape} to {colour}", "paint the {old} {shape} {colour}",
             "recolour the {shape} {colour}"]
_REMOVE = ["remove the {shape}", "remove the {old} {shape}", "delete the {shape}", "erase the {old} {shape}",
           "take away the {shape}", "get rid of the {shape}"]
_ADD = ["add a {colour} {shape} at the {place}", "put a {colour} {shape} at the {place}",
        "draw a {colour} {shape} in the {place}", "add a {colour} {shape} to the {place}",
        "place a {colour} {shape} at the {place}"]
_MOVE = ["move the {shape} {dir}", "move the {old} {shape} {dir}", "shift the {shape} {dir}",
         "move the {shape} one step {dir}", "push the {old} {shape} {dir}"]
_BIGGER = ["make the {shape} bigger", "make the {old} {shape} larger", "enlarge the {shape}", "grow the {shape}"]
_SMALLER = ["make the {shape} smaller", "make the {old} {shape} smaller", "shrink the {shape}",
            "reduce the size of the {shape}"]
_BACKGROUND = ["make the background {colour}", "change the background to {colour}", "paint the background {colour}",
               "use a {colour} background", "set the background colour to {colour}"]
_TEXT = ["replace the sign's text with {text}", "change the sign to say {text}", "write {text} on the sign",
         "make the sign read {text}", "the sign should say {text}"]
_GRAY = ["make it black and white", "convert the image to grayscale", "make the picture grayscale",
         "remove all the colours", "turn the image gray scale"]
_INVERT = ["invert the colours", "invert the image", "make a negative of the picture", "turn it into a negative"]
_CHAR = ["give the character a {colour} hat", "put a {colour} hat on the character",
         "make the character's hat {colour}", "dress the character in a {colour} hat",
         "change the character's hat to {colour}"]


def _random_scene(rng: random.Random, size: int, *, sign: bool | None = None, character: bool | None = None,
                  min_objects: int = 1, free_cells: int = 0) -> Scene:
    cells = list(range(9))
    rng.shuffle(cells)
    bg = rng.choice(sorted(BACKGROUND_COLOURS))
    has_sign = rng.random() < 0.3 if sign is None else sign
    has_char = rng.random() < 0.3 if character is None else character
    budget = 9 - free_cells - int(has_sign) - int(has_char)
    n_obj = rng.randint(min_objects, max(min_objects, min(4, budget)))
    shapes = rng.sample(SHAPES, n_obj)
    objs = tuple(Obj(s, rng.choice(sorted(OBJECT_COLOURS)), cells.pop(), rng.choice(SIZES)) for s in shapes)
    sg = Sign(_random_text(rng), cells.pop()) if has_sign else None
    ch = None
    if has_char:
        hat = rng.choice(HATS)
        ch = Character(rng.choice(EYES), hat, rng.choice(sorted(OBJECT_COLOURS)), cells.pop())
    return Scene(bg, objs, sg, ch, None, size)


def _random_text(rng: random.Random) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(1, 2)))


def _free_neighbour(scene: Scene, o: Obj, direction: str) -> int | None:
    r, c = divmod(o.cell, 3)
    dr, dc = DIRECTIONS[direction]
    r, c = r + dr, c + dc
    if not (0 <= r < 3 and 0 <= c < 3):
        return None
    cell = 3 * r + c
    return None if cell in scene.used_cells() else cell


def _swap(objects, old: Obj, new: Obj | None) -> tuple[Obj, ...]:
    return tuple(o for o in (new if x == old else x for x in objects) if o is not None)


def make_triple(seed: int, size: int = 64, kind: str | None = None) -> Triple:
    """The editing triple of `seed` (its edit type drawn from the seed unless `kind` is given)."""
    rng = random.Random(f"kontext-tiny:{seed}")
    kind = kind or rng.choice(EDIT_TYPES)
    if kind not in EDIT_TYPES:
        raise ValueError(f"unknown edit type {kind!r}; known: {', '.join(EDIT_TYPES)}")
    for _ in range(100):
        out = _EDITS[kind](rng, _random_scene(rng, size, **_SCENE_NEEDS.get(kind, {})))
        if out is not None:
            ctx, tgt, instruction, info = out
            return Triple(seed, kind, ctx, tgt, instruction, info)
    raise RuntimeError(f"could not build a {kind} edit for seed {seed}")  # pragma: no cover


def _recolour(rng, s):
    if not s.objects:
        return None
    o = rng.choice(s.objects)
    colour = rng.choice([c for c in sorted(OBJECT_COLOURS) if c != o.colour])
    new = Obj(o.shape, colour, o.cell, o.size)
    text = rng.choice(_RECOLOUR).format(shape=o.shape, old=o.colour, colour=colour)
    return s, s.replace(objects=_swap(s.objects, o, new)), text, {"key": f"obj:{o.shape}", "colour": colour}


def _remove(rng, s):
    if not s.objects:
        return None
    o = rng.choice(s.objects)
    text = rng.choice(_REMOVE).format(shape=o.shape, old=o.colour)
    return s, s.replace(objects=_swap(s.objects, o, None)), text, {"key": f"obj:{o.shape}"}


def _add(rng, s):
    missing = [sh for sh in SHAPES if s.obj(sh) is None]
    free = [c for c in range(9) if c not in s.used_cells()]
    if not missing or not free:
        return None
    o = Obj(rng.choice(missing), rng.choice(sorted(OBJECT_COLOURS)), rng.choice(free), "medium")
    text = rng.choice(_ADD).format(colour=o.colour, shape=o.shape, place=PLACES[o.cell])
    return s, s.replace(objects=s.objects + (o,)), text, {"key": f"obj:{o.shape}", "colour": o.colour}


def _move(rng, s):
    options = [(o, d, c) for o in s.objects for d in DIRECTIONS if (c := _free_neighbour(s, o, d)) is not None]
    if not options:
        return None
    o, d, cell = rng.choice(options)
    new = Obj(o.shape, o.colour, cell, o.size)
    text = rng.choice(_MOVE).format(shape=o.shape, old=o.colour, dir=d)
    return s, s.replace(objects=_swap(s.objects, o, new)), text, {"key": f"obj:{o.shape}", "colour": o.colour}


def _size(rng, s):
    if not s.objects:
        return None
    o = rng.choice(s.objects)
    i = SIZES.index(o.size)
    bigger = i == 0 or (i == 1 and rng.random() < 0.5)
    new = Obj(o.shape, o.colour, o.cell, SIZES[i + 1 if bigger else i - 1])
    text = rng.choice(_BIGGER if bigger else _SMALLER).format(shape=o.shape, old=o.colour)
    return s, s.replace(objects=_swap(s.objects, o, new)), text, {"key": f"obj:{o.shape}", "colour": o.colour}


def _background(rng, s):
    colour = rng.choice([c for c in sorted(BACKGROUND_COLOURS) if c != s.background])
    text = rng.choice(_BACKGROUND).format(colour=colour)
    return s, s.replace(background=colour), text, {"colour": colour}


def _text(rng, s):
    if s.sign is None:
        return None
    new = _random_text(rng)
    if new == s.sign.text:
        return None
    text = rng.choice(_TEXT).format(text=new)
    return s, s.replace(sign=Sign(new, s.sign.cell)), text, {"text": new}


def _style(rng, s):
    style = rng.choice(("grayscale", "invert"))
    if _barely_changes(s, s.replace(style=style)):
        return None
    text = rng.choice(_GRAY if style == "grayscale" else _INVERT)
    return s, s.replace(style=style), text, {"style": style}


def _character(rng, s):
    ch = s.character
    if ch is None:
        return None
    colour = rng.choice([c for c in sorted(OBJECT_COLOURS) if c != ch.hat_colour or ch.hat == "none"])
    new = Character(ch.eyes, "cap" if ch.hat == "none" else ch.hat, colour, ch.cell)
    text = rng.choice(_CHAR).format(colour=colour)
    return s, s.replace(character=new), text, {"colour": colour, "eyes": ch.eyes, "hat": new.hat}


def scene_triple(seed: int, kind: str) -> "Triple":
    """The held-out triple the ComfyUI Scene node shows for (seed, edit type); tests score its edits."""
    return make_triple(SCENE_NODE_SEED_BASE + seed, kind=kind)


# What the scene of an edit type must offer (objects are always there; add/move need a free cell).
_SCENE_NEEDS = {"add": {"free_cells": 1}, "move": {"free_cells": 1}, "text": {"sign": True},
                "character": {"character": True}}
CHAIN_TYPES = tuple(k for k in EDIT_TYPES if k != "style")  # a global filter would end what later turns test


def make_chain(seed: int, turns: int = 5, size: int = 64, kinds=CHAIN_TYPES) -> list[Triple]:
    """`turns` edits in a row on one scene: each triple's context is the previous triple's target."""
    rng = random.Random(f"kontext-tiny-chain:{seed}")
    scene = _random_scene(rng, size, sign=True, character=True, free_cells=2)
    out: list[Triple] = []
    while len(out) < turns:
        kind = rng.choice(kinds)
        step = _EDITS[kind](rng, scene)
        if step is None:
            continue
        ctx, tgt, instruction, info = step
        out.append(Triple(seed, kind, ctx, tgt, instruction, info))
        scene = tgt
    return out


def _barely_changes(a: Scene, b: Scene) -> bool:
    """True when a global edit would hardly be visible (e.g. grayscale of a gray scene): PSNR > 20 dB."""
    from .scene import render

    d = render(a).image.astype(np.float64) - render(b).image
    return float(np.mean(d ** 2)) < 255.0 ** 2 / 100.0


_EDITS = {"recolour": _recolour, "remove": _remove, "add": _add, "move": _move, "size": _size,
          "background": _background, "text": _text, "style": _style, "character": _character}


def vocabulary() -> list[str]:
    """Every word the instruction templates can produce (letters of sign texts are spelled one per token)."""
    words: set[str] = set()
    for group in (_RECOLOUR, _REMOVE, _ADD, _MOVE, _BIGGER, _SMALLER, _BACKGROUND, _TEXT, _GRAY, _INVERT, _CHAR):
        for t in group:
            words.update(w for w in t.replace("'", " '").split() if not w.startswith("{"))
    words.update(SHAPES)
    words.update(OBJECT_COLOURS)
    words.update(BACKGROUND_COLOURS)
    for p in PLACES:
        words.update(p.split())
    words.update(DIRECTIONS)
    words.update(LETTERS)
    return sorted(words)
