"""Prompt -> embeddings: the engine's text encoders vs transformers' models and diffusers' FluxKontextPipeline.

Tiny random T5 / CLIP models and tiny tokenizers are built in the test (tests/tiny_text_encoders.py) and written
the ways users have them: a diffusers FLUX folder, and ComfyUI-style single files (bundle prefix, fp16, fp8 and
scaled fp8 storage). References run transformers' own models on the same (rounded) weights in fp32.
"""

import logging

import pytest
import torch
from safetensors.torch import save_file

from kontext_core.text_encoders import load_clip_l, load_t5, load_text_encoders
from kontext_core.weights.fp8 import quantize_fp8
from tiny_text_encoders import tiny_clip, write_flux_text_folder, write_t5_gguf

PROMPTS = ["make the red car blue", "give the character a green hat", "a cat"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_flux_text_folder(tmp_path_factory.mktemp("flux_text"))


def reference(t5, clip, ttok, ctok, prompts, max_len=512):
    with torch.no_grad():
        ids = ttok(prompts, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt").input_ids
        cids = ctok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        return t5(ids)[0], clip(cids).pooler_output


def test_diffusers_folder_matches_transformers(folder):
    root, t5, clip, ttok, ctok = folder
    te = load_text_encoders(root)
    embeds, pooled = te.encode(PROMPTS)
    ref_e, ref_p = reference(t5, clip, ttok, ctok, PROMPTS)
    assert embeds.shape == (3, 512, 32) and pooled.shape == (3, 24)
    assert (embeds - ref_e).abs().max() < 1e-6 and (pooled - ref_p).abs().max() < 1e-6
    # weights are the file's pages, not copies: Linear weights and token tables are views of the memory map
    for w in (te.t5.encoder.block[0].layer[0].SelfAttention.q.weight, te.t5.shared.weight,
              te.clip.get_input_embeddings().weight):
        assert not w.untyped_storage().resizable()


def test_matches_flux_kontext_pipeline_encode_prompt(folder):
    from diffusers import FluxKontextPipeline

    root, t5, clip, ttok, ctok = folder
    pipe = FluxKontextPipeline(scheduler=None, vae=None, text_encoder=clip, tokenizer=ctok, text_encoder_2=t5,
                               tokenizer_2=ttok, transformer=None)
    with torch.no_grad():
        ref_e, ref_p, _ = pipe.encode_prompt(prompt=PROMPTS, prompt_2=None, max_sequence_length=512)
    embeds, pooled = load_text_encoders(root).encode(PROMPTS)
    d = max((embeds - ref_e).abs().max().item(), (pooled - ref_p).abs().max().item())
    print(f"\n[encode_prompt] max|Δ| = {d:.2e}")
    assert embeds.shape == ref_e.shape and pooled.shape == ref_p.shape and d < 1e-6


def test_long_prompt_is_truncated_with_a_warning(folder, caplog):
    from diffusers import FluxKontextPipeline

    root, t5, clip, ttok, ctok = folder
    long = "make the red car blue " * 130 + "zebra"  # > 512 T5 tokens, > 77 CLIP tokens
    assert len(ttok(long).input_ids) > 512
    pipe = FluxKontextPipeline(scheduler=None, vae=None, text_encoder=clip, tokenizer=ctok, text_encoder_2=t5,
                               tokenizer_2=ttok, transformer=None)
    with torch.no_grad():
        ref_e, ref_p, _ = pipe.encode_prompt(prompt=[long], prompt_2=None, max_sequence_length=512)
    with caplog.at_level(logging.WARNING, logger="kontext_core"):
        embeds, pooled = load_text_encoders(root).encode(long)
    assert (embeds - ref_e).abs().max() < 1e-6 and (pooled - ref_p).abs().max() < 1e-6
    msgs = [r.getMessage() for r in caplog.records if "cut off" in r.getMessage()]
    assert any("T5" in m and "zebra" in m.replace(" ", "") for m in msgs), msgs
    assert any("CLIP-L" in m for m in msgs), msgs


def _t5_file_sd(t5, prefix=""):
    return {prefix + k: v.detach().clone().contiguous() for k, v in t5.state_dict().items()
            if k != "encoder.embed_tokens.weight"}


@pytest.mark.parametrize("storage", ["fp16", "bf16", "fp8", "scaled_fp8"])
def test_comfy_single_file_t5(folder, tmp_path, storage):
    """t5xxl_fp16 / _fp8_e4m3fn / _fp8_e4m3fn_scaled style files (ComfyUI's key names and bundle prefix): the
    weights stay in their stored dtype and are upcast per layer; the result equals transformers' T5 running the
    same rounded weights in fp32."""
    from transformers import T5EncoderModel

    root, t5, clip, ttok, ctok = folder
    sd = _t5_file_sd(t5)
    ref_sd = {}
    for k, v in list(sd.items()):
        linear = v.ndim == 2 and "relative_attention_bias" not in k and k != "shared.weight"
        if storage in ("fp16", "bf16"):
            sd[k] = v.to(torch.float16 if storage == "fp16" else torch.bfloat16)
            ref_sd[k] = sd[k].float()
        elif linear and storage == "fp8":
            sd[k] = v.to(torch.float8_e4m3fn)
            ref_sd[k] = sd[k].float()
        elif linear:
            q, s = quantize_fp8(v)
            sd[k], sd[k[:-len("weight")] + "scale_weight"] = q, s
            ref_sd[k] = q.float() * s
        else:
            ref_sd[k] = v
    if storage == "scaled_fp8":
        sd["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    path = tmp_path / f"t5xxl_{storage}.safetensors"
    save_file({"text_encoders.t5xxl.transformer." + k: v for k, v in sd.items()}, str(path))
    ours = load_t5(path)
    q = ours.encoder.block[1].layer[1].DenseReluDense.wo.weight
    want = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(storage, torch.float8_e4m3fn)
    assert q.dtype == want and not q.untyped_storage().resizable()  # stored dtype kept, memory-mapped
    ref = T5EncoderModel(t5.config).eval()
    ref.load_state_dict(ref_sd, strict=False)
    ref.tie_weights()
    ids = ttok(PROMPTS, padding="max_length", max_length=512, return_tensors="pt").input_ids
    with torch.no_grad():
        d = (ours(ids)[0] - ref(ids)[0]).abs().max().item()
    print(f"\n[t5 {storage}] max|Δ| = {d:.2e}")
    assert d < 1e-5


def test_comfy_single_file_clip_l(tmp_path, folder):
    """clip_l.safetensors style: `text_model.` keys plus the projection ComfyUI's file carries; no config.json, so
    the architecture (heads of width 64) is inferred from the shapes."""
    root, t5, clip, ttok, ctok = folder
    wide = tiny_clip(len(ctok), seed=3, hidden_size=128, num_attention_heads=2, intermediate_size=96, eos_token_id=2)
    sd = {("text_model." + k if not k.startswith("text_model.") else k): v.detach().to(torch.float16).contiguous()
          for k, v in wide.state_dict().items() if "position_ids" not in k}
    sd["text_projection.weight"] = torch.randn(128, 128).half()
    save_file(sd, str(tmp_path / "clip_l.safetensors"))
    ours = load_clip_l(tmp_path / "clip_l.safetensors")
    assert ours.config.num_attention_heads == 2 and ours.config.num_hidden_layers == 2
    ref = tiny_clip(len(ctok), seed=3, hidden_size=128, num_attention_heads=2, intermediate_size=96)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.half().float())
    ids = ctok(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        d = (ours(ids).pooler_output - ref(ids).pooler_output).abs().max().item()
    assert d < 1e-5


@pytest.fixture(scope="module")
def gguf_t5(folder):
    """A T5 wide enough for K-quant blocks (rows of 256)."""
    from tiny_text_encoders import tiny_t5

    root, t5, clip, ttok, ctok = folder
    return tiny_t5(len(ttok), seed=4, d_model=256, d_kv=32, num_heads=4, d_ff=512), ttok


@pytest.mark.parametrize("qtype", ["Q8_0", "Q6_K", "Q4_K", "Q3_K", "Q5_0"])
def test_gguf_t5_matches_its_dequantized_safetensors_twin(gguf_t5, tmp_path, qtype):
    """A T5 encoder GGUF (llama.cpp names, written by the gguf package) runs quantized (dequantized per layer)
    and gives the encoding of its dequantized safetensors twin (dequantized by gguf-py's reference code)."""
    from kontext_core.quant.ggml_tensor import GGMLTensor

    t5, ttok = gguf_t5
    path = tmp_path / f"t5-encoder-{qtype}.gguf"
    twin = write_t5_gguf(t5, path, qtype)
    save_file(twin, str(tmp_path / "twin.safetensors"))
    ours = load_t5(path)
    twin_model = load_t5(tmp_path / "twin.safetensors")
    wi = ours.encoder.block[0].layer[1].DenseReluDense.wi_0.weight
    assert isinstance(wi, GGMLTensor) == (qtype != "F16")  # stays quantized in memory
    ids = ttok(PROMPTS, padding="max_length", max_length=512, return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = ours(ids)[0], twin_model(ids)[0]
        full = t5(ids)[0]
    d = (a - b).abs().max().item()
    print(f"\n[gguf {qtype}] vs twin max|Δ| = {d:.2e}; vs unquantized {(a - full).abs().max().item():.2e}")
    assert d < 1e-5
