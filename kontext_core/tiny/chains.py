"""Multi-turn edit chains with Kontext-Tiny, three ways of handing one turn's result to the next, scored exactly.

  pixels    decode, round to 8 bits (what a saved PNG holds), encode again: what users do between separate edits
  latents   the output latent is the next context latent (no decode / encode between turns)
  anchored  `kontext_core.chain.EditChain`: the next context is the original latent with only the cells the turns
            changed taken from their outputs; the picture keeps the original pixels outside the edited regions

`run_chains` edits all chains' turn k in one batched call; `score_chains` gives per turn the edit's success
(`score`), the preservation PSNR of what no turn has edited so far vs the original, and the global pixel shift.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..chain import EditChain
from .evaluate import chain_keep_masks, edited_region, global_shift, score, to_uint8
from .scene import render

MODES = ("pixels", "latents", "anchored")


def turn_seed(seed: int, scene: int, turn: int) -> int:
    """Noise seed of one turn of one chain: the same in every mode, so modes differ only in the hand-over."""
    return seed + 1000 * scene + turn


def _first_images(chains) -> torch.Tensor:
    return torch.from_numpy(np.stack([render(c[0].context).image for c in chains])).permute(0, 3, 1, 2).float() / 255


@torch.no_grad()
def run_chains(tiny, chains, mode: str, *, steps: int, seed: int = 0, batch: int = 50,
               chain_options: dict | None = None, progress=None) -> dict:
    """Run every chain in `mode`. Returns {"outputs": [[uint8 (S, S, 3) per turn] per chain],
    "changed": [[estimated changed-pixel mask per turn] per chain] (anchored only)}."""
    if mode not in MODES:
        raise ValueError(f"unknown chain mode {mode!r}; choose one of {', '.join(MODES)}")
    turns = len(chains[0])
    outputs: list[list[np.ndarray]] = [[] for _ in chains]
    changed: list[list[np.ndarray]] = [[] for _ in chains]
    for lo in range(0, len(chains), batch):
        part = chains[lo:lo + batch]
        images = _first_images(part)
        state = images if mode == "pixels" else None
        anchored = EditChain.from_pixels(tiny.ae, images * 2 - 1, **(chain_options or {})) if mode == "anchored" else None
        latent = tiny.encode_images(images) if mode == "latents" else None
        for k in range(turns):
            prompts = [c[k].instruction for c in part]
            seeds = [turn_seed(seed, lo + i, k) for i in range(len(part))]
            if mode == "pixels":
                res = tiny.edit(state, prompts, steps=steps, seed=seeds)
                out = to_uint8(res.pixels)
                state = torch.from_numpy(out).permute(0, 3, 1, 2).float() / 255  # the PNG the user saves and reloads
            elif mode == "latents":
                res = tiny.edit(latent=latent, prompt=prompts, steps=steps, seed=seeds)
                latent = res.latent
                out = to_uint8(res.pixels)
            else:
                res = tiny.edit(latent=anchored.context, prompt=prompts, steps=steps, seed=seeds, decode=False)
                step = anchored.step(res.latent)
                out = to_uint8(anchored.decode())
                for i in range(len(part)):
                    changed[lo + i].append(step.changed[i, 0].cpu().numpy())
            for i in range(len(part)):
                outputs[lo + i].append(out[i])
            if progress:
                progress(mode, lo + len(part), len(chains), k + 1, turns)
    return {"outputs": outputs, "changed": changed if mode == "anchored" else None}


def _mse(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    if not mask.any():
        return float("nan")
    return float(np.mean((a.astype(np.float64)[mask] - b.astype(np.float64)[mask]) ** 2))


def _db(mse: float) -> float:
    if math.isnan(mse):
        return float("nan")
    return float("inf") if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def score_chains(chains, outputs) -> list[dict]:
    """Per turn over all chains: success rate, preservation of never-edited pixels vs the original (PSNR of the
    pooled MSE, and the median per-chain PSNR), share of those pixels identical to the original, mean |shift|."""
    turns = len(chains[0])
    per_turn = [{"success": [], "mse": [], "identical": [], "shift": []} for _ in range(turns)]
    for chain, outs in zip(chains, outputs):
        original = render(chain[0].context).image
        keeps = chain_keep_masks(chain)
        for k, (t, out, keep) in enumerate(zip(chain, outs, keeps)):
            rec = per_turn[k]
            rec["success"].append(score(t, out).success)
            rec["mse"].append(_mse(out, original, keep))
            if keep.any():
                rec["identical"].append(float((out[keep] == original[keep]).all(-1).mean()))
            dy, dx = global_shift(out, original)
            rec["shift"].append(math.hypot(dy, dx))
    rows = []
    for k, rec in enumerate(per_turn):
        mses = [m for m in rec["mse"] if not math.isnan(m)]
        dbs = [_db(m) for m in mses]
        rows.append({"turn": k + 1, "n": len(rec["success"]), "success": float(np.mean(rec["success"])),
                     "preservation_db": _db(float(np.mean(mses))) if mses else float("nan"),
                     "preservation_db_median": float(np.median(dbs)) if dbs else float("nan"),
                     "identical": float(np.mean(rec["identical"])) if rec["identical"] else float("nan"),
                     "shift_px": float(np.mean(rec["shift"]))})
    return rows


def mask_quality(chains, changed) -> dict:
    """How the estimated per-turn change masks compare with the exact edited regions: recall of the exact region
    and the share of never-edited pixels (the preservation region) wrongly marked as changed."""
    recall, false_pos = [], []
    for chain, masks in zip(chains, changed):
        keeps = chain_keep_masks(chain)
        for t, m, keep in zip(chain, masks, keeps):
            region = edited_region(render(t.context), render(t.target), t)
            if region is not None and region.any():
                recall.append(float(m[region].mean()))
            if keep.any():
                false_pos.append(float(m[keep].mean()))
    return {"recall": float(np.mean(recall)) if recall else float("nan"),
            "false_positive": float(np.mean(false_pos)) if false_pos else float("nan")}
