"""Loading the FLUX autoencoder from the layouts people actually have on disk.

Accepted sources (the layout is detected from the keys, never from the file name):

* BFL's `ae.safetensors` (LDM key names, the names `kontext_core.model.autoencoder` uses);
* a bundled checkpoint holding the AE under `vae.` (ComfyUI), `first_stage_model.` (LDM) or `ae.`; the other
  components of such a file (`model.diffusion_model.*`, `text_encoders.*` ...) are ignored;
* a diffusers `AutoencoderKL` (`vae/diffusion_pytorch_model.safetensors`, or the pipeline root above it),
  converted to LDM names here. diffusers stores the attention projections as Linear (C, C) weights; they become
  (C, C, 1, 1) views. No other tensor is copied: the module's parameters are the file's mmap pages.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..model.autoencoder import AutoEncoder, AutoEncoderParams
from .flux_layout import describe_keys, key_mismatch
from .safetensors_io import load_state_dict

AE_PREFIXES = ("vae.", "first_stage_model.", "ae.")

_EXPECTED = ("Expected the FLUX autoencoder: BFL's `ae.safetensors`, a checkpoint bundling it under `vae.`, "
             "or a diffusers `vae/` folder (diffusion_pytorch_model.safetensors).")

_DIFFUSERS_PREFERRED = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json")


def strip_ae_prefix(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep only the AE's tensors of a bundled file, without their prefix. Unprefixed dicts are returned as is."""
    for prefix in AE_PREFIXES:
        sub = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if sub:
            return sub
    return dict(sd)


def _guess_what(keys) -> str:
    keys = list(keys)
    probes = [
        (("double_blocks.", "single_blocks.", "transformer_blocks.", "single_transformer_blocks."),
         "a FLUX transformer (DiT)"),
        (("model.diffusion_model.",), "a diffusion model checkpoint without an AE"),
        (("text_model.", "shared.weight", "encoder.block.", "text_encoders."), "a text encoder (CLIP/T5)"),
        (("input_blocks.", "down_blocks.0.attentions"), "a UNet"),
    ]
    for needles, what in probes:
        if any(any(k.startswith(n) or ("." + n) in k for n in needles) for k in keys):
            return what
    return "no recognisable autoencoder"


def detect_ae_layout(sd: Mapping[str, torch.Tensor], *, source: str = "state dict") -> str:
    """'ldm' (BFL / ComfyUI names) or 'diffusers' (AutoencoderKL names), after stripping a bundle prefix."""
    keys = strip_ae_prefix(sd).keys()
    if any(k.startswith(("encoder.down.", "decoder.up.", "encoder.mid.block_1.", "decoder.mid.block_1."))
           for k in keys):
        return "ldm"
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in keys):
        return "diffusers"
    raise CheckpointError(
        f"{source}: not an autoencoder. Found {len(sd)} tensors that look like {_guess_what(sd.keys())} "
        f"(e.g. {describe_keys(sd.keys())}). {_EXPECTED} Check that you selected the VAE file, not the model "
        "or a text encoder.")


# --- diffusers -> LDM ------------------------------------------------------------------------------------

_ATTN_NAMES = {
    "group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
    # older diffusers checkpoints
    "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out",
}
_RESNET_PART = {"conv_shortcut": "nin_shortcut"}
_TOP = {"conv_in": "conv_in", "conv_out": "conv_out", "conv_norm_out": "norm_out"}

_RE_RESNET = re.compile(r"^(encoder|decoder)\.(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(weight|bias)$")
_RE_RESAMPLE = re.compile(r"^(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(downsamplers|upsamplers)\.0\.conv\."
                          r"(weight|bias)$")
