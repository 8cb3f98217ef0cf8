"""A 3x5 bitmap font for the signs of Kontext-Tiny scenes (and for reading them back in the evaluation)."""

from __future__ import annotations

import numpy as np

# Letters chosen to be distinguishable at 3x5 after an 8x-downsampling autoencoder: no pairs that differ in a
# single pixel (e.g. O/D, I/T are left out).
_GLYPHS = {
    "A": ["010", "101", "111", "101", "101"],
    "C": ["011", "100", "100", "100", "011"],
    "E": ["111", "100", "110", "100", "111"],
    "F": ["111", "100", "110", "100", "100"],
    "H": ["101", "101", "111", "101", "101"],
    "K": ["101", "110", "100", "110", "101"],
    "L": ["100", "100", "100", "100", "111"],
    "N": ["110", "101", "101", "101", "101"],
    "O": ["111", "101", "101", "101", "111"],
    "P": ["110", "101", "110", "100", "100"],
    "T": ["111", "010", "010", "010", "010"],
    "U": ["101", "101", "101", "101", "011"],
    "X": ["101", "101", "010", "101", "101"],
    "Y": ["101", "101", "010", "010", "010"],
}

LETTERS: tuple[str, ...] = tuple(sorted(_GLYPHS))
GLYPH_W, GLYPH_H = 3, 5


def glyph(letter: str) -> np.ndarray:
    """(5, 3) bool bitmap of one letter."""
    try:
        rows = _GLYPHS[letter]
    except KeyError:
        raise ValueError(f"letter {letter!r} is not in the Kontext-Tiny font ({''.join(LETTERS)})") from None
    return np.array([[c == "1" for c in r] for r in rows], dtype=bool)
