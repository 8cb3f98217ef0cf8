"""Drift over multi-turn edit chains: pixel hand-over vs latent hand-over vs anchored chains, with Kontext-Tiny.

    python benchmarks/chain_drift.py --out chain_out                  # 100 held-out scenes x 10 turns, 3 modes

Every scene gets a chain of random edits (`make_chain`); turn k of all scenes runs as one batch with the same
noise seeds in every mode. Per turn: edit success (`score`), preservation PSNR of the pixels no turn has edited so
far vs the original (PSNR of the MSE pooled over scenes, and the per-scene median), the share of those pixels
that are identical to the original, and the global pixel shift (phase correlation). Writes metrics.json,
metrics.md (the per-turn tables), chain_drift.png (per-turn curves) and chains.png (one chain in each mode).
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

from kontext_core.chain import ESTIMATORS, FEATHER, GROW  # noqa: E402
from kontext_core.tiny import DEFAULT_STEPS, load  # noqa: E402
from kontext_core.tiny.chains import MODES, mask_quality, run_chains, score_chains  # noqa: E402
from kontext_core.tiny.edits import HELD_OUT_SEEDS, make_chain  # noqa: E402
from kontext_core.tiny.plot import line_plot  # noqa: E402
from kontext_core.tiny.scene import render  # noqa: E402
from kontext_core.tiny.sheet import contact_sheet  # noqa: E402

CHAIN_SEED_BASE = HELD_OUT_SEEDS.start + 8_000_000
CALIBRATION_SEED_BASE = HELD_OUT_SEEDS.start + 9_000_000
PIXEL_THRESHOLDS = (8, 12, 16, 24, 32, 48)
LATENT_THRESHOLDS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4)


@torch.no_grad()
def calibrate(tiny, n: int, steps: int, grow: int) -> dict:
    """Single held-out edits (their own seeds, not the chains'): for each estimator and threshold, the share of
    the exact edited region marked as changed (recall) and of the pixels the edit must keep (false positives)."""
    from kontext_core.chain import dilate, estimate_change, to_pixel_mask
    from kontext_core.tiny.edits import make_triple
    from kontext_core.tiny.evaluate import dilate as np_dilate, edited_region

    triples = [t for t in (make_triple(CALIBRATION_SEED_BASE + i) for i in range(n)) if t.kind != "style"]
    images = torch.from_numpy(np.stack([render(t.context).image for t in triples])).permute(0, 3, 1, 2).float() / 255
    ctx = tiny.encode_images(images)
    res = tiny.edit(latent=ctx, prompt=[t.instruction for t in triples], steps=steps,
                    seed=list(range(len(triples))))
    before, after = tiny.ae.decode(ctx).float(), res.pixels.float()
    truth = [edited_region(render(t.context), render(t.target), t) for t in triples]
    keep = [~np_dilate(r, 2) for r in truth]
    out = {}
    for est, thresholds in (("pixels", PIXEL_THRESHOLDS), ("latent", LATENT_THRESHOLDS)):
        for th in thresholds:
            m = (estimate_change(before, after, th) if est == "pixels"
                 else to_pixel_mask(estimate_change(ctx, res.latent, th), 8))
            m = dilate(m, grow)[:, 0].numpy()
            rec = float(np.mean([mi[r].mean() for mi, r in zip(m, truth) if r.any()]))
            fp = float(np.mean([mi[k].mean() for mi, k in zip(m, keep) if k.any()]))
            out[f"{est}@{th:g}"] = {"recall": rec, "false_positive": fp}
    return out


def fmt_db(v: float) -> str:
    return "n/a" if np.isnan(v) else ("identical" if np.isinf(v) else f"{v:.1f}")


def table(rows_by_mode: dict) -> str:
    modes = list(rows_by_mode)
    head = ("| turn | " + " | ".join(f"{m}: success" for m in modes) + " | "
            + " | ".join(f"{m}: kept PSNR (dB)" for m in modes) + " | "
            + " | ".join(f"{m}: shift (px)" for m in modes) + " |")
    lines = [head, "|" + "---|" * (1 + 3 * len(modes))]
    for k in range(len(rows_by_mode[modes[0]])):
        r = [rows_by_mode[m][k] for m in modes]
        lines.append(f"| {k + 1} | " + " | ".join(f"{100 * x['success']:.0f} %" for x in r) + " | "
                     + " | ".join(f"{fmt_db(x['preservation_db'])} (med {fmt_db(x['preservation_db_median'])})"
                                  for x in r) + " | "
                     + " | ".join(f"{x['shift_px']:.2f}" for x in r) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="chain_out")
    ap.add_argument("--weights", help="folder with the three Kontext-Tiny files (default: shipped)")
    ap.add_argument("--scenes", type=int, default=100)
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=50, help="chains edited together per call")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--estimator", default="pixels", choices=ESTIMATORS, help="anchored: how a turn's change is found")
    ap.add_argument("--threshold", type=float, help="anchored: change threshold (default: the engine's)")
    ap.add_argument("--grow", type=int, default=GROW)
    ap.add_argument("--feather", type=int, default=FEATHER)
    ap.add_argument("--no-colour-match", action="store_true")
    ap.add_argument("--calibrate", type=int, default=0, metavar="N",
                    help="first measure the change estimators on N single held-out edits (own seeds) and stop")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    tiny = load(args.weights)
    if args.calibrate:
        cal = calibrate(tiny, args.calibrate, args.steps, args.grow)
        lines = ["| estimator@threshold | recall of the edited region | never-edited pixels marked |", "|---|---|---|"]
        lines += [f"| {k} | {100 * v['recall']:.1f} % | {100 * v['false_positive']:.2f} % |" for k, v in cal.items()]
        (out / "calibration.md").write_text("\n".join(lines) + "\n")
        (out / "calibration.json").write_text(json.dumps(cal, indent=2))
        print("\n".join(lines))
        return cal
    chains = [make_chain(CHAIN_SEED_BASE + i, args.turns) for i in range(args.scenes)]
    options = {"estimator": args.estimator, "threshold": args.threshold, "grow": args.grow,
               "feather_px": args.feather, "colour_match": not args.no_colour_match}

    def progress(mode, done, total, turn, turns):
        print(f"  {mode}: chains {done}/{total}, turn {turn}/{turns}", flush=True)

    rows, seconds, outputs, masks = {}, {}, {}, {}
    for mode in modes:
        t0 = time.time()
        res = run_chains(tiny, chains, mode, steps=args.steps, seed=args.seed, batch=args.batch,
                         chain_options=options, progress=progress)
        seconds[mode] = round(time.time() - t0, 1)
        outputs[mode] = res["outputs"]
        rows[mode] = score_chains(chains, res["outputs"])
        if res["changed"] is not None:
            masks[mode] = mask_quality(chains, res["changed"])
        print(f"{mode}: {seconds[mode]} s; turn {args.turns}: success {100 * rows[mode][-1]['success']:.0f} %, "
              f"kept {fmt_db(rows[mode][-1]['preservation_db'])} dB", flush=True)

    turns = list(range(1, args.turns + 1))
    line_plot([("edit success per turn (share of chains)", [(m, turns, [r["success"] for r in rows[m]]) for m in modes]),
               ("never-edited pixels vs original: PSNR of pooled MSE (dB, identical shown as 99)",
                [(m, turns, [min(r["preservation_db"], 99.0) for r in rows[m]]) for m in modes]),
               ("global shift vs original (px, phase correlation)",
                [(m, turns, [r["shift_px"] for r in rows[m]]) for m in modes])],
              out / "chain_drift.png")
    sheet_rows = []
    for mode in modes:
        for k, t in enumerate(chains[0]):
            sheet_rows.append({"context": render(t.context).image if k == 0 else outputs[mode][0][k - 1],
                               "output": outputs[mode][0][k], "target": render(t.target).image,
                               "instruction": f"{mode}, turn {k + 1}: {t.instruction}"})
    contact_sheet(sheet_rows, out / "chains.png", f"one chain, {args.turns} turns, in each mode")
    metrics = {"scenes": args.scenes, "turns": args.turns, "steps": args.steps, "anchored_options": options,
               "seconds": seconds, "per_turn": rows, "mask_quality": masks, "threads": torch.get_num_threads()}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    md = [f"Kontext-Tiny, {args.scenes} held-out scenes x {args.turns}-turn chains of random edits, "
          f"{args.steps} steps; seconds per mode: {seconds}", "", table(rows), ""]
    for mode, q in masks.items():
        md.append(f"{mode}: estimated change masks ({args.estimator}) cover {100 * q['recall']:.1f} % of the exact "
                  f"edited regions and {100 * q['false_positive']:.2f} % of the never-edited pixels.")
    for mode in modes:
        md.append(f"{mode}: after turn {args.turns}, {100 * rows[mode][-1]['identical']:.1f} % of the never-edited "
                  "pixels are identical to the original.")
    (out / "metrics.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return metrics


if __name__ == "__main__":
    main()
