"""Command line (`kontext-core` or `python -m kontext_core`): `edit IMAGE --prompt …`, `chain IMAGE --prompt …
--prompt …`, `demo --out DIR`, `info FILE…`, `convert SRC OUT --type Q4_K_M`, `plan [FILE] --gpu NAME --ram GB`,
`batch JOB --out DIR` (batch.py)."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections import Counter

from .errors import InputError, KontextError
from .memory import T5_STORAGES, activation_bytes, human_bytes, largest_layer_bytes, tokens_for

# What a command may raise for a bad file or argument: reported as one line, never as a traceback.
USER_ERRORS = (KontextError, OSError, ValueError, MemoryError)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if isinstance(e, KontextError) else f"{type(e).__name__}: {text}"


def _dtype_summary(qtypes: dict[str, str], tensors) -> str:
    count: Counter = Counter()
    size: Counter = Counter()
    for name, q in qtypes.items():
        count[q] += 1
        size[q] += int(tensors[name].nbytes) if name in tensors else 0
    return ", ".join(f"{q}: {count[q]} tensors ({human_bytes(size[q])})" for q in sorted(count, key=lambda q: -size[q]))


def describe_transformer(path: str) -> list[str]:
    from .weights.flux_layout import shape_of
    from .weights.loader import read_transformer, resolve_params, validate_checkpoint

    ck = read_transformer(path)
    p = resolve_params(ck)
    validate_checkpoint(ck, p)  # family (Fill/Depth/Canny are refused), keys, shapes, storage types
    n_params = sum(math.prod(shape_of(t)) for t in ck.tensors.values())
    stored = sum(int(t.nbytes) for t in ck.tensors.values())
    _, n_tokens = tokens_for(1024, 1024, refs=1)  # the planner's memory model, for one typical edit
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
        f"  memory       weights {human_bytes(stored)} resident; + largest layer upcast "
        f"{human_bytes(largest_layer_bytes(p))}; + activations ≈ {human_bytes(activation_bytes(p, n_tokens))} for "
        f"1024x1024 with one reference ({n_tokens} tokens, bf16)",
    ]
    return lines


def read_autoencoder(path: str) -> tuple[dict, str]:
    """(LDM-layout state dict, layout) of a file that holds an autoencoder; CheckpointError if it holds none."""
    from .weights.ae_layout import convert_diffusers_vae_to_ldm, detect_ae_layout, strip_ae_prefix
    from .weights.safetensors_io import load_state_dict

    sd = strip_ae_prefix(load_state_dict(path, prefer=("vae/diffusion_pytorch_model.safetensors",
                                                       "diffusion_pytorch_model.safetensors")))
    layout = detect_ae_layout(sd, source=path)
    return (convert_diffusers_vae_to_ldm(sd) if layout == "diffusers" else sd), layout


def describe_autoencoder(path: str, sd: dict, layout: str) -> list[str]:
    """Refuses what the Kontext pipeline cannot use (SD-style VAEs: quant convs, 4 latent channels)."""
    from .weights.ae_layout import check_ae_tensors, check_flux_ae, infer_ae_params

    check_ae_tensors(sd, path)
    p = infer_ae_params(sd, source=path)
    check_flux_ae(p, path)
    n = sum(t.numel() for t in sd.values())
    dtypes = Counter(str(t.dtype).replace("torch.", "") for t in sd.values())
    return [f"{path}", "  model        FLUX autoencoder", f"  layout       {layout}",
            f"  architecture ch {p.ch}, mult {list(p.ch_mult)}, res blocks {p.num_res_blocks}, z {p.z_channels}",
            f"  parameters   {n:,} in {len(sd)} tensors ({dict(dtypes)})"]


def describe_text_encoder(path: str) -> list[str]:
    from .tiny.text_encoder import TinyTextEncoder

    te = TinyTextEncoder.load(path)
    c = te.config
    n = sum(p.numel() for p in te.parameters())
    return [f"{path}", "  model        Kontext-Tiny text encoder (stands in for T5 + CLIP)",
            f"  architecture {c.layers} transformer layers, width {c.width}, {c.heads} heads, max {c.max_length} tokens",
            f"  vocabulary   {len(te.tokenizer.vocab)} words",
            f"  outputs      prompt embeddings (B, {c.max_length}, {c.context_dim}) + pooled (B, {c.pooled_dim})",
            f"  parameters   {n:,}"]


def cmd_info(args) -> int:
    from .tiny.text_encoder import is_tiny_text_encoder

    status = 0
    for path in args.files:
        try:
            if is_tiny_text_encoder(path):
                print("\n".join(describe_text_encoder(path)))
                continue
            try:
                lines = describe_transformer(path)
            except KontextError as first:
                try:
                    sd, layout = read_autoencoder(path)
                except KontextError:
                    raise first from None
                lines = describe_autoencoder(path, sd, layout)  # an autoencoder: its own errors are the relevant ones
        except USER_ERRORS as e:
            msg = _one_line(e)
            print(f"error: {msg}" if path in msg else f"error: {path}: {msg}", file=sys.stderr)
            status = 1
            continue
        print("\n".join(lines))
    return status


def cmd_convert(args) -> int:
    from .weights.gguf_convert import convert_to_gguf

    def progress(i, n, name):
        print(f"  [{i}/{n}] {name}", end="\r", flush=True)

    try:
        if os.path.exists(args.out) and os.path.samefile(args.src, args.out):
            raise InputError(f"{args.out}: the output would overwrite the source; choose another output file")
        convert_to_gguf(args.src, args.out, args.type, progress=progress)
    except USER_ERRORS as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 1
    print()
    return cmd_info(argparse.Namespace(files=[args.out]))


def _parse_size(text: str) -> tuple[int, int]:
    from .validation import parse_size

    try:
        return parse_size(text)
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def check_plan_args(args) -> None:
    """Every `plan` argument in range (InputError naming the option otherwise)."""
    from .validation import check_float, check_int, check_size

    for value, name in ((args.vram, "--vram (GiB)"), (args.ram, "--ram (GiB)"), (args.pcie_gbps, "--pcie-gbps")):
        if value is not None:
            check_float(value, name, 0.0, lo_open=True)
    check_size(*args.size, what="--size", hint="; pass WxH such as 1024x1024")
    check_int(args.refs, "--refs", 0, 16)


def cmd_plan(args) -> int:
    from .hardware import gpu_table
    from .planner import STORAGES, Assumptions, machine, report
    from .weights.loader import read_transformer, resolve_params, validate_checkpoint

    if args.list_gpus:
        print(gpu_table())
        return 0
    try:
        check_plan_args(args)
        if args.model:
            ck = read_transformer(args.model)
            params = resolve_params(ck)
            validate_checkpoint(ck, params)
        else:
            from .model.flux import KONTEXT_DEV as params
        text_encoder = args.text_encoder or "fp8"
        if args.t5:
            from .text_encoders.checkpoints import t5_planner_storage

            if args.text_encoder:
                raise InputError("give the T5 either as --t5 FILE (its storage is read from the file) or as "
                                 "--text-encoder TYPE, not both")
            text_encoder = t5_planner_storage(args.t5)
        m = machine(args.gpu, args.vram, args.ram)
        a = Assumptions(fp8_matmul=args.fp8_matmul, pinned=args.pinned, link_gbps=args.pcie_gbps,
                        free_text_encoder=args.free_text_encoder)
        w, h = args.size
        print(report(params, m, w, h, args.refs, text_encoder, a, STORAGES))
    except USER_ERRORS as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 1
    return 0


def cmd_demo(args) -> int:
    from .tiny.demo import run_demo

    try:
        run_demo(args.out, steps=args.steps, per_type=args.per_type, turns=args.turns, seed=args.seed)
    except USER_ERRORS as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 1
    return 0


def encode_prompt_with_files(args):
    """(prompt_embeds, pooled) of --prompt through --t5/--clip-l; the encoders are freed before returning, so the
    DiT loads into the memory they held (what `plan --free-text-encoder` assumes)."""
    from .text_encoders import load_text_encoders

    encoders = load_text_encoders(args.t5, args.clip_l, args.tokenizers)
    try:
        return encoders.encode([args.prompt])
    finally:
        encoders.free()


def _load_edit_models(args):
    """(transformer, ae, prompt_embeds, pooled, image size or None): Kontext-Tiny unless real files are given."""
    from .conditioning import load_embeddings
    from .weights.ae_layout import load_autoencoder
    from .weights.loader import load_transformer

    text_files = [f"--{n.replace('_', '-')}" for n in ("t5", "clip_l", "tokenizers") if getattr(args, n)]
    if args.transformer or args.ae or args.embeds:
        missing = [f"--{n}" for n in ("transformer", "ae") if not getattr(args, n)]
        if not args.embeds and not args.t5:
            missing.append("--embeds (saved conditioning) or --prompt with --t5/--clip-l")
        if missing:
            raise KontextError(f"editing with your own files needs --transformer, --ae and the prompt (--embeds, or "
                               f"--prompt with --t5 --clip-l); missing {', '.join(missing)}. Without any of them the "
                               "bundled Kontext-Tiny is used.")
        if args.embeds and (args.prompt or text_files):
            raise KontextError("give the prompt either as --embeds (saved embeddings) or as --prompt with "
                               "--t5/--clip-l, not both")
        if args.embeds:
            embeds, pooled, _ = load_embeddings(args.embeds)
        else:
            if not args.prompt:
                raise KontextError("--t5/--clip-l encode --prompt; give the edit as --prompt \"...\"")
            embeds, pooled = encode_prompt_with_files(args)
        return load_transformer(args.transformer), load_autoencoder(args.ae), embeds, pooled, None
    if text_files:
        raise KontextError(f"{', '.join(text_files)} go with a real model: add --transformer and --ae (the bundled "
                           "Kontext-Tiny has its own text encoder)")
    from . import tiny

    if not args.prompt:
        raise KontextError("give the edit as --prompt, e.g. --prompt \"make the red circle blue\"")
    models, [(embeds, pooled)] = _tiny_with_prompts([args.prompt])
    return models.transformer, models.ae, embeds, pooled, (tiny.IMAGE_SIZE, tiny.IMAGE_SIZE)


def _tiny_with_prompts(prompts: list[str]):
    """Kontext-Tiny and (prompt_embeds, pooled) per prompt; words it never learned are named in a warning."""
    from . import tiny

    models = tiny.load()
    unknown = models.text_encoder.tokenizer.unknown_words(" ".join(prompts))
    if unknown:
        print(f"warning: Kontext-Tiny does not know the words {unknown}; it understands the edits of its training "
              f"task (see kontext_core/tiny/weights/MODEL_CARD.md)", file=sys.stderr)
    return models, [models.encode_prompt([p]) for p in prompts]


def cmd_edit(args) -> int:
    from PIL import Image

    from .images import open_image
    from .pipeline import edit
    from .tiny.progress import Progress

    try:
        transformer, ae, embeds, pooled, fixed = _load_edit_models(args)
        img = open_image(args.image)
        resize = args.resize or "stretch"
        if fixed is not None:
            resize = "keep"
            if img.size != fixed:
                print(f"note: Kontext-Tiny edits {fixed[0]}x{fixed[1]} pictures; {args.image} "
                      f"({img.width}x{img.height}) is resized to that", file=sys.stderr)
                img = img.convert("RGB").resize(fixed, Image.LANCZOS)
        bar = Progress(args.steps, "edit", every_s=1.0)
        result = edit(transformer, ae, images=[img], prompt_embeds=embeds, pooled_prompt_embeds=pooled,
                      resize=resize, steps=args.steps, seed=args.seed, guidance=args.guidance,
                      paste_back=args.paste_back, callback=lambda i, n, x, x0: bar.update())
        result.images[0].save(args.out)
        if result.changed is not None:
            print(f"paste-back: {100 * (1 - result.changed.float().mean().item()):.1f} % of the pixels are the "
                  "input's own (the edit did not change them)")
    except USER_ERRORS as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}")
    return 0


def _chain_models(args):
    """(transformer, ae, [(prompt_embeds, pooled) per turn], image size or None) for `chain`."""
    from .conditioning import load_embeddings

    if args.transformer or args.ae:
        from .weights.ae_layout import load_autoencoder
        from .weights.loader import load_transformer

        if not (args.transformer and args.ae and args.embeds) or args.prompt:
            raise KontextError("a chain with your own model needs --transformer, --ae and one --embeds file per "
                               "turn (prompt embeddings saved by 'Save Kontext Conditioning'), and no --prompt")
        turns = [load_embeddings(e)[:2] for e in args.embeds]
        return load_transformer(args.transformer), load_autoencoder(args.ae), turns, None
    from . import tiny

    if args.embeds:
        raise KontextError("--embeds goes with --transformer and --ae; Kontext-Tiny takes the turns as --prompt")
    if not args.prompt:
        raise KontextError("give each turn as --prompt, e.g. --prompt \"make the circle blue\" --prompt \"remove the star\"")
    models, turns = _tiny_with_prompts(args.prompt)
    return models.transformer, models.ae, turns, (tiny.IMAGE_SIZE, tiny.IMAGE_SIZE)


def cmd_chain(args) -> int:
    """Several edits in a row; each turn edits the previous turn's latent (no decode/encode in between). anchored
    (default): `EditChain` keeps the original wherever no turn has edited; latents: the plain latent hand-over."""
    from pathlib import Path

    from .chain import EditChain
    from .images import open_image, prepare_image, tensor_to_pil
    from .pipeline import edit

    try:
        transformer, ae, turns, fixed = _chain_models(args)
        img = open_image(args.image)
        pixels = prepare_image(img, "keep" if fixed else "stretch", fixed, what=args.image)
        chain = EditChain.from_pixels(ae, pixels)
        latent = chain.context
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        for k, (embeds, pooled) in enumerate(turns):
            res = edit(transformer, ae, latents=[chain.context if args.mode == "anchored" else latent],
                       prompt_embeds=embeds, pooled_prompt_embeds=pooled, steps=args.steps, seed=args.seed + k,
                       guidance=args.guidance, decode=args.mode != "anchored")
            if args.mode == "anchored":
                chain.step(res.latent)
                picture = tensor_to_pil(chain.decode())[0]
                kept = 100 * (1 - chain.union.float().mean().item())
                note = f"; {kept:.1f} % of the pixels are the original's (no turn edited them)"
            else:
                latent, picture, note = res.latent, res.images[0], ""
            path = out_dir / f"turn_{k + 1:02d}.png"
            picture.save(path)
            print(f"turn {k + 1}/{len(turns)}: wrote {path}{note}")
    except USER_ERRORS as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 1
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse prints the usage block before an error; we keep failures to one line on stderr."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="python -m kontext_core", description="FLUX.1 Kontext engine tools")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)
    from .tiny import DEFAULT_GUIDANCE, DEFAULT_STEPS

    ed = sub.add_parser("edit", help="edit an image from an instruction (bundled Kontext-Tiny by default)")
    ed.add_argument("image", help="the picture to edit (PNG, JPEG, ...)")
    ed.add_argument("--prompt", help="the instruction, e.g. 'make the red circle blue' (encoded by Kontext-Tiny's own "
                                     "text encoder, or by --t5/--clip-l with a real model)")
    ed.add_argument("--out", default="edited.png", help="where to write the result (default edited.png)")
    ed.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"sampling steps (default {DEFAULT_STEPS})")
    ed.add_argument("--seed", type=int, default=0, help="noise seed (same seed, same result)")
    ed.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE, help="guidance embedding value")
    ed.add_argument("--paste-back", action="store_true",
                    help="paste back untouched pixels: wherever the edit changed nothing, keep the input's own "
                         "pixels (feathered seam) instead of the slightly softened re-generation")
    ed.add_argument("--resize", choices=("stretch", "crop", "pad", "keep"),
                    help="real models: fit the picture to the nearest Kontext resolution by stretch (default, as "
                         "BFL), crop or pad, or keep its size (snapped to 16)")
    ed.add_argument("--transformer", help="a real Kontext transformer file instead of Kontext-Tiny")
    ed.add_argument("--ae", help="the autoencoder (ae.safetensors) that goes with --transformer")
    ed.add_argument("--embeds", help="prompt embeddings file (Save Kontext Conditioning) for --transformer, instead "
                                     "of --prompt with text encoders")
    ed.add_argument("--t5", help="T5-XXL for --prompt with --transformer: t5xxl_fp16 / t5xxl_fp8_e4m3fn(_scaled) "
                                 ".safetensors, a T5 encoder GGUF, or a diffusers FLUX folder (then --clip-l and "
                                 "--tokenizers default to it). Freed before the transformer loads.")
    ed.add_argument("--clip-l", dest="clip_l", help="CLIP-L text encoder (clip_l.safetensors) that goes with --t5")
    ed.add_argument("--tokenizers", help="where the CLIP/T5 tokenizers are: a diffusers FLUX folder (tokenizer/, "
                                         "tokenizer_2/) or your ComfyUI folder (comfy/sd1_tokenizer, "
                                         "comfy/text_encoders/t5_tokenizer)")
    ed.set_defaults(func=cmd_edit)

    ch = sub.add_parser("chain", help="several edits in a row from one picture, anchored so unedited regions "
                                      "stay the original's (bundled Kontext-Tiny by default)")
    ch.add_argument("image", help="the picture to edit")
    ch.add_argument("--prompt", action="append", help="one turn's instruction (Kontext-Tiny); repeat for each turn")
    ch.add_argument("--embeds", action="append", help="one turn's prompt embeddings file, with --transformer/--ae")
    ch.add_argument("--mode", choices=("anchored", "latents"), default="anchored",
                    help="anchored (default): keep the original wherever no turn edited; latents: plain latent "
                         "hand-over between turns")
    ch.add_argument("--out", default="chain", help="folder for turn_01.png, turn_02.png, ... (default chain/)")
    ch.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"sampling steps (default {DEFAULT_STEPS})")
    ch.add_argument("--seed", type=int, default=0, help="noise seed of turn 1 (turn k uses seed + k - 1)")
    ch.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE, help="guidance embedding value")
    ch.add_argument("--transformer", help="a real Kontext transformer file instead of Kontext-Tiny")
    ch.add_argument("--ae", help="the autoencoder (ae.safetensors) that goes with --transformer")
    ch.set_defaults(func=cmd_chain)

    dm = sub.add_parser("demo", help="Kontext-Tiny on every edit type and a 5-turn chain, scored; writes PNGs")
    dm.add_argument("--out", default="out", help="folder for edits.png, chain.png, metrics.json")
    dm.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    dm.add_argument("--per-type", type=int, default=2, help="edits per edit type")
    dm.add_argument("--turns", type=int, default=5, help="turns of the chain")
    dm.add_argument("--seed", type=int, default=0)
    dm.set_defaults(func=cmd_demo)
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
    pl.add_argument("--text-encoder", choices=T5_STORAGES,
                    help="T5-XXL in use: fp16 (9.5 GB), fp8 (4.9 GB, default), a GGUF type, or none (saved "
                         "conditioning); CLIP-L is always counted")
    pl.add_argument("--t5", help="the T5-XXL file you use (safetensors or GGUF): its storage type is read from it, "
                                 "instead of --text-encoder")
    pl.add_argument("--free-text-encoder", action="store_true",
                    help="text encoders are freed after encoding, as `edit --prompt --t5` does (default: kept in "
                         "RAM, as ComfyUI does)")
    pl.add_argument("--fp8-matmul", action="store_true", help="multiply fp8 weights in fp8 (needs cc >= 8.9)")
    pl.add_argument("--pinned", action="store_true", help="streamed weights in pinned memory (stream_model's "
                                                          "pin_memory): faster copies, page-locked RAM")
    pl.add_argument("--pcie-gbps", type=float, help="measured host-to-device GB/s (default: from the card's link)")
    pl.set_defaults(func=cmd_plan)

    from .batch import add_batch_parser

    add_batch_parser(sub)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
