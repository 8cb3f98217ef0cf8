"""Train Kontext-Tiny on a 2-core CPU: `python -m kontext_core.tiny.train --out DIR`.

Stages, each resumable (rerun the same command after an interruption; finished stages are skipped and a
stage in progress continues from its last checkpoint):
  1. pool     render N seeded training triples (context, instruction, exact target) -> pool.npz
  2. ae       the engine's AutoEncoder on crops, then whole images (MSE + L1, latent noise) -> ae.safetensors
  3. latents  encode every pool image with the trained AE -> latents.safetensors
  4. dit      the engine's Flux + the tiny text encoder, jointly, on [target ‖ context] tokens as Kontext trains
              (rectified flow, logit-normal times shifted like the sampler's schedule, context ids index 1)
              -> transformer.safetensors (BFL keys, bf16), text_encoder.safetensors
  5. report   loss curves (loss.png) and train.json (sizes, steps, wall time per stage)
Checkpoints are safetensors (no pickle). Runtime code never imports this module.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..model.autoencoder import AutoEncoder
from ..model.flux import Flux
from ..sampling.schedule import mu_for_tokens, time_shift
from .edits import EDIT_TYPES, make_triple, vocabulary
from .progress import Progress
from .scene import render
from .spec import AE_PARAMS, DIT_PARAMS, TEXT_CONFIG, latent_tokens
from .text_encoder import TinyTextEncoder


# ------------------------------------------------------------------------------------------------ pool
def _render_one(args):
    seed, size = args
    tr = make_triple(seed, size)
    return render(tr.context).image, render(tr.target).image, EDIT_TYPES.index(tr.kind), tr.instruction


def build_pool(out: Path, n: int, size: int, seed: int, workers: int) -> None:
    path = out / "pool.npz"
    if path.exists():
        return
    seeds = [seed * 10_000_000 + i for i in range(n)]
    ctx = np.empty((n, size, size, 3), np.uint8)
    tgt = np.empty_like(ctx)
    kinds = np.empty(n, np.int16)
    texts = []
    bar = Progress(n, "pool")
    with mp.get_context("fork").Pool(workers) as pool:
        for i, (c, t, k, s) in enumerate(pool.imap(_render_one, [(s, size) for s in seeds], chunksize=64)):
            ctx[i], tgt[i], kinds[i] = c, t, k
            texts.append(s)
            bar.update()
    tmp = out / "pool.tmp.npz"
    np.savez(tmp, ctx=ctx, tgt=tgt, kinds=kinds, seeds=np.array(seeds, np.int64), texts=np.array(texts))
    os.replace(tmp, path)


def load_pool(out: Path) -> dict:
    with np.load(out / "pool.npz") as z:
        return {k: z[k] for k in z.files}


def to_unit(img_u8: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(img_u8).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


# ------------------------------------------------------------------------------------------------ checkpoints
def save_state(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
              metadata={"meta": json.dumps(meta)})
    os.replace(tmp, path)


def load_state(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["meta"])
    return load_file(str(path)), meta


def optimizer_tensors(opt: torch.optim.Optimizer, prefix: str = "opt.") -> dict[str, torch.Tensor]:
    out = {}
    for i, (pid, st) in enumerate(opt.state_dict()["state"].items()):
        for k, v in st.items():
            out[f"{prefix}{pid}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return out


def restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], prefix: str = "opt.") -> None:
    sd = opt.state_dict()
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith(prefix):
            pid, name = key[len(prefix):].split(".", 1)
            state.setdefault(int(pid), {})[name] = v
    sd["state"] = state
    opt.load_state_dict(sd)


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def _split(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


# ------------------------------------------------------------------------------------------------ AE
def train_ae(out: Path, pool: dict, steps: int, crop_frac: float, seed: int, log: dict) -> AutoEncoder:
    final = out / "ae.safetensors"
    ae = AutoEncoder(AE_PARAMS)
    if final.exists():
        ae.load_state_dict(load_file(str(final)))
        return ae.eval()
    torch.manual_seed(seed)
    ae = AutoEncoder(AE_PARAMS)
    opt = torch.optim.Adam(ae.parameters(), lr=1e-3, betas=(0.9, 0.99))
    ckpt, start, hist = out / "ae_state.safetensors", 0, []
    if ckpt.exists():
        t, meta = load_state(ckpt)
        ae.load_state_dict(_split(t, "model."))
        restore_optimizer(opt, t)
        start, hist = meta["step"], meta["loss"]
    images = np.concatenate([pool["ctx"], pool["tgt"]])
    size = images.shape[1]
    n_crop = int(steps * crop_frac)
    bar = Progress(steps, "ae", start)
    t0 = time.time() - log.get("ae_seconds", 0.0)
    for step in range(start, steps):
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        crop = step < n_crop
        batch = 16 if crop else 8
        idx = torch.randint(len(images), (batch,), generator=g).numpy()
        x = to_unit(images[idx])
        if crop:  # 32x32 crops on the 8-pixel latent grid: 4x cheaper, same local statistics
            c = size // 2
            oy, ox = (torch.randint(0, (size - c) // 8 + 1, (2,), generator=g) * 8).tolist()
            x = x[:, :, oy:oy + c, ox:ox + c]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, 1e-3, 50)
        mean, _ = ae.encode_moments(x)
        z = ae.process_in(mean)
        noisy = z + 0.05 * torch.randn(z.shape, generator=g)
        y = ae.decoder(ae.process_out(noisy))
        rec = F.mse_loss(y, x) + 0.25 * F.l1_loss(y, x)
        reg = 1e-3 * (z.pow(2).mean() - 1.0).clamp_min(0) + 1e-3 * z.mean().pow(2)
        loss = rec + reg
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ae.parameters(), 1.0)
        opt.step()
        psnr = 10 * math.log10(4.0 / max(F.mse_loss(y.detach().clamp(-1, 1), x).item(), 1e-10))
        hist.append([step, rec.item(), psnr, z.std().item()])
        bar.update(loss=rec.item(), psnr=psnr, zstd=z.std().item())
        if (step + 1) % 100 == 0 or step + 1 == steps:
            log["ae_seconds"] = time.time() - t0
            save_state(ckpt, {**{f"model.{k}": v for k, v in ae.state_dict().items()}, **optimizer_tensors(opt)},
                       {"step": step + 1, "loss": hist})
            write_log(out, log)
    log["ae_seconds"] = time.time() - t0
    log["ae_loss"] = hist
    tmp = out / "ae.tmp"
    save_file({k: v.contiguous() for k, v in ae.state_dict().items()}, str(tmp))
    os.replace(tmp, final)
    write_log(out, log)
    return ae.eval()


# ------------------------------------------------------------------------------------------------ latents
@torch.no_grad()
def encode_pool(out: Path, pool: dict, ae: AutoEncoder, log: dict) -> dict[str, torch.Tensor]:
    path = out / "latents.safetensors"
    if path.exists():
        return load_file(str(path))
    t0 = time.time()
    res = {}
    for key in ("ctx", "tgt"):
        imgs = pool[key]
        chunks = []
        bar = Progress(len(imgs), f"encode {key}")
        for i in range(0, len(imgs), 128):
            chunks.append(ae.encode(to_unit(imgs[i:i + 128])).contiguous())
            bar.update(len(chunks[-1]))
        res[key] = torch.cat(chunks).contiguous()
    save_file(res, str(path))
    log["encode_seconds"] = time.time() - t0
    write_log(out, log)
    return res


# ------------------------------------------------------------------------------------------------ DiT
def sample_times(b: int, n_tokens: int, g: torch.Generator) -> torch.Tensor:
    """Logit-normal times, warped by the same resolution shift the sampler's schedule uses."""
    t = torch.sigmoid(torch.randn(b, generator=g))
    return time_shift(mu_for_tokens(n_tokens), t).float().clamp(1e-4, 1.0)


