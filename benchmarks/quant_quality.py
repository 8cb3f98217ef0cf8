"""Edit quality per weight storage type, measured with Kontext-Tiny on held-out triples (same seeds for every type).

    python benchmarks/quant_quality.py --out quant_out --per-type 20

Types: bf16 (as shipped), fp8 (scaled e4m3fn, `load_transformer(weight_dtype="fp8_e4m3fn")`), and the GGUF
targets Q8_0 ... Q2_K written by the engine's converter (`convert_to_gguf`) and loaded by `load_transformer`.
Kontext-Tiny is 192 wide: K-quant blocks hold 256 values, so the converter keeps every tensor whose rows are not a
multiple of 256 in F16 (the same rule every GGUF converter applies) and most of Tiny's block weights stay F16 in
the K files. The table says how much of the block weights each file really quantizes, and the `sim` rows show the
K-quant rounding applied to every block weight (rows zero-padded to 256, quantized, dequantized, cropped), the
sensitivity a model with K-quant-friendly widths (such as the 3072-wide Kontext dev) would see.

Per type: success rate, edit-only rate, preservation PSNR (median), PSNR vs the exact target (median), and the
PSNR of its outputs vs the bf16 outputs (median; same seeds, so this isolates the quantization).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.eval_tiny import eval_triples  # noqa: E402
from kontext_core.quant.gguf_dequant import dequantize  # noqa: E402
from kontext_core.quant.gguf_quantize import (GGML_QUANT_SIZES, KEEP_16BIT_PREFIXES, TARGETS, _SENSITIVE,  # noqa: E402
                                              quantize_tensor)
from kontext_core.tiny import KontextTiny, load_ae_and_text_encoder, weight_paths  # noqa: E402
from kontext_core.tiny.evaluate import edit_triples, psnr, score, summarize  # noqa: E402
from kontext_core.weights.gguf_convert import convert_to_gguf  # noqa: E402
from kontext_core.weights.loader import load_transformer, read_transformer  # noqa: E402
from kontext_core.weights.safetensors_io import load_state_dict  # noqa: E402

GGUF_TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K")
SIMULATED = ("Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K")


def block_weight_share(ckpt) -> float:
    """Share of the block Linear weights' parameters stored quantized (not F16/BF16/F32)."""
    total = quantized = 0
    for name, t in ckpt.tensors.items():
        if name.startswith(("double_blocks.", "single_blocks.")) and name.endswith(".weight") and len(t.shape) == 2:
            n = int(np.prod(t.shape))
            total += n
            quantized += n * (ckpt.qtypes.get(name, "F16").upper() not in ("F16", "BF16", "F32"))
    return quantized / total if total else 0.0


def simulated_kquant(src: Path, target: str) -> dict:
    """The bf16 state dict with every block weight K-quant rounded as `target` would (rows zero-padded to 256)."""
    base, high = TARGETS[target]
    sd = {k: v.float() for k, v in load_state_dict(src).items()}
    for name, w in sd.items():
        if w.ndim != 2 or name.startswith(KEEP_16BIT_PREFIXES) or not name.endswith(".weight"):
            continue
        q = high if _SENSITIVE.match(name) else base
        block = GGML_QUANT_SIZES[q][0]
        cols = -(-w.shape[1] // block) * block
        padded = torch.nn.functional.pad(w, (0, cols - w.shape[1]))
        raw = quantize_tensor(padded, q)
        sd[name] = dequantize(raw, q, padded.shape, torch.float32)[:, : w.shape[1]].to(torch.bfloat16)
    return sd


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="quant_out")
    ap.add_argument("--weights", help="folder with the three Kontext-Tiny files (default: shipped)")
    ap.add_argument("--per-type", type=int, default=20, help="held-out triples per edit type")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--types", default="bf16,fp8," + ",".join(GGUF_TYPES) + "," + ",".join(f"sim:{t}" for t in SIMULATED))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = weight_paths(args.weights)
    ae, te = load_ae_and_text_encoder(paths)
    triples = eval_triples(args.per_type)
    bf16_size = paths["transformer"].stat().st_size
    rows, reference = {}, None
    with tempfile.TemporaryDirectory() as tmp:
        for kind in [t.strip() for t in args.types.split(",") if t.strip()]:
            t0 = time.time()
            share, size = 0.0, bf16_size
            if kind == "bf16":
                model = load_transformer(paths["transformer"])
            elif kind == "fp8":
                model = load_transformer(paths["transformer"], weight_dtype="fp8_e4m3fn")
                share, size = 1.0, None
            elif kind.startswith("sim:"):
                model = load_transformer(simulated_kquant(paths["transformer"], kind[4:]))
                share, size = 1.0, None
            else:
                gguf = convert_to_gguf(paths["transformer"], Path(tmp) / f"tiny-{kind}.gguf", kind)
                share, size = block_weight_share(read_transformer(gguf)), gguf.stat().st_size
                model = load_transformer(gguf)
            tiny = KontextTiny(model.eval(), ae, te)
            outputs = edit_triples(tiny, triples, steps=args.steps)
            summary = summarize([score(t, o) for t, o in zip(triples, outputs)])["all"]
            if kind == "bf16":
                reference = outputs
            vs_bf16 = (float(np.median([min(psnr(o, r), 99.0) for o, r in zip(outputs, reference)]))
                       if reference is not None else float("nan"))
            rows[kind] = {**summary, "quantized_share": share, "file_bytes": size, "vs_bf16_db_median": vs_bf16,
                          "seconds": round(time.time() - t0, 1)}
            print(f"{kind}: success {100 * summary['success']:.1f} %, kept {summary['preservation_db_median']:.1f} dB, "
                  f"vs bf16 {vs_bf16:.1f} dB, {rows[kind]['seconds']} s", flush=True)
    lines = [f"Kontext-Tiny on {len(triples)} held-out triples ({args.per_type} per edit type), same seeds for every "
             "type", "",
             "| Storage | Block weights quantized | File | Success | Edit done | Preservation PSNR (median) | "
             "PSNR vs target (median) | PSNR vs bf16 output (median) |",
             "|---|---|---|---|---|---|---|---|"]
    for kind, r in rows.items():
        f = "-" if r["file_bytes"] is None else f"{r['file_bytes'] / 2 ** 20:.1f} MiB"
        vs = "reference" if kind == "bf16" else ("identical" if r["vs_bf16_db_median"] >= 99 else
                                                  f"{r['vs_bf16_db_median']:.1f} dB")
        lines.append(f"| {kind} | {100 * r['quantized_share']:.0f} % | {f} | {100 * r['success']:.1f} % | "
                     f"{100 * r['edit_ok']:.1f} % | {r['preservation_db_median']:.1f} dB | {r['target_db_median']:.1f} dB | "
                     f"{vs} |")
    md = "\n".join(lines)
    (out / "metrics.md").write_text(md + "\n")
    (out / "metrics.json").write_text(json.dumps({"n": len(triples), "per_type": args.per_type, "rows": rows}, indent=2))
    print(md)
    return rows


if __name__ == "__main__":
    main()
