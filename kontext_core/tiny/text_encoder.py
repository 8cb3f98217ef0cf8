"""Kontext-Tiny's text encoder: a word-level tokenizer and a small transformer standing in for T5 + CLIP.

It produces the same two tensors FLUX takes from its text encoders: per-token embeddings (B, L, C) (T5's role,
`txt` of the DiT) and a pooled vector (B, P) (CLIP's role, `y`). Weights and vocabulary live in one safetensors
file (the vocabulary and configuration in its metadata), so nothing is unpickled and the file describes itself.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import CheckpointError, InputError

PAD, UNK = "<pad>", "<unk>"
FORMAT = "kontext-tiny-text-encoder"


@dataclass
class TextEncoderConfig:
    vocab_size: int
    max_length: int = 24
    width: int = 128
    heads: int = 4
    layers: int = 2
    context_dim: int = 128   # = the DiT's context_in_dim
    pooled_dim: int = 128    # = the DiT's vec_in_dim


class Tokenizer:
    """Lower-cased words; a word written in capitals (a sign's text, e.g. "OK") is spelled one letter a token."""

    def __init__(self, vocab: list[str], max_length: int):
        if vocab[:2] != [PAD, UNK]:
            vocab = [PAD, UNK] + [w for w in vocab if w not in (PAD, UNK)]
        self.vocab = vocab
        self.index = {w: i for i, w in enumerate(vocab)}
        self.max_length = max_length

    def words(self, text: str) -> list[str]:
        out: list[str] = []
        for w in re.findall(r"[A-Za-z]+|'s|[^\sA-Za-z]", text):
            if w.isupper() and len(w) <= 4 and all(c in self.index for c in w):
                out.extend(w)
            else:
                out.append(w.lower())
        return out

    def __call__(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """(ids (B, L) int64, mask (B, L) bool of real tokens). Longer prompts are cut at max_length."""
        ids = torch.zeros((len(texts), self.max_length), dtype=torch.long)
        mask = torch.zeros((len(texts), self.max_length), dtype=torch.bool)
        for b, text in enumerate(texts):
            toks = [self.index.get(w, 1) for w in self.words(text)][: self.max_length]
            if not toks:
                raise InputError("the prompt is empty: describe the edit, e.g. 'make the circle blue'")
            ids[b, : len(toks)] = torch.tensor(toks)
            mask[b, : len(toks)] = True
        return ids, mask

    def unknown_words(self, text: str) -> list[str]:
        return [w for w in self.words(text) if w not in self.index]


class _Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: Tensor, key_mask: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, c))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyTextEncoder(nn.Module):
    def __init__(self, config: TextEncoderConfig, vocab: list[str]):
        super().__init__()
        self.config = config
        self.tokenizer = Tokenizer(vocab, config.max_length)
        if len(self.tokenizer.vocab) != config.vocab_size:
            raise ValueError(f"vocabulary has {len(self.tokenizer.vocab)} words, config says {config.vocab_size}")
        c = config
        self.embed = nn.Embedding(c.vocab_size, c.width)
        self.pos = nn.Parameter(torch.randn(c.max_length, c.width) / math.sqrt(c.width))
        self.blocks = nn.ModuleList(_Block(c.width, c.heads) for _ in range(c.layers))
        self.norm = nn.LayerNorm(c.width)
        self.to_context = nn.Linear(c.width, c.context_dim)
        self.to_pooled = nn.Linear(c.width, c.pooled_dim)

    def encode_ids(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        for blk in self.blocks:
            x = blk(x, mask)
        x = self.norm(x)
        m = mask.unsqueeze(-1).to(x.dtype)
        pooled = (x * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.to_context(x), self.to_pooled(pooled)

    def forward(self, texts: list[str] | str) -> tuple[Tensor, Tensor]:
        """Prompts -> (prompt_embeds (B, L, context_dim), pooled (B, pooled_dim)) on the encoder's device."""
        if isinstance(texts, str):
            texts = [texts]
        ids, mask = self.tokenizer(list(texts))
        dev = self.embed.weight.device
        return self.encode_ids(ids.to(dev), mask.to(dev))

    # --- files ---------------------------------------------------------------------------------------
    def save(self, path) -> None:
        from safetensors.torch import save_file

        meta = {"format": FORMAT, "config": json.dumps(asdict(self.config)),
                "vocab": json.dumps(self.tokenizer.vocab)}
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path, device="cpu") -> "TinyTextEncoder":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise CheckpointError(f"{path}: not a Kontext-Tiny text encoder (metadata format is "
                                          f"{meta.get('format')!r}, expected {FORMAT!r}).")
                sd = {k: f.get_tensor(k) for k in f.keys()}
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise CheckpointError(f"{path}: cannot read the text encoder ({e}); the file is damaged or not "
                                  "safetensors.") from e
        model = cls(TextEncoderConfig(**json.loads(meta["config"])), json.loads(meta["vocab"]))
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"{path}: text encoder keys do not match (missing {missing[:3]}, unexpected "
                                  f"{unexpected[:3]}).")
        return model.to(device).eval()


def is_tiny_text_encoder(path) -> bool:
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except Exception:
        return False
