"""Command line: `python -m kontext_core info FILE…`."""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from .errors import KontextError
from .memory import footprint, human_bytes


def _dtype_summary(qtypes: dict[str, str], tensors) -> str:
    count: Counter = Counter()
    size: Counter = Counter()
    for name, q in qtypes.items():
        count[q] += 1
        size[q] += int(tensors[name].nbytes) if name in tensors else 0
    return ", ".join(f"{q}: {count[q]} tensors ({human_bytes(size[q])})" for q in sorted(count, key=lambda q: -size[q]))


def describe_transformer(path: str) -> list[str]:
    from .weights.flux_layout import infer_flux_params, shape_of
    from .weights.loader import read_transformer

    ck = read_transformer(path)
    p = infer_flux_params(ck.tensors)
    n_params = 0
    for t in ck.tensors.values():
        n = 1
        for d in shape_of(t):
            n *= d
        n_params += n
    stored = sum(int(t.nbytes) for t in ck.tensors.values())
    fp = footprint(p, stored)
    kind = "FLUX transformer" + (" (guidance-distilled, Kontext/dev style)" if p.guidance_embed else " (no guidance embed)")
    lines = [
        f"{path}",
        f"  model        {kind}",
        f"  container    {ck.container}, layout {ck.layout}",
        f"  architecture hidden {p.hidden_size}, heads {p.num_heads}, double {p.depth}, single {p.depth_single_blocks}, "
        f"mlp x{p.mlp_ratio:g}, context {p.context_in_dim}, vector {p.vec_in_dim}, axes {list(p.axes_dim)}, "
        f"qkv bias {p.qkv_bias}",
        f"  parameters   {n_params:,} in {len(ck.tensors)} tensors",
        f"  storage      {_dtype_summary(ck.qtypes, ck.tensors)}",
        f"  file size    {human_bytes(ck.file_size)}",
        f"  memory       weights {human_bytes(fp.weights)} resident; + largest layer upcast {human_bytes(fp.largest_layer)}; "
        f"+ activations ≈ {human_bytes(fp.activations)} for 1024x1024 with one reference ({fp.n_tokens} tokens, bf16)",
    ]
    return lines


def describe_autoencoder(path: str) -> list[str]:
    from .weights.ae_layout import detect_ae_layout, infer_ae_params, strip_ae_prefix, convert_diffusers_vae_to_ldm
    from .weights.safetensors_io import load_state_dict

    sd = strip_ae_prefix(load_state_dict(path, prefer=("vae/diffusion_pytorch_model.safetensors",
                                                       "diffusion_pytorch_model.safetensors")))
    layout = detect_ae_layout(sd, source=path)
    if layout == "diffusers":
        sd = convert_diffusers_vae_to_ldm(sd)
    p = infer_ae_params(sd, source=path)
    n = sum(t.numel() for t in sd.values())
    dtypes = Counter(str(t.dtype).replace("torch.", "") for t in sd.values())
    return [f"{path}", "  model        FLUX autoencoder", f"  layout       {layout}",
            f"  architecture ch {p.ch}, mult {list(p.ch_mult)}, res blocks {p.num_res_blocks}, z {p.z_channels}",
            f"  parameters   {n:,} in {len(sd)} tensors ({dict(dtypes)})"]


def cmd_info(args) -> int:
    status = 0
    for path in args.files:
        try:
            try:
                lines = describe_transformer(path)
            except KontextError as first:
                try:
                    lines = describe_autoencoder(path)
                except KontextError:
                    raise first from None
        except KontextError as e:
            print(f"{path}\n  error: {e}", file=sys.stderr)
            status = 1
            continue
        print("\n".join(lines))
    return status


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m kontext_core", description="FLUX.1 Kontext engine tools")
    sub = ap.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="describe checkpoints: layout, architecture, dtypes, size, memory needs")
    info.add_argument("files", nargs="+", help="safetensors / GGUF files or diffusers folders")
    info.set_defaults(func=cmd_info)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
