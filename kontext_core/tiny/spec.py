"""Kontext-Tiny's architecture: the engine's own classes at a small size (shared by training and loading)."""

from __future__ import annotations

from ..model.autoencoder import AutoEncoderParams
from ..model.flux import FluxParams
from .edits import vocabulary
from .text_encoder import PAD, UNK, TextEncoderConfig

# 16 latent channels, 8x down, the FLUX latent scale/shift; 32 channels is the least GroupNorm(32) allows.
AE_PARAMS = AutoEncoderParams(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, z_channels=16)
# The FLUX DiT layout (in/out 64 = 16 channels x 2x2 patches, guidance embedding, qkv bias) at hidden 192;
# head dim 32 with the RoPE split the loaders infer for it.
DIT_PARAMS = FluxParams(in_channels=64, out_channels=64, vec_in_dim=128, context_in_dim=128, hidden_size=192,
                        num_heads=6, depth=2, depth_single_blocks=4, axes_dim=(4, 14, 14))
TEXT_CONFIG = TextEncoderConfig(vocab_size=len(vocabulary()) + len({PAD, UNK}), max_length=16, width=128, heads=4,
                                layers=2, context_dim=DIT_PARAMS.context_in_dim, pooled_dim=DIT_PARAMS.vec_in_dim)


def latent_tokens(h: int, w: int) -> int:
    return (-(-h // 2)) * (-(-w // 2))
