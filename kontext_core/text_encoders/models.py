"""T5-XXL and CLIP-L built from transformers' model classes, with the engine's weight layers swapped in.

Why transformers' `T5EncoderModel` / `CLIPTextModel` rather than our own: they are the reference FLUX pipelines
use (diffusers' `FluxKontextPipeline` runs exactly these classes), so the numerics match by construction; they are
well kept; and the tokenizers come from the same library. transformers is an optional extra (`pip install
.[text]`), imported only here, only when real text encoders are loaded; ComfyUI always has it.

How the weights stay as stored: the model is built on the meta device, every `nn.Linear` is replaced by the
engine's casting Linear (`CastLinear`: fp16/bf16/fp8 and scaled fp8, upcast per layer at use) or, for GGUF, the
GGUF Linear (dequantized per layer at use), the large token embeddings by `StoredEmbedding` (rows looked up in
the stored dtype, then upcast), and the memory-mapped tensors are assigned to it. Only the small tensors (norm
weights, position embeddings, T5's relative-position bias) are converted to the compute dtype.

One method is replaced: transformers' T5 feed-forward casts its activations to the storage dtype of `wo` before
the last projection (a rule for 8-bit/fp32-kept `wo` layers). With weights stored in fp8 or GGUF and upcast per
layer, that would round activations to fp8 (or bytes), so `_FeedForward.forward` is the same computation
without that cast.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import CheckpointError, KontextError
from ..model.ops import CastLinear
from ..quant.ggml_tensor import GGMLTensor
from ..quant.gguf_ops import GGUFOps, materialize
from .checkpoints import TextEncoderWeights, usable_tensors

INSTALL_HINT = ("real text encoders (T5-XXL, CLIP-L) run on the `transformers` library, which is not installed: "
                "`pip install transformers` (or `pip install comfyui-kontext-native[text]`). ComfyUI already has it.")


def require_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise KontextError(INSTALL_HINT) from None
    return transformers


class StoredEmbedding(nn.Embedding):
    """An embedding table kept in its stored dtype (fp16, fp8, GGUF); looked-up rows come out in `compute_dtype`."""

    compute_dtype: torch.dtype = torch.float32

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        v = state_dict.get(prefix + "weight")
        if isinstance(v, GGMLTensor):  # quantized table: keep the blocks (shape checked on the logical shape)
            state_dict.pop(prefix + "weight")
            if tuple(v.logical_shape) != (self.num_embeddings, self.embedding_dim):
                error_msgs.append(f"size mismatch for {prefix}weight: {tuple(v.logical_shape)} in the file, "
                                  f"{(self.num_embeddings, self.embedding_dim)} in the model.")
                return
            self._parameters["weight"] = nn.Parameter(v, requires_grad=False)
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, ids: Tensor) -> Tensor:
        w = self.weight
        if isinstance(w, GGMLTensor):
            return F.embedding(ids.to(w.device), w.dequantize(self.compute_dtype)).to(ids.device)
        return w[ids.to(w.device)].to(device=ids.device, dtype=self.compute_dtype)


# ================================================================================================ configs

def t5_config(w: TextEncoderWeights):
    """transformers' T5Config: the folder's config.json, else inferred from the tensor shapes."""
    from transformers import T5Config

    if w.config:
        cfg = dict(w.config)
    else:
        sd = w.tensors
        rel = _shape(sd, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", w)
        vocab, d_model = _shape(sd, "shared.weight", w)
        heads = rel[1]
        q = _shape(sd, "encoder.block.0.layer.0.SelfAttention.q.weight", w)
        gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in sd
        ff = _shape(sd, f"encoder.block.0.layer.1.DenseReluDense.{'wi_0' if gated else 'wi'}.weight", w)
        cfg = dict(vocab_size=vocab, d_model=d_model, d_kv=q[0] // heads, d_ff=ff[0], num_heads=heads,
                   num_layers=_count_blocks(sd, "encoder.block."), relative_attention_num_buckets=rel[0],
                   relative_attention_max_distance=128, feed_forward_proj="gated-gelu" if gated else "relu",
                   layer_norm_epsilon=1e-6)
    cfg.update(is_encoder_decoder=False, use_cache=False, dropout_rate=0.0)
    cfg.pop("architectures", None)
    return T5Config(**cfg)


def clip_config(w: TextEncoderWeights):
    """transformers' CLIPTextConfig: the folder's config.json, else CLIP-L's (heads of width 64) from the shapes."""
    from transformers import CLIPTextConfig

    if w.config:
        cfg = dict(w.config)
        cfg.pop("architectures", None)
        return CLIPTextConfig(**cfg)
    sd = w.tensors
    vocab, hidden = _shape(sd, "embeddings.token_embedding.weight", w)
    positions = _shape(sd, "embeddings.position_embedding.weight", w)[0]
    inter = _shape(sd, "encoder.layers.0.mlp.fc1.weight", w)[0]
    # eos_token_id 2 is the value of CLIP-L's published config (FLUX's text_encoder/): pool at the highest token id,
    # which is the end-of-text token in CLIP's vocabulary.
    return CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_attention_heads=max(1, hidden // 64),
                          num_hidden_layers=_count_blocks(sd, "encoder.layers."), max_position_embeddings=positions,
                          hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=hidden, bos_token_id=0,
                          eos_token_id=2, pad_token_id=1)


def _shape(sd: Mapping[str, Tensor], key: str, w: TextEncoderWeights) -> tuple[int, ...]:
    t = sd.get(key)
    if t is None:
        raise CheckpointError(f"{w.source}: the {'T5' if w.kind == 't5' else 'CLIP-L'} text encoder has no '{key}'; "
                              "the file is incomplete or not this model. Download it again.")
    return tuple(t.logical_shape) if isinstance(t, GGMLTensor) else tuple(t.shape)


