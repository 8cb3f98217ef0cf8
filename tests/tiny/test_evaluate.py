"""The evaluation's success tests pass exact targets and fail wrong outputs (computed from scenes, not a model)."""

import numpy as np
import pytest

from kontext_core.tiny.edits import EDIT_TYPES, HELD_OUT_SEEDS, make_triple
from kontext_core.tiny.evaluate import psnr, read_eyes, read_sign, score, summarize
from kontext_core.tiny.scene import OBJECT_COLOURS, Character, Obj, Scene, Sign, render


def _triples(kind, n=25):
    return [make_triple(HELD_OUT_SEEDS.start + 500_000 + i, kind=kind) for i in range(n)]


@pytest.mark.parametrize("kind", EDIT_TYPES)
def test_exact_target_succeeds(kind):
    for t in _triples(kind):
        s = score(t, render(t.target).image)
        assert s.success, (t.instruction, s)


@pytest.mark.parametrize("kind", EDIT_TYPES)
def test_unedited_context_fails(kind):
    for t in _triples(kind):
        s = score(t, render(t.context).image)
        assert not s.success, (t.instruction, s)


def test_recolour_to_the_wrong_colour_fails():
    t = next(t for t in _triples("recolour") if t.info["colour"] != "green")
    key = t.info["key"].split(":")[1]
    o = t.target.obj(key)
    wrong = t.target.replace(objects=tuple(Obj(x.shape, "green", x.cell, x.size) if x.shape == key else x
                                           for x in t.target.objects))
    assert o.colour != "green"
    assert not score(t, render(wrong).image).success


def test_edit_that_also_damages_the_rest_fails():
    t = _triples("recolour")[0]
    out = render(t.target).image.copy()
    edited = (render(t.context).image != out).any(-1)
    out[~edited] = 255 - out[~edited]   # the right edit, but everything else inverted
    s = score(t, out)
    assert s.edit_ok and not s.success and s.preservation_db < 10


def test_move_to_the_wrong_place_fails():
    for t in _triples("move", 10):
        o = t.target.obj(t.info["key"].split(":")[1])
        free = [c for c in range(9) if c not in t.target.used_cells()]
        if not free:
            continue
        wrong = t.target.replace(objects=tuple(Obj(x.shape, x.colour, free[0], x.size) if x == o else x
                                               for x in t.target.objects))
        assert not score(t, render(wrong).image).success
        return
    pytest.skip("no free cell in the sampled scenes")


def test_sign_reader_reads_every_letter_pair():
    from kontext_core.tiny.font import LETTERS

    for a in LETTERS:
        for b in LETTERS[::3]:
            s = Scene("beige", sign=Sign(a + b, 4))
            assert read_sign(render(s).image, s) == a + b


def test_eye_reader_tells_identities_apart():
    for eyes in ("dots", "wide", "tall"):
        ch = Character(eyes, "cap", "red", 7)
        assert read_eyes(render(Scene("teal", character=ch)).image, ch) == eyes


def test_psnr_and_summary():
    a = np.zeros((4, 4, 3), np.uint8)
    assert psnr(a, a) == float("inf")
    assert abs(psnr(a, a + 1) - 48.13) < 0.01
    t = _triples("remove", 2)
    scores = [score(x, render(x.target).image) for x in t] + [score(x, render(x.context).image) for x in t]
    summ = summarize(scores)
    assert summ["remove"]["n"] == 4 and summ["remove"]["success"] == 0.5


def test_wrong_output_shape_is_refused():
    t = _triples("recolour", 1)[0]
    with pytest.raises(ValueError, match="shape"):
        score(t, np.zeros((32, 32, 3), np.uint8))
