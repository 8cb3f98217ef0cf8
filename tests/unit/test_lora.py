"""LoRA on the fly: every key format gives the same output as weights merged by hand in that format's own
key space (diffusers LoRAs are merged into the diffusers model and run there — an independent path)."""

import pytest
import torch

from kontext_core.errors import CheckpointError
from kontext_core.quant.lora import apply_lora
from kontext_core.weights.loader import load_transformer
from tiny_models import TINY_AXES, diffusers_sd_to_bfl, diffusers_velocity, independent_ids, tiny_diffusers_transformer

R = 4


def rand_pair(out_f, in_f, g):
    return torch.randn(R, in_f, generator=g) * 0.3, torch.randn(out_f, R, generator=g) * 0.3


def diffusers_lora(model, g, alpha=2.0):
    """PEFT-style LoRA on a spread of diffusers layers, incl. q/k/v (fused in BFL) and norm_out (halves swapped)."""
    names = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v", "transformer_blocks.1.attn.add_k_proj",
             "transformer_blocks.0.ff.net.2", "single_transformer_blocks.1.attn.to_k",
             "single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.0.proj_out", "norm_out.linear",
             "transformer_blocks.1.norm1_context.linear", "x_embedder"]
    lora = {}
    for n in names:
        w = model.get_submodule(n).weight
        down, up = rand_pair(w.shape[0], w.shape[1], g)
        lora[f"transformer.{n}.lora_A.weight"] = down
        lora[f"transformer.{n}.lora_B.weight"] = up
        lora[f"transformer.{n}.alpha"] = torch.tensor(alpha)
    return lora, names


def forward_inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, 16, 4, 6, generator=g), torch.tensor([0.7]), torch.randn(1, 5, 32, generator=g),
            torch.randn(1, 24, generator=g), torch.tensor([2.5]), [torch.randn(1, 16, 4, 6, generator=g)])


def test_diffusers_lora_matches_merged_diffusers_model(tmp_path):
    ref = tiny_diffusers_transformer(seed=4)
    ours = load_transformer(diffusers_sd_to_bfl(ref.state_dict()), params={"axes_dim": TINY_AXES})
    lora, names = diffusers_lora(ref, torch.Generator().manual_seed(1))
    strength = 0.8
    with torch.no_grad():
        for n in names:
            lin = ref.get_submodule(n)
            d = lora[f"transformer.{n}.lora_B.weight"] @ lora[f"transformer.{n}.lora_A.weight"]
            lin.weight += strength * (2.0 / R) * d
    x, t, txt, y, gd, refs = forward_inputs()
    handle = apply_lora(ours, lora, strength)
    assert not handle.unmatched and len(handle.patches) == 9  # to_q + to_v share the fused qkv
    with torch.no_grad():
        got = ours.forward_latent(x, t, txt, y, gd, refs)
    want = diffusers_velocity(ref, x, [(refs[0], independent_ids(4, 6, 1))], txt, y, t, gd)
    assert (got - want).abs().max() < 2e-5
    # strength is live, and removal restores the base model exactly
    handle.set_strength(0.0)
    with torch.no_grad():
        base = ours.forward_latent(x, t, txt, y, gd, refs)
    handle.remove()
    with torch.no_grad():
        again = ours.forward_latent(x, t, txt, y, gd, refs)
    assert torch.equal(base, again) and not torch.allclose(base, got)


@pytest.mark.parametrize("style", ["comfy_peft", "kohya"])
def test_bfl_key_loras_match_merged_bfl_weights(style):
    ref = tiny_diffusers_transformer(seed=5)
    sd = diffusers_sd_to_bfl(ref.state_dict())
    ours = load_transformer(dict(sd), params={"axes_dim": TINY_AXES})
    g = torch.Generator().manual_seed(2)
    targets = ["double_blocks.0.img_attn.qkv", "double_blocks.1.txt_mlp.0", "single_blocks.1.linear1",
               "single_blocks.0.linear2", "final_layer.adaLN_modulation.1"]
    lora, merged = {}, dict(sd)
    for n in targets:
        w = sd[n + ".weight"]
        down, up = rand_pair(*w.shape, g)
        if style == "kohya":  # alpha != rank: the update is scaled by alpha / rank = 1 / 4
            base = "lora_unet_" + n.replace(".", "_")
            lora[base + ".lora_down.weight"], lora[base + ".lora_up.weight"] = down, up
            lora[base + ".alpha"] = torch.tensor(1.0)
            merged[n + ".weight"] = w + 0.25 * (up @ down)
        else:  # no alpha key: scale 1
            lora[f"diffusion_model.{n}.lora_A.weight"], lora[f"diffusion_model.{n}.lora_B.weight"] = down, up
            merged[n + ".weight"] = w + up @ down
    want_model = load_transformer(merged, params={"axes_dim": TINY_AXES})
    apply_lora(ours, lora)
    x, t, txt, y, gd, refs = forward_inputs()
    with torch.no_grad():
        assert (ours.forward_latent(x, t, txt, y, gd, refs) - want_model.forward_latent(x, t, txt, y, gd, refs)).abs().max() < 1e-5


def test_lora_errors_and_unmatched_keys():
    ref = tiny_diffusers_transformer(seed=6)
    ours = load_transformer(diffusers_sd_to_bfl(ref.state_dict()), params={"axes_dim": TINY_AXES})
    with pytest.raises(CheckpointError, match="no LoRA weight matches"):
        apply_lora(ours, {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 8),
                          "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(8, 4)})
    with pytest.raises(CheckpointError, match="different model"):
        apply_lora(ours, {"diffusion_model.img_in.lora_A.weight": torch.zeros(4, 32),
                          "diffusion_model.img_in.lora_B.weight": torch.zeros(64, 4)})
    h = apply_lora(ours, {"diffusion_model.img_in.lora_A.weight": torch.zeros(4, 64),
                          "diffusion_model.img_in.lora_B.weight": torch.zeros(64, 4),
                          "diffusion_model.unknown.lora_A.weight": torch.zeros(4, 64),
                          "diffusion_model.unknown.lora_B.weight": torch.zeros(64, 4)})
    assert h.unmatched == ["diffusion_model.unknown"]


def test_lora_does_not_modify_stored_weights():
    ref = tiny_diffusers_transformer(seed=7)
    ours = load_transformer(diffusers_sd_to_bfl(ref.state_dict()), params={"axes_dim": TINY_AXES})
    before = ours.img_in.weight.clone()
    apply_lora(ours, {"diffusion_model.img_in.lora_A.weight": torch.ones(4, 64),
                      "diffusion_model.img_in.lora_B.weight": torch.ones(64, 4)})
    x, t, txt, y, gd, refs = forward_inputs()
    with torch.no_grad():
        ours.forward_latent(x, t, txt, y, gd, refs)
    assert torch.equal(ours.img_in.weight, before)