def _count_blocks(sd, prefix: str) -> int:
    idx = {int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)}
    return max(idx) + 1 if idx else 0


# ================================================================================================ building

def _swap_layers(model: nn.Module, linear_cls, embeddings: tuple[str, ...], compute_dtype) -> None:
    """Replace every nn.Linear by `linear_cls` and the named embeddings by StoredEmbedding (all on meta)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                new = linear_cls(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
                setattr(parent, name, new)
    for path in embeddings:
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        old = getattr(parent, name)
        new = StoredEmbedding(old.num_embeddings, old.embedding_dim, device="meta")
        new.compute_dtype = compute_dtype
        setattr(parent, name, new)


def _feed_forward_classes():
    from transformers.models.t5 import modeling_t5 as t5

    class _GatedFeedForward(t5.T5DenseGatedActDense):
        def forward(self, h):
            return self.wo(self.dropout(self.act(self.wi_0(h)) * self.wi_1(h)))

    class _FeedForward(t5.T5DenseActDense):
        def forward(self, h):
            return self.wo(self.dropout(self.act(self.wi(h))))

    return {t5.T5DenseGatedActDense: _GatedFeedForward, t5.T5DenseActDense: _FeedForward}


_FF_CACHE: dict = {}


def _no_storage_cast_ff(model: nn.Module) -> None:
    if not _FF_CACHE:
        _FF_CACHE.update(_feed_forward_classes())
    for m in model.modules():
        if type(m) in _FF_CACHE:
            m.__class__ = _FF_CACHE[type(m)]


def _assign(model: nn.Module, sd: dict[str, Tensor], w: TextEncoderWeights, optional_missing: set[str]) -> None:
    model.requires_grad_(False)
    result = model.load_state_dict(sd, strict=False, assign=True)
    missing = [k for k in result.missing_keys if k not in optional_missing]
    name = "T5" if w.kind == "t5" else "CLIP-L"
    if missing or result.unexpected_keys:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s) such as {missing[:3]}")
        if result.unexpected_keys:
            parts.append(f"{len(result.unexpected_keys)} unexpected such as {result.unexpected_keys[:3]}")
        raise CheckpointError(f"{w.source}: does not match the {name} architecture its shapes imply ("
                              f"{'; '.join(parts)}). The file is incomplete or another model; download it again.")


def _finish(model: nn.Module, w: TextEncoderWeights, compute_dtype, device) -> nn.Module:
    """Small tensors to the compute dtype; check nothing stayed on meta; move to `device`; eval mode."""
    for mod in model.modules():
        if isinstance(mod, (CastLinear, GGUFOps.Linear, StoredEmbedding)):
            continue
        for pname, p in list(mod.named_parameters(recurse=False)):
            if p.is_meta:
                continue
            setattr(mod, pname, nn.Parameter(materialize(p.data if not isinstance(p, GGMLTensor) else p,
                                                         compute_dtype, p.device), requires_grad=False))
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t is not None and t.is_meta]
    if left:
        raise CheckpointError(f"{w.source}: tensors {left[:3]} were not found in the file; it is incomplete.")
    return model.to(device).eval()


def _check_shapes(model: nn.Module, sd: Mapping[str, Tensor], w: TextEncoderWeights) -> None:
    own = model.state_dict()
    for k, v in sd.items():
        if k in own:
            want = tuple(own[k].shape)
            got = tuple(v.logical_shape) if isinstance(v, GGMLTensor) else tuple(v.shape)
            if want != got:
                raise CheckpointError(f"{w.source}: tensor '{k}' has shape {list(got)}, the architecture implies "
                                      f"{list(want)}; the file is corrupt or its config.json belongs to another "
                                      "model.")


def build_t5(w: TextEncoderWeights, compute_dtype=torch.float32, device="cpu") -> nn.Module:
    require_transformers()
    from transformers import T5EncoderModel

    config = t5_config(w)
    with torch.device("meta"):
        model = T5EncoderModel(config)
    linear = GGUFOps.Linear if w.container == "gguf" else CastLinear
    _swap_layers(model, linear, ("shared",), compute_dtype)
    model.encoder.embed_tokens = model.shared  # tied: one table
    _no_storage_cast_ff(model)
    sd = usable_tensors(w)
    if "shared.weight" not in sd and "encoder.embed_tokens.weight" in sd:
        sd["shared.weight"] = sd.pop("encoder.embed_tokens.weight")
    sd.pop("encoder.embed_tokens.weight", None)
    _check_shapes(model, sd, w)
    _assign(model, sd, w, {"encoder.embed_tokens.weight"})
    return _finish(model, w, compute_dtype, device)


def build_clip_l(w: TextEncoderWeights, compute_dtype=torch.float32, device="cpu") -> nn.Module:
    require_transformers()
    from transformers import CLIPTextModel

    config = clip_config(w)
    with torch.device("meta"):
        model = CLIPTextModel(config)
    prefix = "text_model." if hasattr(model, "text_model") else ""  # transformers 4 nests the transformer
    core = model.text_model if prefix else model
    _swap_layers(core, CastLinear, ("embeddings.token_embedding",), compute_dtype)
    sd = {prefix + k: v for k, v in usable_tensors(w).items()}
    _check_shapes(model, sd, w)
    _assign(model, sd, w, set())
    emb = core.embeddings
    emb.register_buffer("position_ids", torch.arange(config.max_position_embeddings).unsqueeze(0), persistent=False)
    return _finish(model, w, compute_dtype, device)
