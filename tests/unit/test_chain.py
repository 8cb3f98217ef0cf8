"""Anchored edit chains (kontext_core.chain): exact paste-back, bounded feathering, colour matching that leaves the
edited region alone, the chain's mask and canvas bookkeeping, and paste_back in the standalone edit."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kontext_core import chain as kc
from kontext_core.errors import InputError


class BlockAE(torch.nn.Module):
    """A stand-in autoencoder with a known mapping: a latent cell is the mean colour of its 4x4 pixel block (in
    channels 0-2, zeros elsewhere); decoding repeats the cell's colour over its block."""

    downscale = 4

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def encode(self, x):
        z = F.avg_pool2d(x, 4)
        return torch.cat([z, torch.zeros(z.shape[0], 13, *z.shape[-2:])], 1)

    def decode(self, z):
        return F.interpolate(z[:, :3], scale_factor=4, mode="nearest")


def blocky_image(b=2, h=16, w=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    cells = torch.rand(b, 3, h // 4, w // 4, generator=g) * 1.6 - 0.8
    return F.interpolate(cells, scale_factor=4, mode="nearest")


def test_empty_mask_gives_the_anchor_bit_for_bit():
    g = torch.Generator().manual_seed(1)
    anchor, edited = torch.rand(2, 3, 24, 24, generator=g) * 2 - 1, torch.rand(2, 3, 24, 24, generator=g) * 2 - 1
    empty = torch.zeros(2, 1, 24, 24, dtype=torch.bool)
    for colour_match in (True, False):
        assert torch.equal(kc.composite(edited, anchor, empty, feather_px=3, colour_match=colour_match), anchor)


def test_chain_without_changes_keeps_anchor_latent_and_pixels_exactly():
    ae = BlockAE()
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1           # not blocky: the AE cannot reproduce it
    chain = kc.EditChain.from_pixels(ae, pixels)
    drifted = chain.context + 0.01 * torch.randn_like(chain.context)  # below the threshold everywhere
    step = chain.step(drifted)
    assert not step.changed.any() and not chain.union.any()
    assert torch.equal(chain.context, chain.anchor_latent)
    assert torch.equal(chain.decode(), pixels)


def test_feather_is_one_on_the_mask_zero_beyond_its_radius_and_monotone():
    mask = torch.zeros(1, 1, 32, 32, dtype=torch.bool)
    mask[0, 0, 10:14, 12:20] = True
    for radius in (0, 1, 3, 5):
        a = kc.feather(mask, radius)
        assert a.min() >= 0 and a.max() <= 1
        assert torch.all(a[mask] == 1)
        assert torch.all(a[~kc.dilate(mask, radius)] == 0)
        for r in range(radius):  # each ring farther out weighs strictly less
            inner = kc.dilate(mask, r + 1) & ~kc.dilate(mask, r)
            outer = kc.dilate(mask, r + 2) & ~kc.dilate(mask, r + 1)
            if outer.any():
                assert a[inner].min() > a[outer].max()
    g = torch.Generator().manual_seed(0)
    anchor, edited = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1, torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    out = kc.composite(edited, anchor, mask, feather_px=3, colour_match=False)
    far = ~kc.dilate(mask, 3).expand_as(anchor)
    assert torch.equal(out[far], anchor[far])
    assert torch.equal(out[mask.expand_as(out)], edited[mask.expand_as(out)])


def test_colour_matching_never_changes_the_edited_region_and_removes_the_offset_next_to_it():
    g = torch.Generator().manual_seed(2)
    anchor = torch.rand(2, 3, 32, 32, generator=g) * 1.6 - 0.8
    offset = torch.tensor([0.10, -0.05, 0.20])[None, :, None, None]
    edited = anchor + offset
    region = torch.zeros(2, 1, 32, 32, dtype=torch.bool)
    region[0, 0, 8:20, 8:20] = True
    region[1, 0, 0:5, 20:32] = True
    edited[region.expand_as(edited)] = 0.9                 # the new content: it must stay exactly as edited
    matched = kc.match_colours(edited, anchor, region, band=3)
    inside = region.expand_as(edited)
    assert torch.equal(matched[inside], edited[inside])
    assert torch.allclose(matched[~inside], anchor[~inside], atol=1e-6)
    out = kc.composite(edited, anchor, region, feather_px=3, colour_match=True)
    assert torch.equal(out[inside], edited[inside])


def test_chain_takes_only_changed_cells_and_accumulates_the_union():
    ae = BlockAE()
    pixels = blocky_image()
    chain = kc.EditChain.from_pixels(ae, pixels, grow=0, feather_px=0)
    assert torch.equal(chain.anchor_latent[:, :3], F.avg_pool2d(pixels, 4))
    # turn 1: the model changes latent cell (1, 2) of item 0 and drifts slightly everywhere
    out = chain.context + 0.02
    out[0, :3, 1, 2] = torch.tensor([0.9, -0.9, 0.9])
    s1 = chain.step(out)
    assert s1.changed_latent[0, 0].nonzero().tolist() == [[1, 2]] and not s1.changed_latent[1].any()
    assert s1.changed[0, 0, 4:8, 8:12].all() and s1.changed.sum() == 16
    assert torch.equal(chain.context[0, :, 1, 2], out[0, :, 1, 2])
    untouched = ~s1.changed_latent.expand_as(chain.context)
    assert torch.equal(chain.context[untouched], chain.anchor_latent[untouched])  # the drift was not taken
    # turn 2: cell (3, 0) of item 1 changes; the cell of turn 1 stays as turn 1 made it, despite new drift
    out2 = chain.context - 0.02
    out2[1, :3, 3, 0] = torch.tensor([-0.9, 0.9, 0.0])
    chain.step(out2)
    assert chain.turns == 2
    assert chain.union_latent[0, 0].nonzero().tolist() == [[1, 2]]
    assert chain.union_latent[1, 0].nonzero().tolist() == [[3, 0]]
    assert torch.equal(chain.context[0, :, 1, 2], out[0, :, 1, 2])
    img = chain.decode()
    assert torch.allclose(img[0, :, 4:8, 8:12], torch.tensor([0.9, -0.9, 0.9])[:, None, None].expand(3, 4, 4))
    keep = ~chain.union.expand_as(img)
    assert torch.equal(img[keep], pixels[keep])


def test_grow_latent_estimator_and_user_mask():
    ae = BlockAE()
    pixels = blocky_image(b=1)
    chain = kc.EditChain.from_pixels(ae, pixels, estimator="latent", grow=1, feather_px=0)
    out = chain.context.clone()
    out[0, :, 2, 2] += 1.0
    step = chain.step(out)
    assert step.changed[0, 0, 7:13, 7:13].all() and step.changed.sum() == 36   # the 4x4 block grown by 1 px
    assert step.changed_latent.sum() == 9                                     # ... touches the 8 neighbours
    painted = torch.zeros(1, 1, 16, 16, dtype=torch.bool)
    painted[0, 0, 0, 0] = True
    step = chain.step(chain.context + 5.0, changed=painted)                  # the user's mask wins
    assert step.changed_latent.sum() == 1
    with pytest.raises(InputError, match="estimator"):
        kc.EditChain.from_pixels(ae, pixels, estimator="magic")
    with pytest.raises(InputError, match="does not match"):
        chain.step(torch.zeros(1, 16, 3, 3))


def test_edit_paste_back_keeps_input_pixels_outside_the_change():
    from kontext_core.model.autoencoder import AutoEncoder, AutoEncoderParams
    from kontext_core.model.flux import Flux, FluxParams
    from kontext_core.pipeline import edit

    torch.manual_seed(0)
    params = FluxParams(vec_in_dim=8, context_in_dim=16, hidden_size=32, num_heads=2, depth=1, depth_single_blocks=1,
                        axes_dim=(4, 6, 6))
    transformer = Flux(params).eval()
    ae = AutoEncoder(AutoEncoderParams(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, z_channels=16)).eval()
    with torch.no_grad():
        for p in list(transformer.parameters()) + list(ae.parameters()):
            p.normal_(0, 0.05)
    img = torch.rand(1, 3, 32, 32)
    from kontext_core.images import prepare_image
    given = prepare_image(img, "keep")   # the input as the engine reads it (an 8-bit picture in [-1, 1])
    kw = dict(images=[img], prompt_embeds=torch.randn(1, 4, 16), pooled_prompt_embeds=torch.randn(1, 8), steps=2,
              resize="keep")
    plain = edit(transformer, ae, **kw)
    kept = edit(transformer, ae, paste_back={"threshold": 1e9}, **kw)  # nothing counts as changed
    assert plain.changed is None and not kept.changed.any()
    assert torch.equal(kept.pixels, given) and not torch.equal(plain.pixels, given)
    with torch.no_grad():   # a threshold that marks about a third of the pixels as changed
        diff = (plain.pixels - ae.decode(ae.encode(given))).abs().amax(1) * 127.5
    some = edit(transformer, ae, paste_back={"threshold": float(diff.quantile(0.67)), "feather_px": 2, "grow": 0},
                **kw)
    keep = ~kc.dilate(some.changed, 2).expand_as(some.pixels)
    assert 0 < keep.float().mean() < 1
    assert torch.equal(some.pixels[keep], given[keep])
    with pytest.raises(InputError, match="decode"):
        edit(transformer, ae, paste_back=True, decode=False, **kw)


def test_estimate_change_units():
    a = torch.zeros(1, 3, 4, 4)
    b = a.clone()
    b[0, 1, 0, 0] = 30 / 127.5   # 30 levels in one channel
    assert kc.estimate_change(a, b, 24).sum() == 1 and kc.estimate_change(a, b, 40).sum() == 0
    z = torch.zeros(1, 16, 2, 2)
    y = z.clone()
    y[0, :, 1, 1] = 0.2
    assert kc.estimate_change(z, y, 0.1).nonzero().tolist() == [[0, 0, 1, 1]]
    with pytest.raises(InputError):
        kc.estimate_change(a, z)


def test_np_helpers_shift_and_keep_masks():
    from kontext_core.tiny.edits import make_chain
    from kontext_core.tiny.evaluate import chain_keep_masks, edited_region, global_shift
    from kontext_core.tiny.scene import render

    img = render(make_chain(1_000_000_123, 1)[0].context).image
    assert np.allclose(global_shift(img, img), (0.0, 0.0), atol=1e-6)
    assert np.allclose(global_shift(np.roll(np.roll(img, 3, 0), -5, 1), img), (3.0, -5.0), atol=1e-6)
    chain = make_chain(1_000_000_123, 4)
    keeps = chain_keep_masks(chain)
    for k, t in enumerate(chain):
        region = edited_region(render(t.context), render(t.target), t)
        assert not (keeps[k] & region).any()
        if k:
            assert not (keeps[k] & ~keeps[k - 1]).any()   # what is kept only shrinks


# ------------------------------------------------------------------------------ the node graph's chain (nodes/chain_logic)
class HostVAE:
    """A ComfyUI-style VAE (images (B, H, W, 3) in [0, 1]) around BlockAE; counts its calls."""

    def __init__(self):
        self.ae, self.calls = BlockAE(), []

    def encode(self, images):
        self.calls.append("encode")
        return self.ae.encode(images.movedim(-1, 1) * 2 - 1)

    def decode(self, latent):
        self.calls.append("decode")
        return (self.ae.decode(latent).movedim(1, -1) + 1) / 2


def _edit_cell(latent, cell, value):
    out = latent.clone()
    out[:, :3, cell[0], cell[1]] = value
    return out


def test_keep_unchanged_node_chain_continues_from_previous_without_touching_it():
    from nodes import chain_logic as cl

    vae = HostVAE()
    original = (blocky_image(1, 16, 16, seed=3) + 1) / 2          # (1, 3, 16, 16) in [0, 1]
    image = original.movedim(1, -1)
    anchor_latent = vae.encode(image)
    turn1 = _edit_cell(anchor_latent, (0, 0), 0.9)
    latent1, pixels1, mask1 = cl.keep_unchanged({"samples": turn1}, vae, image=image, feather=0)
    assert mask1.shape == (1, 16, 16) and mask1[0, :4, :4].all()
    assert torch.allclose(pixels1.movedim(-1, 1)[..., 8:, 8:], original[..., 8:, 8:], atol=1e-6)
    assert torch.equal(latent1["samples"], turn1)  # the untouched cells already equal the anchor's

    # turn 2 re-generates everything slightly differently (drift) and edits the opposite corner
    drifted = latent1["samples"] + 0.02
    turn2 = _edit_cell(drifted, (3, 3), -0.9)
    state_before = latent1[cl.CHAIN_KEY].union.clone(), latent1[cl.CHAIN_KEY].canvas.clone()
    latent2, pixels2, mask2 = cl.keep_unchanged({"samples": turn2}, vae, previous=latent1, feather=0)
    again = cl.keep_unchanged({"samples": turn2}, vae, previous=latent1, feather=0)
    assert torch.equal(latent1[cl.CHAIN_KEY].union, state_before[0])       # the input chain was not stepped
    assert torch.equal(latent1[cl.CHAIN_KEY].canvas, state_before[1])
    assert torch.equal(again[1], pixels2)                                   # re-running a turn is repeatable
    assert mask2[0, :4, :4].all() and mask2[0, 12:, 12:].all() and not mask2[0, 6:10, 6:10].any()
    # the drift never reaches the canvas or the picture outside the two edited corners (cell (2, 2) borders the
    # grown edit of cell (3, 3), so the canvas takes it from turn 2)
    assert torch.equal(latent2["samples"][..., 1, 1:3], anchor_latent[..., 1, 1:3])
    assert torch.allclose(pixels2.movedim(-1, 1)[..., 6:10, 6:10], original[..., 6:10, 6:10], atol=1e-6)
    assert torch.allclose(latent2["samples"][:, :3, 3, 3], torch.full((1, 3), -0.9))


def test_keep_unchanged_node_errors():
    from nodes import chain_logic as cl

    vae = HostVAE()
    image = ((blocky_image(1, 16, 16) + 1) / 2).movedim(1, -1)
    lat = {"samples": vae.encode(image)}
    with pytest.raises(InputError, match="exactly one of"):
        cl.keep_unchanged(lat, vae)
    with pytest.raises(InputError, match="exactly one of"):
        cl.keep_unchanged(lat, vae, image=image, previous=lat)
    with pytest.raises(InputError, match="without a chain"):
        cl.keep_unchanged(lat, vae, previous=lat)
    with pytest.raises(InputError, match="estimator"):
        cl.keep_unchanged(lat, vae, image=image, estimator="magic")
    first, _, _ = cl.keep_unchanged(lat, vae, image=image)
    with pytest.raises(InputError, match="does not match"):
        cl.keep_unchanged({"samples": torch.zeros(1, 16, 8, 8)}, vae, previous=first)


def test_fork_copies_state_and_checks_settings():
    ae = BlockAE()
    chain = kc.EditChain.from_pixels(ae, blocky_image(1))
    other = chain.fork(threshold=5.0)
    other.step(_edit_cell(chain.context, (1, 1), 0.5))
    assert not chain.union.any() and other.union.any() and chain.threshold is None
    with pytest.raises(TypeError):
        chain.fork(colour=False)
    with pytest.raises(InputError):
        chain.fork(estimator="magic")
