"""Evaluate Kontext-Tiny on held-out triples, exactly, from the scene descriptions.

    python benchmarks/eval_tiny.py --out eval_out            # 40 triples per edit type (360), shipped weights

Writes eval_out/metrics.json, eval_out/metrics.md (per-type success, preservation PSNR outside the dilated edited
region vs the context, PSNR vs the exact target), and one contact sheet per edit type with successes AND
failures. Also measures the autoencoder alone: its reconstruction PSNR and the success rate of AE(target), the
ceiling any edit through this AE can reach.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kontext_core.tiny import DEFAULT_STEPS, load  # noqa: E402
from kontext_core.tiny.edits import EDIT_TYPES, HELD_OUT_SEEDS, make_triple  # noqa: E402
from kontext_core.tiny.evaluate import edit_triples, psnr, score, summarize, summary_table, to_uint8  # noqa: E402
from kontext_core.tiny.scene import render  # noqa: E402
from kontext_core.tiny.sheet import contact_sheet  # noqa: E402

EVAL_SEED_BASE = HELD_OUT_SEEDS.start


def eval_triples(per_type: int):
    return [make_triple(EVAL_SEED_BASE + 100_000 * k + i, kind=kind)
            for k, kind in enumerate(EDIT_TYPES) for i in range(per_type)]


@torch.no_grad()
def autoencoder_only(tiny, triples, batch: int = 64):
    """AE(target) for every triple: (reconstruction PSNR per image, its scores as if it were the edit)."""
    recon = []
    for i in range(0, len(triples), batch):
        tgt = np.stack([render(t.target).image for t in triples[i:i + batch]])
        lat = tiny.encode_images(torch.from_numpy(tgt).permute(0, 3, 1, 2).float() / 255)
        recon.extend(to_uint8(tiny.ae.decode(lat)))
    psnrs = [psnr(r, render(t.target).image) for r, t in zip(recon, triples)]
    return psnrs, [score(t, r) for t, r in zip(triples, recon)]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="eval_out")
    ap.add_argument("--weights", help="folder with the three Kontext-Tiny files (default: shipped)")
    ap.add_argument("--per-type", type=int, default=40)
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sheet-rows", type=int, default=4, help="successes and failures shown per edit type")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tiny = load(args.weights)
    triples = eval_triples(args.per_type)
    t0 = time.time()
    outputs = edit_triples(tiny, triples, steps=args.steps, seed=args.seed)
    seconds = time.time() - t0
    scores = [score(t, o) for t, o in zip(triples, outputs)]
    summary = summarize(scores)
    ae_psnr, ae_scores = autoencoder_only(tiny, triples)
    ae_summary = summarize(ae_scores)
    for kind in EDIT_TYPES:
        rows = []
        idx = [i for i, t in enumerate(triples) if t.kind == kind]
        good = [i for i in idx if scores[i].success][: args.sheet_rows]
        bad = [i for i in idx if not scores[i].success][: args.sheet_rows]
        for i in good + bad:
            s = scores[i]
            verdict = ("OK " if s.success else "FAIL ") + s.detail
            if not np.isnan(s.preservation_db):
                verdict += f", kept {s.preservation_db:.1f} dB"
            rows.append({"context": render(triples[i].context).image, "output": outputs[i],
                         "target": render(triples[i].target).image, "instruction": triples[i].instruction,
                         "verdict": verdict, "ok": s.success})
        contact_sheet(rows, out / f"sheet_{kind}.png",
                      f"{kind}: {100 * summary[kind]['success']:.0f} % of {summary[kind]['n']} held-out edits")
    metrics = {"steps": args.steps, "n": len(triples), "edit_seconds": round(seconds, 1),
               "per_type": summary, "ae_psnr_median": float(np.median(ae_psnr)),
               "ae_psnr_mean": float(np.mean(ae_psnr)), "ae_ceiling": ae_summary}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    md = [f"Kontext-Tiny on {len(triples)} held-out triples, {args.steps} Euler steps "
          f"({seconds:.0f} s for all edits on {torch.get_num_threads()} CPU threads)", "", summary_table(summary), "",
          f"Autoencoder alone: reconstruction PSNR {np.median(ae_psnr):.1f} dB (median), "
          f"{np.mean(ae_psnr):.1f} dB (mean); success of AE(exact target) {100 * ae_summary['all']['success']:.0f} %, "
          f"its preservation {ae_summary['all']['preservation_db_median']:.1f} dB (the ceiling for any edit)."]
    (out / "metrics.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return metrics


if __name__ == "__main__":
    main()
