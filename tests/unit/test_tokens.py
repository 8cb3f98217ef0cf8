import pytest
import torch

from kontext_core import tokens as tok
from kontext_core.errors import InputError


@pytest.mark.parametrize("h,w", [(8, 8), (9, 7), (1, 1), (6, 11)])
def test_pack_unpack_round_trip(h, w):
    x = torch.randn(2, 16, h, w)
    t = tok.pack(x)
    assert t.shape == (2, ((h + 1) // 2) * ((w + 1) // 2), 64)
    assert torch.equal(tok.unpack(t, h, w), x)


def test_pack_layout_is_channel_major_2x2():
    # token 0 holds x[c, 0:2, 0:2] flattened as (c, ph, pw) — the layout the BFL/diffusers weights expect.
    x = torch.arange(16 * 4 * 4, dtype=torch.float32).reshape(1, 16, 4, 4)
    t = tok.pack(x)
    expect = x[0, :, 0:2, 0:2].reshape(-1)
    assert torch.equal(t[0, 0], expect)
    assert torch.equal(t[0, 1], x[0, :, 0:2, 2:4].reshape(-1))


def test_odd_sizes_pad_circularly():
    x = torch.randn(1, 16, 3, 3)
    t = tok.pack(x)
    padded = torch.nn.functional.pad(x, (0, 1, 0, 1), mode="circular")
    assert torch.equal(t, tok.pack(padded))
    assert torch.equal(padded[..., 3, :3], x[..., 0, :])


def test_target_and_single_reference_ids():
    x = torch.zeros(1, 16, 4, 6)
    ref = torch.zeros(1, 16, 4, 6)
    _, ids, n = tok.kontext_tokens(x, [ref])
    assert n == 6
    tgt, ctx = ids[0, :n], ids[0, n:]
    assert torch.equal(tgt[:, 0], torch.zeros(6))
    assert torch.equal(ctx[:, 0], torch.ones(6))
    # row-major (row, col) grids starting at 0 for both (BFL / diffusers Kontext placement)
    assert tgt[:, 1].tolist() == [0, 0, 0, 1, 1, 1] and tgt[:, 2].tolist() == [0, 1, 2, 0, 1, 2]
    assert torch.equal(ctx[:, 1:], tgt[:, 1:])


def test_offset_layout_places_second_reference_beside_first():
    # Two 8x8 refs: the second goes below (canvas stays 16x8 vs 8x16 tie -> below), a third then right.
    places = tok.reference_placements((8, 8), [(8, 8), (8, 8), (8, 8)], "offset")
    assert [p.index for p in places] == [1, 1, 1]
    assert (places[0].row_offset, places[0].col_offset) == (0, 0)
    assert (places[1].row_offset, places[1].col_offset) == (8, 0)
    assert (places[2].row_offset, places[2].col_offset) == (0, 8)


def test_offset_ids_are_in_patch_units():
    x = torch.zeros(1, 16, 4, 4)
    refs = [torch.zeros(1, 16, 4, 4), torch.zeros(1, 16, 4, 4)]
    _, ids, n = tok.kontext_tokens(x, refs, "offset")
    second = ids[0, n + 4:]
    assert second[:, 1].min() == 2 and second[:, 2].min() == 0  # 4 latent rows below = 2 patches


def test_index_and_uxo_layouts():
    p = tok.reference_placements((6, 6), [(4, 4), (4, 4)], "index")
    assert [q.index for q in p] == [1, 2] and all(q.row_offset == q.col_offset == 0 for q in p)
    u = tok.reference_placements((5, 6), [(4, 4), (2, 2)], "uxo")
    assert [q.index for q in u] == [0, 0]
    assert (u[0].row_offset, u[0].col_offset) == (6, 6)  # past the target canvas (5 -> 3 patches = 6 cells)
    assert (u[1].row_offset, u[1].col_offset) == (10, 10)


def test_reference_errors():
    x = torch.zeros(2, 16, 4, 4)
    with pytest.raises(InputError, match="layout"):
        tok.kontext_tokens(x, [torch.zeros(1, 16, 4, 4)], "diagonal")
    with pytest.raises(InputError, match="expected"):
        tok.kontext_tokens(x, [torch.zeros(1, 4, 4, 4)])
    with pytest.raises(InputError, match="batch"):
        tok.kontext_tokens(x, [torch.zeros(3, 16, 4, 4)])
    with pytest.raises(InputError):
        tok.unpack(torch.zeros(1, 5, 64), 4, 4)


def test_reference_batch_of_one_broadcasts():
    x = torch.zeros(2, 16, 4, 4)
    toks, ids, n = tok.kontext_tokens(x, [torch.randn(1, 16, 4, 4)])
    assert toks.shape == (2, 8, 64) and torch.equal(toks[0, n:], toks[1, n:])
