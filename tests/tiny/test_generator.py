"""Kontext-Tiny's data: seeded, exact, and the held-out range never overlaps training."""

import numpy as np
import pytest

from kontext_core.tiny.edits import (CHAIN_TYPES, EDIT_TYPES, HELD_OUT_SEEDS, TRAIN_SEEDS, make_chain, make_triple,
                                     vocabulary)
from kontext_core.tiny.font import LETTERS, glyph
from kontext_core.tiny.scene import OBJECT_COLOURS, Obj, Scene, Sign, apply_style, render


def test_same_seed_same_triple_and_pixels():
    a, b = make_triple(123), make_triple(123)
    assert a == b
    assert np.array_equal(render(a.context).image, render(b.context).image)
    assert make_triple(124) != a


def test_every_edit_type_is_generated_and_changes_the_picture():
    for k, kind in enumerate(EDIT_TYPES):
        for i in range(15):
            t = make_triple(HELD_OUT_SEEDS.start + 50 * k + i, kind=kind)
            assert t.kind == kind and t.instruction
            assert not np.array_equal(render(t.context).image, render(t.target).image), t


def test_seed_ranges_are_disjoint():
    assert TRAIN_SEEDS.stop <= HELD_OUT_SEEDS.start


def test_recolour_target_is_exact():
    s = Scene("gray", (Obj("square", "red", 4, "medium"),))
    img = render(s.replace(objects=(Obj("square", "blue", 4, "medium"),))).image
    assert tuple(img[32, 32]) == OBJECT_COLOURS["blue"]       # centre of the square
    assert tuple(img[2, 2]) == (128, 128, 128)                 # background untouched


def test_masks_are_the_painted_pixels():
    s = Scene("navy", (Obj("circle", "yellow", 0, "large"),))
    r = render(s)
    inside = r.layers["obj:circle"] > 0.99
    assert inside.sum() > 50
    assert (r.image[inside] == OBJECT_COLOURS["yellow"]).all()
    assert (r.image[r.layers["obj:circle"] == 0] == (30, 40, 95)).all()


def test_sign_glyphs_are_drawn_from_the_font():
    s = Scene("gray", sign=Sign("HT", 4))
    r = render(s)
    text = r.layers["sign:text"] > 0.5
    expected_ink = (glyph("H").sum() + glyph("T").sum()) * 4   # 2x2 pixels per font dot at 64x64
    assert text.sum() == expected_ink


def test_styles_are_exact_filters():
    img = render(make_triple(5, kind="recolour").context).image
    assert np.array_equal(apply_style(img, "invert"), 255 - img)
    g = apply_style(img, "grayscale")
    assert (g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all()


def test_chain_turns_follow_each_other():
    chain = make_chain(HELD_OUT_SEEDS.start + 1, turns=6)
    assert len(chain) == 6
    for a, b in zip(chain, chain[1:]):
        assert b.context == a.target
    assert all(t.kind in CHAIN_TYPES for t in chain)


def test_vocabulary_covers_every_instruction():
    from kontext_core.tiny.text_encoder import Tokenizer

    tok = Tokenizer(vocabulary(), 16)
    for seed in range(300):
        t = make_triple(HELD_OUT_SEEDS.start + seed)
        assert tok.unknown_words(t.instruction) == [], t.instruction
        assert len(tok.words(t.instruction)) <= 16


def test_unknown_letter_is_refused():
    with pytest.raises(ValueError, match="not in the Kontext-Tiny font"):
        glyph("Q" if "Q" not in LETTERS else "?")
