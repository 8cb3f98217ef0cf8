"""Command line: `python -m kontext_core info FILE…`, `convert SRC OUT --type Q4_K_M`,
`plan [FILE] --gpu NAME --ram GB`."""

from __future__ import annotations

import argparse
import sys
from collections import Counter

from .errors import KontextError
from .memory import T5_STORAGES, footprint, human_bytes


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


def cmd_convert(args) -> int:
    from .quant.gguf_quantize import convert_to_gguf

    def progress(i, n, name):
        print(f"  [{i}/{n}] {name}", end="\r", flush=True)

    try:
        convert_to_gguf(args.src, args.out, args.type, progress=progress)
    except KontextError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print()
    return cmd_info(argparse.Namespace(files=[args.out]))


def _parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 1024x1024, got {text!r}") from None
    return w, h


def cmd_plan(args) -> int:
    from .hardware import gpu_table
    from .planner import STORAGES, Assumptions, machine, report
    from .weights.flux_layout import infer_flux_params
    from .weights.loader import read_transformer

    if args.list_gpus:
        print(gpu_table())
        return 0
    try:
        if args.model:
            params = infer_flux_params(read_transformer(args.model).tensors)
        else:
            from .model.flux import KONTEXT_DEV as params
        m = machine(args.gpu, args.vram, args.ram)
        a = Assumptions(fp8_matmul=args.fp8_matmul, pinned=args.pinned, link_gbps=args.pcie_gbps,
                        free_text_encoder=args.free_text_encoder)
        w, h = args.size
        print(report(params, m, w, h, args.refs, args.text_encoder, a, STORAGES))
    except KontextError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m kontext_core", description="FLUX.1 Kontext engine tools")
    sub = ap.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="describe checkpoints: layout, architecture, dtypes, size, memory needs")
    info.add_argument("files", nargs="+", help="safetensors / GGUF files or diffusers folders")
    info.set_defaults(func=cmd_info)

    conv = sub.add_parser("convert", help="convert a safetensors transformer to GGUF (streamed, tensor by tensor)")
    conv.add_argument("src", help="BFL / ComfyUI safetensors transformer")
    conv.add_argument("out", help="output .gguf file")
    conv.add_argument("--type", default="Q8_0",
                      help="Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q5_0, Q5_1, Q4_0, Q4_1, Q3_K_M, Q2_K, F16, BF16")
    conv.set_defaults(func=cmd_convert)

    pl = sub.add_parser("plan", help="predict GPU memory, RAM, speed and quality per storage type on your machine; "
                                     "recommend one")
    pl.add_argument("model", nargs="?", help="transformer file (architecture); default: FLUX.1 Kontext dev")
    pl.add_argument("--gpu", help="GPU by name, e.g. 'RTX 4060 Laptop' (see --list-gpus); default: this machine's")
    pl.add_argument("--list-gpus", action="store_true", help="print the GPU table the planner knows and exit")
    pl.add_argument("--vram", type=float, help="GPU memory to plan for in GiB (default: the card's)")
    pl.add_argument("--ram", type=float, help="system RAM in GiB (default: this machine's)")
    pl.add_argument("--size", type=_parse_size, default=(1024, 1024), help="output WxH, default 1024x1024")
    pl.add_argument("--refs", type=int, default=1, help="number of context images (each at the output size)")
    pl.add_argument("--text-encoder", default="fp8", choices=T5_STORAGES,
                    help="T5-XXL in use: fp16 (9.5 GB), fp8 (4.9 GB, default), a GGUF type, or none (saved "
                         "conditioning); CLIP-L is always counted")
    pl.add_argument("--free-text-encoder", action="store_true",
                    help="text encoders are freed after encoding (default: kept in RAM, as ComfyUI does)")
    pl.add_argument("--fp8-matmul", action="store_true", help="multiply fp8 weights in fp8 (needs cc >= 8.9)")
    pl.add_argument("--pinned", action="store_true", help="streamed weights in pinned memory (stream_model's "
                                                          "pin_memory): faster copies, page-locked RAM")
    pl.add_argument("--pcie-gbps", type=float, help="measured host-to-device GB/s (default: from the card's link)")
    pl.set_defaults(func=cmd_plan)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
