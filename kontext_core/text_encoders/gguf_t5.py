"""T5 encoder GGUF files (llama.cpp naming) read with the project's GGUF reader and renamed to transformers' keys.

llama.cpp's converter stores a T5 encoder (`general.architecture` = `t5encoder`, older files `t5`) as
`token_embd.weight`, `enc.output_norm.weight` and per block `enc.blk.N.{attn_q, attn_k, attn_v, attn_o, attn_norm,
attn_rel_b, ffn_gate, ffn_up, ffn_down, ffn_norm}.weight`; the gated feed-forward's `wi_0` is `ffn_gate` and `wi_1`
is `ffn_up`. Full T5 GGUFs (architecture `t5`) also hold a decoder (`dec.*`), which the encoder does not use.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import CheckpointError
from ..weights.gguf_file import GGUFHeader, read_gguf
from .checkpoints import T5_GGUF_ARCHS, TextEncoderWeights, describe_foreign

_BLOCK_PARTS = {
    "attn_q": "layer.0.SelfAttention.q",
    "attn_k": "layer.0.SelfAttention.k",
    "attn_v": "layer.0.SelfAttention.v",
    "attn_o": "layer.0.SelfAttention.o",
    "attn_norm": "layer.0.layer_norm",
    "attn_rel_b": "layer.0.SelfAttention.relative_attention_bias",
    "ffn_gate": "layer.1.DenseReluDense.wi_0",
    "ffn_up": "layer.1.DenseReluDense.wi_1",
    "ffn_down": "layer.1.DenseReluDense.wo",
    "ffn_norm": "layer.1.layer_norm",
}
_TOP = {"token_embd.weight": "shared.weight", "enc.output_norm.weight": "encoder.final_layer_norm.weight"}
_BLOCK = re.compile(r"enc\.blk\.(\d+)\.(\w+)\.weight")


def t5_name(gguf_name: str, gated: bool = True) -> str | None:
    """transformers' key for a llama.cpp T5 tensor name; None for tensors the encoder does not use. `gated`:
    the file has `ffn_gate` tensors (T5 v1.1, as FLUX's T5-XXL); without them `ffn_up` is v1.0's single `wi`."""
    if gguf_name in _TOP:
        return _TOP[gguf_name]
    m = _BLOCK.fullmatch(gguf_name)
    if m and m.group(2) in _BLOCK_PARTS:
        part = _BLOCK_PARTS[m.group(2)]
        if m.group(2) == "ffn_up" and not gated:
            part = "layer.1.DenseReluDense.wi"
        return f"encoder.block.{m.group(1)}.{part}.weight"
    return None


def _check_t5_arch(path: Path, header: GGUFHeader) -> str:
    arch = header.metadata.get("general.architecture")
    names = [t.name for t in header.tensors]
    if isinstance(arch, str) and arch.lower() in T5_GGUF_ARCHS:
        if "enc.output_norm.weight" not in names or "token_embd.weight" not in names:
            raise CheckpointError(f"{path}: the GGUF says it holds a '{arch}' model but has no T5 encoder tensors "
                                  "(token_embd, enc.output_norm); the file is incomplete or converted wrongly. "
                                  "Use a T5-XXL encoder GGUF (e.g. city96/t5-v1_1-xxl-encoder-gguf).")
        return arch.lower()
    foreign = describe_foreign(names)
    what = f"a '{arch}' model" if arch else "no general.architecture"
    extra = f" ({foreign})" if foreign else ""
    raise CheckpointError(f"{path}: this GGUF holds {what}{extra}, but a T5 encoder GGUF (general.architecture "
                          f"{' or '.join(repr(a) for a in T5_GGUF_ARCHS)}, e.g. t5-v1_1-xxl-encoder-Q8_0.gguf) is "
                          "expected as the T5 text encoder.")


def read_t5_gguf(path: str | Path) -> TextEncoderWeights:
    """A T5 encoder GGUF's tensors (GGMLTensor when quantized) under transformers' T5 names."""
    contents = read_gguf(path, check_arch=_check_t5_arch)
    gated = any(n.endswith(".ffn_gate.weight") for n in contents.tensors)
    tensors, qtypes = {}, {}
    for name, t in contents.tensors.items():
        new = t5_name(name, gated)
        if new is not None:
            tensors[new] = t
            qtypes[new] = contents.qtypes[name]
    return TextEncoderWeights("t5", str(path), tensors, "gguf", {}, qtypes)
