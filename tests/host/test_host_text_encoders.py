"""The T5 GGUF + CLIP-L loader node inside a real ComfyUI: its CLIP runs through core CLIPTextEncode (normally and
with ComfyUI's low-VRAM per-use casting) and gives the engine's encoding of the same files.

The encoders are tiny (T5 width 64 quantized to Q8_0 by the project's quantizer and written as a llama.cpp-named
GGUF; CLIP width 64) but have the real vocabularies, so ComfyUI's own tokenizers drive them; the engine reads the
same tokenizers from the ComfyUI install. ComfyUI pads T5 prompts to 256 tokens, so the engine is asked for 256.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import host_assets as A
import host_workflows as W
from host_env import COMFYUI_PATH, job, ok, run_driver
from kontext_core.text_encoders import load_text_encoders
from tiny_text_encoders import tiny_clip, tiny_t5, write_t5_gguf

T5_FILE, CLIP_FILE, DIT_AS_T5 = "t5-tiny-encoder-Q8_0.gguf", "clip_l_tiny.safetensors", "kontext_as_t5.gguf"
PROMPT = "make the red car blue"
COMFY_T5_LENGTH = 256  # ComfyUI's T5XXLTokenizer pads to at least 256 tokens
T5_VOCAB, CLIP_VOCAB = 32128, 49408


def encode_prompt(t5_name: str, tag: str, dtype: str = "fp32") -> dict:
    return {"1": {"class_type": "KontextNativeTextEncoderGGUFLoader",
                  "inputs": {"t5_name": t5_name, "clip_name": CLIP_FILE, "compute_dtype": dtype}},
            "2": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["1", 0]}},
            "3": {"class_type": "KontextNativeSaveConditioning", "inputs": {"conditioning": ["2", 0],
                                                                          "filename_prefix": f"te/{tag}"}}}


@pytest.fixture(scope="module")
def driver(host_assets):
    te = host_assets.base / "models" / "text_encoders"
    te.mkdir(parents=True, exist_ok=True)
    write_t5_gguf(tiny_t5(T5_VOCAB, seed=21, d_model=64, d_kv=16, num_heads=4, d_ff=128), te / T5_FILE, "Q8_0")
    clip = tiny_clip(CLIP_VOCAB, seed=22, hidden_size=64, num_attention_heads=1, intermediate_size=128)
    save_file({("text_model." + k if not k.startswith("text_model.") else k): v.contiguous()
               for k, v in clip.state_dict().items() if "position_ids" not in k}, str(te / CLIP_FILE))
    shutil.copy(host_assets.base / "models" / "diffusion_models" / A.MODEL_GGUF_Q8, te / DIT_AS_T5)
    jobs = [{"name": "encode", "prompt": encode_prompt(T5_FILE, "normal")},
            {"name": "encode_lowvram", "mode": "lowvram", "prompt": encode_prompt(T5_FILE, "lowvram")},
            {"name": "encode_default_dtype", "prompt": encode_prompt(T5_FILE, "default", "default")},
            {"name": "dit_as_t5", "prompt": encode_prompt(DIT_AS_T5, "bad")}]
    results = run_driver(host_assets, jobs)
    return {"jobs": {j["name"]: j["prompt"] for j in jobs}, "results": results["jobs"], "base": host_assets.base,
            "log": results["log"]}


def saved(driver, name: str) -> dict:
    files = W.output_files(ok(driver, name), "3", "text")
    assert files, f"{name}: nothing saved"
    return load_file(str(driver["base"] / "output" / files[0]))


@pytest.fixture(scope="module")
def engine_encoding(driver):
    te = driver["base"] / "models" / "text_encoders"
    engine = load_text_encoders(te / T5_FILE, te / CLIP_FILE, tokenizers=COMFYUI_PATH)
    return engine.encode(PROMPT, max_sequence_length=COMFY_T5_LENGTH)


def test_clip_text_encode_with_gguf_t5_equals_the_engine(driver, engine_encoding):
    """fp32 in both: ComfyUI's own T5/CLIP classes on the node's weights vs transformers' in the engine."""
    comfy = saved(driver, "encode")
    t5, pooled = engine_encoding
    assert comfy["prompt_embeds"].shape == t5.shape == (1, COMFY_T5_LENGTH, 64)
    torch.testing.assert_close(comfy["prompt_embeds"].float(), t5, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(comfy["pooled_prompt_embeds"].float(), pooled, rtol=1e-4, atol=1e-4)


def test_default_dtype_is_comfyuis_text_encoder_dtype(driver, engine_encoding):
    """With compute_dtype 'default' ComfyUI runs text encoders in fp16 (on CPU too): the same encoding to fp16
    precision, and not bit-equal to fp32 (the option is honoured)."""
    comfy, fp32 = saved(driver, "encode_default_dtype"), saved(driver, "encode")
    t5, pooled = engine_encoding
    torch.testing.assert_close(comfy["prompt_embeds"].float(), t5, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(comfy["pooled_prompt_embeds"].float(), pooled, rtol=2e-2, atol=2e-2)
    assert not torch.equal(comfy["prompt_embeds"].float(), fp32["prompt_embeds"].float())


def test_low_vram_casting_gives_the_same_encoding(driver):
    a, b = saved(driver, "encode"), saved(driver, "encode_lowvram")
    torch.testing.assert_close(b["prompt_embeds"], a["prompt_embeds"], rtol=0, atol=1e-6)
    torch.testing.assert_close(b["pooled_prompt_embeds"], a["pooled_prompt_embeds"], rtol=0, atol=1e-6)


def test_a_transformer_gguf_as_t5_is_refused_with_a_message(driver):
    r = job(driver, "dit_as_t5")
    assert not r.get("success")
    text = str(r.get("messages")) + str(r.get("node_errors")) + str(r.get("validation_error"))
    assert "FLUX transformer" in text and "T5 encoder GGUF" in text
