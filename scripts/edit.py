"""Edit an image with FLUX.1 Kontext using the standalone engine (no ComfyUI).

Real weights:
    python scripts/edit.py --transformer flux1-kontext-dev.safetensors --ae ae.safetensors \
        --embeds make_it_red.safetensors --image car.png --steps 28 --guidance 2.5 --seed 42 --out out/
(`--embeds` is a text-embedding file written by the ComfyUI "Save Conditioning" node or
`kontext_core.conditioning.save_embeddings`; the transformer may also be a GGUF file or a diffusers folder.)

Demo without downloads (what the README's first command runs):
    python scripts/edit.py --demo --out out/
builds small random-weight checkpoints in the real file layouts (BFL transformer, LDM `ae.safetensors`),
describes them with `info`, runs a two-turn edit chain in latent space and writes the PNGs. Random weights give
noise-like pictures: the demo shows the whole path works end to end, not image quality.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from kontext_core.cli import main as cli_main  # noqa: E402
from kontext_core.conditioning import load_embeddings, save_embeddings  # noqa: E402
from kontext_core.model.autoencoder import AutoEncoder, AutoEncoderParams  # noqa: E402
from kontext_core.model.flux import Flux, FluxParams  # noqa: E402
from kontext_core.pipeline import edit  # noqa: E402
from kontext_core.weights.ae_layout import load_autoencoder  # noqa: E402
from kontext_core.weights.loader import load_transformer  # noqa: E402

DEMO_FLUX = FluxParams(vec_in_dim=64, context_in_dim=128, hidden_size=128, num_heads=4, depth=2,
                       depth_single_blocks=4, axes_dim=(4, 14, 14))  # = the loader's default split for head dim 32
DEMO_AE = AutoEncoderParams(ch=32, ch_mult=(1, 2, 4, 4), num_res_blocks=1, z_channels=16)


def make_demo_files(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    flux = Flux(DEMO_FLUX)
    ae = AutoEncoder(DEMO_AE)
    sd = {k: (torch.randn_like(v) * (0.3 / max(1, v.shape[-1]) ** 0.5) if v.ndim > 1 else 1 + 0.1 * torch.randn_like(v))
          for k, v in flux.state_dict().items()}
    paths = {"transformer": folder / "flux1-kontext-demo.safetensors", "ae": folder / "ae-demo.safetensors",
             "embeds": folder / "prompt-demo.safetensors", "image": folder / "input.png"}
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}, str(paths["transformer"]))
    save_file({k: v.contiguous() for k, v in ae.state_dict().items()}, str(paths["ae"]))
    save_embeddings(paths["embeds"], torch.randn(1, 16, DEMO_FLUX.context_in_dim),
                    torch.randn(1, DEMO_FLUX.vec_in_dim), guidance=2.5)
    yy, xx = np.mgrid[0:96, 0:128]
    rgb = np.stack([xx / 127, yy / 95, 0.5 + 0.5 * np.sin(xx / 9.0)], -1)
    Image.fromarray((rgb * 255).astype(np.uint8)).save(paths["image"])
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--demo", action="store_true", help="build small random checkpoints and run on them")
    ap.add_argument("--transformer", help="FLUX.1 Kontext transformer: safetensors, GGUF or diffusers folder")
    ap.add_argument("--ae", help="FLUX autoencoder: ae.safetensors or a diffusers vae/ folder")
    ap.add_argument("--embeds", help="text-embedding safetensors (prompt_embeds + pooled_prompt_embeds)")
    ap.add_argument("--image", action="append", help="context image (repeat for several references)")
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--guidance", type=float, default=None, help="default: the embeddings file's, else 2.5")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--turns", type=int, default=1, help="edit chain length (turns reuse the latent)")
    ap.add_argument("--solver", default="euler")
    ap.add_argument("--resize", default="stretch", help="stretch | crop | pad | keep")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="out")
    args = ap.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.demo:
        files = make_demo_files(out / "demo_weights")
        args.transformer, args.ae, args.embeds = str(files["transformer"]), str(files["ae"]), str(files["embeds"])
        args.image = [str(files["image"])]
        args.steps, args.turns, args.resize = min(args.steps, 4), max(args.turns, 2), "keep"
        cli_main(["info", args.transformer, args.ae])
    missing = [n for n in ("transformer", "ae", "embeds", "image") if not getattr(args, n)]
    if missing:
        ap.error(f"missing --{', --'.join(missing)} (or use --demo)")

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    t0 = time.perf_counter()
    transformer = load_transformer(args.transformer, device=args.device)
    ae = load_autoencoder(args.ae, device=args.device, dtype=dtype)
    t5, pooled, file_guidance = load_embeddings(args.embeds)
    guidance = args.guidance if args.guidance is not None else (file_guidance or 2.5)
    print(f"loaded in {time.perf_counter() - t0:.2f} s")

    images = [Image.open(p) for p in args.image]
    latents: list[torch.Tensor] = []
    for turn in range(args.turns):
        t0 = time.perf_counter()
        res = edit(transformer, ae, images=images if turn == 0 else (), latents=latents, prompt_embeds=t5,
                   pooled_prompt_embeds=pooled, steps=args.steps, guidance=guidance, seed=args.seed + turn,
                   solver=args.solver, resize=args.resize, device=args.device, dtype=dtype,
                   callback=lambda i, n, x, x0: print(f"  step {i + 1}/{n}", end="\r"))
        path = out / f"edit_turn{turn + 1}.png"
        res.images[0].save(path)
        print(f"turn {turn + 1}: {res.images[0].size[0]}x{res.images[0].size[1]} in {time.perf_counter() - t0:.2f} s -> {path}")
        latents = [res.latent]  # the next turn edits this latent directly: no decode/encode round trip
    return 0


if __name__ == "__main__":
    sys.exit(main())
