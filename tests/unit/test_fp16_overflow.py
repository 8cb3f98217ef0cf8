"""fp16 compute: an activation that overflows the fp16 range is clamped to ±65504 after each block (as ComfyUI's
own FLUX does), so it does not become NaN for the whole output; other dtypes are untouched."""

import torch

from kontext_core.model.layers import FP16_MAX, keep_fp16_finite
from kontext_core.weights.loader import load_transformer
from tiny_models import TINY_AXES, diffusers_sd_to_bfl, tiny_diffusers_transformer


def test_keep_fp16_finite():
    x = torch.tensor([float("inf"), -float("inf"), float("nan"), 1.5])
    assert keep_fp16_finite(x.half()).tolist() == [FP16_MAX, -FP16_MAX, 0.0, 1.5]
    assert keep_fp16_finite(x) is x  # fp32 passes through (NaN stays NaN: the engine reports it)


def test_fp16_text_stream_overflow_stays_finite():
    model = load_transformer(diffusers_sd_to_bfl(tiny_diffusers_transformer(seed=3).state_dict()),
                             params={"axes_dim": TINY_AXES}).half()
    h = model.params.hidden_size
    with torch.no_grad():  # a text-stream attention branch whose output overflows fp16 (|x| > 65504)
        model.double_blocks[0].txt_attn.proj.weight.mul_(1000)
        model.double_blocks[0].txt_mod.lin.bias[2 * h:3 * h] = 100  # its gate
    g = torch.Generator().manual_seed(0)
    x, ref = torch.randn(1, 16, 4, 6, generator=g), torch.randn(1, 16, 4, 6, generator=g)
    txt, y = torch.randn(1, 5, 32, generator=g), torch.randn(1, 24, generator=g)
    with torch.no_grad():
        out = model.forward_latent(x.half(), torch.tensor([0.7]).half(), txt.half(), y.half(),
                                   torch.tensor([2.5]).half(), [ref.half()])
    assert torch.isfinite(out).all()
