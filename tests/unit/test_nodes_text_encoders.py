"""The text-encoder GGUF loader's ComfyUI-free part: file checks, key layout and dimensions handed to ComfyUI."""

import pytest
import torch
from safetensors.torch import save_file

from kontext_core.errors import CheckpointError
from kontext_core.text_encoders.checkpoints import TextEncoderWeights
from nodes import text_encoder_logic as logic


def meta(*shape):
    return torch.empty(shape, device="meta")


def t5_xxl_shapes() -> TextEncoderWeights:
    """T5 v1.1 XXL's published shapes (what t5xxl_fp16.safetensors and the T5-XXL GGUFs hold)."""
    sd = {"shared.weight": meta(32128, 4096), "encoder.final_layer_norm.weight": meta(4096),
          "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": meta(32, 64)}
    for i in range(24):
        p = f"encoder.block.{i}.layer."
        sd.update({p + f"0.SelfAttention.{x}.weight": meta(4096, 4096) for x in "qkvo"})
        sd.update({p + "1.DenseReluDense.wi_0.weight": meta(10240, 4096), p + "1.DenseReluDense.wi_1.weight":
                   meta(10240, 4096), p + "1.DenseReluDense.wo.weight": meta(4096, 10240)})
    return TextEncoderWeights("t5", "t5.gguf", sd, "gguf")


def clip_l_shapes() -> TextEncoderWeights:
    sd = {"embeddings.token_embedding.weight": meta(49408, 768), "embeddings.position_embedding.weight": meta(77, 768),
          "final_layer_norm.weight": meta(768)}
    for i in range(12):
        sd[f"encoder.layers.{i}.self_attn.q_proj.weight"] = meta(768, 768)
        sd[f"encoder.layers.{i}.mlp.fc1.weight"] = meta(3072, 768)
    sd["text_projection.weight"] = meta(768, 768)
    return TextEncoderWeights("clip_l", "clip_l.safetensors", sd, "safetensors")


def test_real_shapes_give_comfyuis_own_configs():
    """For the real files the overrides equal ComfyUI's T5-XXL / CLIP-L configs (published architectures)."""
    cfg = logic.comfy_model_configs(t5_xxl_shapes(), clip_l_shapes())
    assert cfg["t5xxl_model_config"] == dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
                                             vocab_size=32128, relative_attention_num_buckets=32, is_gated_act=True)
    assert cfg["clip_l_model_config"] == dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                              num_hidden_layers=12, max_position_embeddings=77, vocab_size=49408)


def test_state_dicts_in_comfyuis_layout():
    clip_sd, t5_sd = logic.comfy_state_dicts(t5_xxl_shapes(), clip_l_shapes())
    assert "text_model.encoder.layers.1.mlp.fc1.weight" in clip_sd  # what ComfyUI's flux CLIP detects CLIP-L by
    assert "text_projection.weight" in clip_sd and not any(k.startswith("text_model.text_projection") for k in clip_sd)
    assert "encoder.block.23.layer.1.DenseReluDense.wi_1.weight" in t5_sd and "shared.weight" in t5_sd


def test_safetensors_t5_is_sent_to_the_core_loader(tmp_path):
    save_file({"encoder.final_layer_norm.weight": torch.ones(8)}, str(tmp_path / "t5xxl_fp16.safetensors"))
    with pytest.raises(CheckpointError, match=r"t5xxl_fp16.safetensors.*not a GGUF.*DualCLIPLoader"):
        logic.read_pair(tmp_path / "t5xxl_fp16.safetensors", tmp_path / "clip_l.safetensors")


def test_choices_filter_by_extension():
    files = ["a.gguf", "B.GGUF", "clip_l.safetensors", "t5.bin", "x.sft"]
    assert logic.gguf_text_choices(files) == ["B.GGUF", "a.gguf"]
    assert logic.clip_choices(files) == ["clip_l.safetensors", "x.sft"]