def train_dit(out: Path, pool: dict, lat: dict, steps: int, batch: int, lr: float, seed: int, log: dict):
    final = out / "transformer.safetensors"
    if final.exists():
        return
    torch.manual_seed(seed + 1)
    model = Flux(DIT_PARAMS)
    te = TinyTextEncoder(TEXT_CONFIG, vocabulary())
    ema_m = Flux(DIT_PARAMS)
    ema_t = TinyTextEncoder(TEXT_CONFIG, vocabulary())
    ema_m.load_state_dict(model.state_dict())
    ema_t.load_state_dict(te.state_dict())
    params = list(model.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
    ckpt, start, hist = out / "dit_state.safetensors", 0, []
    if ckpt.exists():
        t, meta = load_state(ckpt)
        model.load_state_dict(_split(t, "model."))
        te.load_state_dict(_split(t, "te."))
        ema_m.load_state_dict(_split(t, "ema_model."))
        ema_t.load_state_dict(_split(t, "ema_te."))
        restore_optimizer(opt, t)
        start, hist = meta["step"], meta["loss"]
    ids, mask = te.tokenizer([str(s) for s in pool["texts"]])
    ctx, tgt = lat["ctx"], lat["tgt"]
    n_tok = latent_tokens(ctx.shape[-2], ctx.shape[-1])
    bar = Progress(steps, "dit", start)
    t0 = time.time() - log.get("dit_seconds", 0.0)
    for step in range(start, steps):
        g = torch.Generator().manual_seed(seed * 7_000_003 + step)
        idx = torch.randint(len(ctx), (batch,), generator=g)
        x0, ref = tgt[idx], ctx[idx]
        noise = torch.randn(x0.shape, generator=g)
        t = sample_times(batch, n_tok, g)
        xt = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
        guidance = 1.0 + 4.0 * torch.rand(batch, generator=g)  # not distilled: the model learns to ignore it
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, 100)
        txt, pooled = te.encode_ids(ids[idx], mask[idx])
        v = model.forward_latent(xt, t, txt, pooled, guidance, [ref], "offset")
        loss = F.mse_loss(v, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema, live in ((ema_m, model), (ema_t, te)):
                for pe, pl in zip(ema.parameters(), live.parameters()):
                    pe.lerp_(pl, 1 - decay)
        hist.append([step, loss.item()])
        bar.update(loss=loss.item(), lr=opt.param_groups[0]["lr"])
        if (step + 1) % 200 == 0 or step + 1 == steps:
            log["dit_seconds"] = time.time() - t0
            save_state(ckpt, {**{f"model.{k}": v for k, v in model.state_dict().items()},
                              **{f"te.{k}": v for k, v in te.state_dict().items()},
                              **{f"ema_model.{k}": v for k, v in ema_m.state_dict().items()},
                              **{f"ema_te.{k}": v for k, v in ema_t.state_dict().items()},
                              **optimizer_tensors(opt)}, {"step": step + 1, "loss": hist})
            export_dit(out, ema_m, ema_t, final_path=out / "snapshot")
            write_log(out, log)
    log["dit_seconds"] = time.time() - t0
    log["dit_loss"] = hist
    export_dit(out, ema_m, ema_t)
    write_log(out, log)


def export_dit(out: Path, model: Flux, te: TinyTextEncoder, final_path: Path | None = None) -> None:
    """The EMA weights in the shipped layouts: BFL keys in bf16 (as the real model ships), the encoder fp32."""
    d = final_path or out
    d.mkdir(exist_ok=True)
    sd = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    tmp = d / "transformer.tmp"
    save_file(sd, str(tmp), metadata={"modelspec.title": "Kontext-Tiny", "format": "pt"})
    te.save(d / "text_encoder.safetensors")
    os.replace(tmp, d / "transformer.safetensors")


# ------------------------------------------------------------------------------------------------ report
def write_log(out: Path, log: dict) -> None:
    slim = {k: v for k, v in log.items() if not k.endswith("_loss")}
    (out / "train.json").write_text(json.dumps(slim, indent=2))


def plot_losses(out: Path, log: dict) -> None:
    from .plot import line_plot

    curves = []
    if log.get("ae_loss"):
        a = np.array(log["ae_loss"])
        curves.append(("AE reconstruction loss", a[:, 0], a[:, 1]))
    if log.get("dit_loss"):
        d = np.array(log["dit_loss"])
        curves.append(("DiT flow-matching loss", d[:, 0], d[:, 1]))
    line_plot(curves, out / "loss.png", log_y=True, smooth=25)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="work folder (checkpoints, pool, final weights)")
    ap.add_argument("--pool", type=int, default=16000, help="number of training triples rendered")
    ap.add_argument("--size", type=int, default=64, help="image side in pixels (64 or 128)")
    ap.add_argument("--ae-steps", type=int, default=1200)
    ap.add_argument("--ae-crop-frac", type=float, default=0.7, help="share of AE steps on 32x32 crops")
    ap.add_argument("--dit-steps", type=int, default=1600)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = json.loads((out / "train.json").read_text()) if (out / "train.json").exists() else {}
    log.update(args=vars(args), ae_params=asdict(AE_PARAMS), dit_params=DIT_PARAMS.to_dict(),
               text_config=asdict(TEXT_CONFIG), torch=torch.__version__, threads=torch.get_num_threads())
    t0 = time.time()
    build_pool(out, args.pool, args.size, args.seed, workers=max(1, min(2, os.cpu_count() or 1)))
    log.setdefault("pool_seconds", time.time() - t0)
    pool = load_pool(out)
    ae = train_ae(out, pool, args.ae_steps, args.ae_crop_frac, args.seed, log)
    for p in ae.parameters():
        p.requires_grad_(False)
    lat = encode_pool(out, pool, ae, log)
    train_dit(out, pool, lat, args.dit_steps, args.batch, args.lr, args.seed, log)
    for name in ("ae_state.safetensors", "dit_state.safetensors"):
        t, meta = load_state(out / name) if (out / name).exists() else ({}, {})
        if meta:
            log[name.split("_")[0] + "_loss"] = meta["loss"]
    plot_losses(out, log)
    write_log(out, log)
    print(json.dumps({k: v for k, v in log.items() if k.endswith("seconds")}, indent=1))


if __name__ == "__main__":
    main()
