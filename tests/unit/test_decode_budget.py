"""edit/decode_latent: the AE decode is tiled exactly when a whole-image decode would not fit the budget."""

import torch

from kontext_core import pipeline
from kontext_core.model import tiling
from kontext_core.model.autoencoder import AutoEncoder, AutoEncoderParams

P = AutoEncoderParams(ch=32, ch_mult=(1, 2, 4, 4), num_res_blocks=1, z_channels=16)


def tiny_ae():
    torch.manual_seed(0)
    ae = AutoEncoder(P).eval()
    with torch.no_grad():
        for p in ae.parameters():
            p.normal_(0, 0.05)
    return ae


def test_large_budget_decodes_whole_small_budget_tiles(monkeypatch):
    ae = tiny_ae()
    z = torch.randn(1, 16, 24, 32)
    full_need = tiling.estimate_tile_bytes(32, P, torch.float32, "decode")
    with torch.no_grad():
        whole = ae.decode(z)
        assert torch.equal(pipeline.decode_latent(ae, z, full_need), whole)
        seen = {}
        real = tiling.decode_tiled

        def spy(ae_, z_, tile, overlap):
            seen["tile"] = tile
            return real(ae_, z_, tile=tile, overlap=overlap)

        monkeypatch.setattr(tiling, "decode_tiled", spy)
        budget = full_need // 6
        tiled = pipeline.decode_latent(ae, z, budget)
    assert seen["tile"] < 32 and tiling.estimate_tile_bytes(seen["tile"], P, torch.float32, "decode") <= budget
    assert tiled.shape == whole.shape
    rel = ((tiled - whole).norm() / whole.norm()).item()
    assert rel < 0.2  # random-weight AE: tiles see different GroupNorm statistics (see test_ae_tiling)