_RE_MID_RES = re.compile(r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(\w+)\.(weight|bias)$")
_RE_MID_ATTN = re.compile(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0|"
                          r"query|key|value|proj_attn)\.(weight|bias)$")
_RE_TOP = re.compile(r"^(encoder|decoder)\.(conv_in|conv_out|conv_norm_out)\.(weight|bias)$")


def _as_conv1x1(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(*t.shape, 1, 1) if t.ndim == 2 else t


def convert_diffusers_vae_to_ldm(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename diffusers AutoencoderKL keys to the LDM layout. Unknown keys are kept (the loader reports them)."""
    sd = strip_ae_prefix(sd)
    n_up = 1 + max((int(m.group(3)) for k in sd if (m := _RE_RESNET.match(k)) and m.group(1) == "decoder"),
                   default=-1)
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        if m := _RE_RESNET.match(key):
            part, i, j, name, kind = m.group(1), int(m.group(3)), m.group(4), m.group(5), m.group(6)
            level = f"down.{i}" if part == "encoder" else f"up.{n_up - 1 - i}"
            new = f"{part}.{level}.block.{j}.{_RESNET_PART.get(name, name)}.{kind}"
        elif m := _RE_RESAMPLE.match(key):
            part, i, kind = m.group(1), int(m.group(3)), m.group(5)
            new = (f"encoder.down.{i}.downsample.conv.{kind}" if part == "encoder"
                   else f"decoder.up.{n_up - 1 - i}.upsample.conv.{kind}")
        elif m := _RE_MID_RES.match(key):
            part, j, name, kind = m.group(1), int(m.group(2)), m.group(3), m.group(4)
            new = f"{part}.mid.block_{j + 1}.{_RESNET_PART.get(name, name)}.{kind}"
        elif m := _RE_MID_ATTN.match(key):
            part, name, kind = m.groups()
            new = f"{part}.mid.attn_1.{_ATTN_NAMES[name]}.{kind}"
            if kind == "weight" and name != "group_norm":
                t = _as_conv1x1(t)
        elif m := _RE_TOP.match(key):
            part, name, kind = m.groups()
            new = f"{part}.{_TOP[name]}.{kind}"
        else:
            new = key  # quant_conv, post_quant_conv, foreign tensors: reported by the loader
        if new in out:
            raise CheckpointError(f"diffusers VAE: two tensors map to '{new}' (the second is '{key}'); "
                                  "the file mixes layouts.")
        out[new] = t
    return out


# --- architecture from shapes ------------------------------------------------------------------------------

def _shape(sd, key: str, source: str) -> tuple[int, ...]:
    if key not in sd:
        raise CheckpointError(f"{source}: autoencoder tensor '{key}' is missing, so the architecture cannot be "
                              f"determined. {_EXPECTED}")
    return tuple(sd[key].shape)


def infer_ae_params(sd: Mapping[str, torch.Tensor], *, source: str = "state dict") -> AutoEncoderParams:
    """Architecture (channels, levels, blocks, z) of an LDM-layout AE state dict, from tensor shapes.

    The latent scale/shift cannot be seen in the weights; the FLUX values (0.3611, 0.1159) are used.
    """
    conv_in = _shape(sd, "encoder.conv_in.weight", source)
    if len(conv_in) != 4:
        raise CheckpointError(f"{source}: 'encoder.conv_in.weight' has shape {list(conv_in)}, expected a 4-d conv "
                              "weight (out, in, 3, 3).")
    ch, in_channels = conv_in[0], conv_in[1]
    levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"^encoder\.down\.(\d+)\.", k))})
    if not levels or levels != list(range(len(levels))):
        raise CheckpointError(f"{source}: encoder levels {levels} are not 0..n-1; the AE is incomplete.")
    blocks = sorted({int(m.group(1)) for k in sd if (m := re.match(r"^encoder\.down\.0\.block\.(\d+)\.", k))})
    num_res_blocks = len(blocks)
    if num_res_blocks == 0 or blocks != list(range(num_res_blocks)):
        raise CheckpointError(f"{source}: encoder level 0 has res blocks {blocks}; the AE is incomplete.")
    ch_mult = []
    for i in levels:
        width = _shape(sd, f"encoder.down.{i}.block.0.conv1.weight", source)[0]
        if width % ch:
            raise CheckpointError(f"{source}: encoder level {i} has {width} channels, not a multiple of the "
                                  f"base width {ch}; this is not a FLUX/LDM autoencoder.")
        ch_mult.append(width // ch)
    enc_out = _shape(sd, "encoder.conv_out.weight", source)[0]
    dec_in = _shape(sd, "decoder.conv_in.weight", source)
    z_channels = dec_in[1]
    if enc_out != 2 * z_channels:
        raise CheckpointError(f"{source}: encoder outputs {enc_out} channels but the decoder takes {z_channels}; "
                              f"expected encoder output = 2 x latent channels. The file mixes two models.")
    out_ch = _shape(sd, "decoder.conv_out.weight", source)[0]
    up_blocks = sorted({int(m.group(1)) for k in sd if (m := re.match(r"^decoder\.up\.0\.block\.(\d+)\.", k))})
    if len(up_blocks) != num_res_blocks + 1:
        raise CheckpointError(f"{source}: decoder level 0 has {len(up_blocks)} res blocks, expected "
                              f"{num_res_blocks + 1} (encoder has {num_res_blocks} per level).")
    for width in {ch * m for m in ch_mult} | {ch}:
        if width % 32:
            raise CheckpointError(f"{source}: width {width} is not divisible by the 32 GroupNorm groups.")
    return AutoEncoderParams(in_channels=in_channels, ch=ch, out_ch=out_ch, ch_mult=tuple(ch_mult),
                             num_res_blocks=num_res_blocks, z_channels=z_channels)


# --- what the Kontext sampler can use --------------------------------------------------------------------------

FLUX_Z_CHANNELS = 16


def check_ae_tensors(sd: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse SD-style VAEs (quant convs) and zero-size or integer tensors before the architecture is inferred."""
    quant = [k for k in sd if k.startswith(("quant_conv.", "post_quant_conv."))]
    if quant:
        raise CheckpointError(f"{source}: has {', '.join(sorted(quant))}: this is an SD-style VAE with quant "
                              f"convs, not the FLUX autoencoder. {_EXPECTED}")
    for k, t in sd.items():
        if 0 in t.shape:
            raise CheckpointError(f"{source}: tensor '{k}' has zero size {list(t.shape)}; the file is corrupt. "
                                  "Download it again.")
        if not t.is_floating_point():
            raise CheckpointError(f"{source}: tensor '{k}' has dtype {t.dtype}, expected a float type; the file is "
                                  "corrupt or not an autoencoder.")


def check_flux_ae(params: AutoEncoderParams, source: str) -> None:
    """Any KL autoencoder with 16 latent channels (FLUX's), whatever its width; SD-family VAEs have 4."""
    if params.z_channels != FLUX_Z_CHANNELS:
        family = " (an SD 1.x/2.x/XL-style VAE)" if params.z_channels == 4 else ""
        raise CheckpointError(f"{source}: this autoencoder has {params.z_channels} latent channels{family}; "
                              f"FLUX.1 Kontext latents have {FLUX_Z_CHANNELS}. {_EXPECTED}")


# --- loading -----------------------------------------------------------------------------------------------

def _read_source(src) -> tuple[dict[str, torch.Tensor], str, dict]:
    """(state dict, name for messages, diffusers config or {})."""
    if isinstance(src, Mapping):
        return dict(src), "state dict", {}
    p = Path(os.fspath(src))
    config: dict = {}
    if p.is_dir():
        if (p / "vae").is_dir() and not list(p.glob("*.safetensors")):
            p = p / "vae"  # diffusers pipeline root
        cfg = p / "config.json"
        if cfg.is_file():
            try:
                config = json.loads(cfg.read_text())
            except (OSError, ValueError):
                config = {}
    sd = load_state_dict(p, prefer=_DIFFUSERS_PREFERRED)
    return sd, str(p), config if isinstance(config, dict) else {}


def _pick_dtype(sd: Mapping[str, torch.Tensor]) -> torch.dtype | None:
    """dtype to run in when the caller gave none: a single stored float dtype is kept (None = no cast);
    fp8 storage -> bfloat16 (convolutions cannot run in fp8); a mix of dtypes -> float32."""
    dtypes = {t.dtype for t in sd.values()}
    if len(dtypes) > 1:
        return torch.float32
    if dtypes and next(iter(dtypes)).itemsize == 1:
        return torch.bfloat16
    return None


def load_autoencoder(src, *, dtype: torch.dtype | None = None, device="cpu",
                     params: AutoEncoderParams | None = None) -> AutoEncoder:
    """Build the FLUX AE from a file / folder / state dict. Parameters are the (mmap) tensors of the source,
    converted only if `dtype` / `device` ask for it. Returns the module in eval mode without gradients."""
    sd, source, config = _read_source(src)
    layout = detect_ae_layout(sd, source=source)
    sd = convert_diffusers_vae_to_ldm(sd) if layout == "diffusers" else strip_ae_prefix(sd)
    for name in ("q", "k", "v", "proj_out"):  # some LDM conversions store these as Linear weights
        for part in ("encoder", "decoder"):
            key = f"{part}.mid.attn_1.{name}.weight"
            if key in sd:
                sd[key] = _as_conv1x1(sd[key])
    check_ae_tensors(sd, source)
    if params is None:
        params = infer_ae_params(sd, source=source)
        if "scaling_factor" in config and "shift_factor" in config and config["shift_factor"] is not None:
            params.scale_factor = float(config["scaling_factor"])
            params.shift_factor = float(config["shift_factor"])
    check_flux_ae(params, source)

    ae = AutoEncoder(params, device="meta")
    expected = {k: tuple(v.shape) for k, v in ae.state_dict().items()}
    mismatch = key_mismatch(expected, sd)
    if mismatch:
        raise CheckpointError(f"{source}: does not match the FLUX autoencoder for {params}: {mismatch}. "
                              f"The file is incomplete or a different model. {_EXPECTED}")
    for k, shape in expected.items():
        if tuple(sd[k].shape) != shape:
            raise CheckpointError(f"{source}: tensor '{k}' has shape {list(sd[k].shape)}, expected {list(shape)} "
                                  f"for {params}. The file is a different or corrupted model.")
        if not sd[k].is_floating_point():
            raise CheckpointError(f"{source}: tensor '{k}' has dtype {sd[k].dtype}, expected a float type.")
    ae.load_state_dict(sd, strict=True, assign=True)
    ae.source = None if isinstance(src, Mapping) else source  # named in errors about the weights (e.g. NaN results)
    if dtype is None:
        dtype = _pick_dtype(sd)
    ae.to(device=device, dtype=dtype)
    ae.eval()
    ae.requires_grad_(False)
    return ae
