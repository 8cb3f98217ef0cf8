"""Seeded tiny T5 / CLIP text encoders (transformers) and tiny tokenizers, built in the tests, no downloads.

`write_flux_text_folder(root)` writes them in diffusers' FLUX layout (text_encoder/, text_encoder_2/, tokenizer/,
tokenizer_2/), which is what `FluxKontextPipeline.from_pretrained`-style code and the engine read.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = ["make", "the", "red", "car", "blue", "a", "cat", "sign", "green", "hat", "give", "character", "write"]

# T5 d_model 32 and CLIP width 24 match tiny_models.TINY (joint_attention_dim 32, pooled_projection_dim 24).
T5_TINY = dict(d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, relative_attention_num_buckets=32,
               relative_attention_max_distance=128, feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6,
               is_encoder_decoder=False, use_cache=False, dropout_rate=0.0, pad_token_id=0, eos_token_id=1)
CLIP_TINY = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
                 max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=24,
                 bos_token_id=0, eos_token_id=2, pad_token_id=1)


def _randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / max(1, p.shape[-1]) ** 0.5))
    return model.eval()


def tiny_t5(vocab_size: int, seed: int = 0, **overrides):
    from transformers import T5Config, T5EncoderModel

    return _randomise(T5EncoderModel(T5Config(vocab_size=vocab_size, **{**T5_TINY, **overrides})), seed)


def tiny_clip(vocab_size: int, seed: int = 1, **overrides):
    from transformers import CLIPTextConfig, CLIPTextModel

    return _randomise(CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, **{**CLIP_TINY, **overrides})), seed)


def tiny_t5_tokenizer(folder: Path):
    """A Unigram T5 tokenizer: <pad>=0, </s>=1, <unk>=2, a few words and single letters."""
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -3.0) for w in WORDS] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    T5TokenizerFast(vocab=vocab, extra_ids=0).save_pretrained(str(folder))
    return T5TokenizerFast.from_pretrained(str(folder))


def _bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def tiny_clip_tokenizer(folder: Path):
    """A byte-level BPE CLIP tokenizer with a small vocabulary; <|endoftext|> is the highest id (as in CLIP)."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars]
    merges = []
    for w in WORDS:  # merge each word into one token, left to right
        cur = w[0]
        for i, c in enumerate(w[1:], 1):
            right = c + ("</w>" if i == len(w) - 1 else "")
            merges.append(f"{cur} {right}")
            cur = cur + right
            tokens.append(cur)
    tokens = list(dict.fromkeys(tokens)) + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}))
    return CLIPTokenizer.from_pretrained(str(folder))


def write_flux_text_folder(root: Path, t5_seed=0, clip_seed=1):
    """(root, t5, clip, t5_tokenizer, clip_tokenizer) with root in diffusers' FLUX layout."""
    root = Path(root)
    ttok = tiny_t5_tokenizer(root / "tokenizer_2")
    ctok = tiny_clip_tokenizer(root / "tokenizer")
    t5 = tiny_t5(len(ttok), seed=t5_seed)
    clip = tiny_clip(len(ctok), seed=clip_seed)
    t5.save_pretrained(str(root / "text_encoder_2"), safe_serialization=True)
    clip.save_pretrained(str(root / "text_encoder"), safe_serialization=True)
    return root, t5, clip, ttok, ctok


# --- T5 encoder GGUF as llama.cpp's converter names it, written with the gguf package -------------------------

_GGUF_PARTS = {"layer.0.SelfAttention.q": "attn_q", "layer.0.SelfAttention.k": "attn_k",
               "layer.0.SelfAttention.v": "attn_v", "layer.0.SelfAttention.o": "attn_o",
               "layer.0.layer_norm": "attn_norm", "layer.0.SelfAttention.relative_attention_bias": "attn_rel_b",
               "layer.1.DenseReluDense.wi_0": "ffn_gate", "layer.1.DenseReluDense.wi_1": "ffn_up",
               "layer.1.DenseReluDense.wo": "ffn_down", "layer.1.layer_norm": "ffn_norm"}


def llama_cpp_t5_name(key: str) -> str:
    """transformers' T5 key -> the name llama.cpp's converter writes (written independently of the engine)."""
    if key == "shared.weight":
        return "token_embd.weight"
    if key == "encoder.final_layer_norm.weight":
        return "enc.output_norm.weight"
    _, _, i, rest = key.split(".", 3)  # encoder.block.<i>.<part>.weight
    return f"enc.blk.{i}.{_GGUF_PARTS[rest[: -len('.weight')]]}.weight"


def write_t5_gguf(t5, path: Path, qtype: str, arch: str = "t5encoder"):
    """Write `t5`'s encoder as a GGUF: 2-D weights whose rows fit the type's blocks in `qtype` (quantized by the
    project's quantizer), the rest F32, as the converters do. Returns {transformers key: dequantized fp32 tensor}
    computed by gguf-py's reference dequantizer: the file's exact values, for a safetensors twin."""
    import gguf
    import numpy as np
    from gguf import GGMLQuantizationType as QT
    from gguf.constants import GGML_QUANT_SIZES

    from kontext_core.quant.gguf_quantize import quantize

    q = QT[qtype]
    block = GGML_QUANT_SIZES[q][0]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny t5 encoder")
    twin = {}
    for key, t in t5.state_dict().items():
        if key == "encoder.embed_tokens.weight":
            continue
        w = t.detach().float().numpy()
        if w.ndim == 2 and w.shape[1] % block == 0 and "relative_attention_bias" not in key:
            raw = quantize(w, q)
            writer.add_tensor(llama_cpp_t5_name(key), raw, raw_dtype=q)
            twin[key] = torch.from_numpy(gguf.quants.dequantize(raw, q).reshape(w.shape).astype(np.float32))
        else:
            writer.add_tensor(llama_cpp_t5_name(key), w.astype(np.float32))
            twin[key] = torch.from_numpy(w.copy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return twin
