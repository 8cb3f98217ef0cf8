"""The bad-input corpus: inputs users actually get wrong, each with the outcome we promise.

Every case either must fail with a given error type whose message names the argument or file and says what to
do (`Refused`), or must be accepted with a finite, correctly sized result (`Accepted`). The unit test
`tests/unit/test_bad_input_corpus.py` runs one test per case; run this file to print the corpus summary:

    python tests/bad_inputs.py        # -> "bad-input corpus: tried N, clear error R, accepted A, failed F"

Models are small random ones built with the engine's own classes (a Kontext-Tiny-sized Flux with widths that
differ from FLUX.1-dev's, and a 16-channel AE), written in the real file layouts.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kontext_core import cli, images as im, pipeline, validation as val  # noqa: E402
from kontext_core.conditioning import load_embeddings, save_embeddings  # noqa: E402
from kontext_core.errors import CheckpointError, InputError, NumericalError  # noqa: E402
from kontext_core.model.autoencoder import AutoEncoder, AutoEncoderParams  # noqa: E402
from kontext_core.model.flux import Flux, FluxParams  # noqa: E402
from kontext_core.sampling import flux_sigmas  # noqa: E402
from kontext_core.weights.ae_layout import load_autoencoder  # noqa: E402
from kontext_core.weights.loader import load_transformer  # noqa: E402
from kontext_core.weights.safetensors_io import read_header  # noqa: E402

# Kontext-Tiny-like: in/out 64 channels, every other width differs from FLUX.1-dev's (768 / 4096 / 3072).
SMALL = FluxParams(vec_in_dim=24, context_in_dim=32, hidden_size=64, num_heads=4, depth=1, depth_single_blocks=1,
                   axes_dim=(4, 6, 6))
SMALL_AE = AutoEncoderParams(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, z_channels=16)


# --------------------------------------------------------------------------------------------------- files

class Files:
    """Lazily written model files in one temporary folder, shared by all cases of a run."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="kontext-corpus-"))
        self._cache: dict[str, object] = {}

    def once(self, key: str, make: Callable[[], object]):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def flux_sd(self, params: FluxParams = SMALL, seed: int = 0) -> dict:
        g = torch.Generator().manual_seed(seed)
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in Flux(params).state_dict().items()}
        return {k: (torch.randn(s, generator=g) * (0.3 / max(1, s[-1]) ** 0.5) if len(s) > 1
                    else 1 + 0.1 * torch.randn(s, generator=g)) for k, s in shapes.items()}

    def ae_sd(self, params: AutoEncoderParams = SMALL_AE) -> dict:
        torch.manual_seed(1)
        ae = AutoEncoder(params)
        with torch.no_grad():
            for p in ae.parameters():
                p.normal_(0, 0.05)
        return {k: v.contiguous() for k, v in ae.state_dict().items()}

    def write(self, name: str, sd: dict, metadata: dict | None = None) -> Path:
        path = self.dir / name
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
        return path

    def transformer(self) -> Path:
        return self.once("transformer", lambda: self.write("kontext-small.safetensors", self.flux_sd()))

    def ae(self) -> Path:
        return self.once("ae", lambda: self.write("ae-small.safetensors", self.ae_sd()))

    def model(self) -> Flux:
        return self.once("model", lambda: load_transformer(self.transformer()))

    def autoencoder(self) -> AutoEncoder:
        return self.once("autoencoder", lambda: load_autoencoder(self.ae()))


def text(b=1, length=8, width=SMALL.context_in_dim):
    return torch.randn(b, length, width)


def pooled(b=1, width=SMALL.vec_in_dim):
    return torch.randn(b, width)


def lat(b=1, c=16, h=4, w=4):
    return torch.randn(b, c, h, w)


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main(argv)
        except SystemExit as e:  # argparse
            rc = e.code if isinstance(e.code, int) else 1
    return rc, out.getvalue(), err.getvalue()


class CliFailed(Exception):
    """A CLI run that failed the way we promise: non-zero exit and exactly one line on stderr."""


def cli_error(argv: list[str]) -> None:
    rc, _, err = run_cli(argv)
    lines = [x for x in err.splitlines() if x.strip()]
    if rc != 0 and len(lines) == 1:
        raise CliFailed(lines[0])
    raise AssertionError(f"expected one error line and a non-zero exit, got rc={rc}, stderr={err!r}")


def in_limited_process(code: str, limit_bytes: int = 3 * 2**30) -> None:
    """Run `code` in a child whose address space is capped (resource.setrlimit), re-raising its error here.

    Without the engine's limits these inputs allocate tens of GB; with them they fail before allocating."""
    prog = (
        "import resource, sys\n"
        f"resource.setrlimit(resource.RLIMIT_AS, ({limit_bytes}, {limit_bytes}))\n"
        f"sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(ROOT / 'tests')!r})\n"
        "import bad_inputs as B\n"
        "try:\n"
        + "".join(f"    {line}\n" for line in code.splitlines())
        + "except MemoryError:\n    print('MemoryError'); sys.exit(4)\n"
        "except Exception as e:\n    print(type(e).__name__); print(e); sys.exit(3)\n"
        "print('accepted')\n")
    proc = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=300)
    first, _, rest = proc.stdout.partition("\n")
    errors = {"InputError": InputError, "CheckpointError": CheckpointError, "NumericalError": NumericalError}
    if proc.returncode == 3 and first in errors:
        raise errors[first](rest.strip())
    raise AssertionError(f"child exited {proc.returncode}: {proc.stdout[-500:]} {proc.stderr[-1500:]}")


# --------------------------------------------------------------------------------------------------- cases

@dataclass
class Refused:
    error: type
    needles: tuple[str, ...]  # must all appear in the message: the argument/file and what to do


@dataclass
class Accepted:
    check: Callable[[object], None] = lambda result: None


@dataclass
class Case:
    name: str
    item: str  # which part of the issue it covers
    run: Callable[[Files], object]
    expect: Refused | Accepted
    tags: list[str] = field(default_factory=list)


CASES: list[Case] = []


def case(name: str, item: str, expect):
    def deco(fn):
        CASES.append(Case(name, item, fn, expect))
        return fn
    return deco


def refused(error, *needles):
    return Refused(error, needles)


def finite_latent(h: int, w: int, b: int = 1):
    def check(result):
        x = result[0] if isinstance(result, tuple) else result.latent
        assert x.shape == (b, 16, h, w), x.shape
        assert bool(torch.isfinite(x).all())
    return Accepted(check)


def sample(f: Files, **kw):
    args = dict(prompt_embeds=text(), pooled_prompt_embeds=pooled(), size_latent=(4, 4), steps=2, seed=0)
    args.update(kw)
    return pipeline.sample(f.model(), **args)


# 1. engine validation against the loaded model ----------------------------------------------------------------

E = "engine arguments"
case("prompt of the wrong width", E, refused(InputError, "prompt", "width 16", "expects 32", "Encode the prompt"))(
    lambda f: sample(f, prompt_embeds=text(width=16)))
case("pooled of the wrong width", E, refused(InputError, "pooled output of width 768", "expects 24", "CLIP-L"))(
    lambda f: sample(f, pooled_prompt_embeds=pooled(width=768)))
case("negative prompt of the wrong width", E, refused(InputError, "negative prompt", "width 4096", "expects 32"))(
    lambda f: sample(f, true_cfg=2.0, negative_prompt_embeds=text(width=4096), negative_pooled_prompt_embeds=pooled()))
case("negative prompt missing for true_cfg", E, refused(InputError, "true_cfg", "negative_prompt_embeds"))(
    lambda f: sample(f, true_cfg=2.0))
case("prompt and pooled batches differ", E, refused(InputError, "mismatched sizes", "batch 2", "batch 1"))(
    lambda f: sample(f, prompt_embeds=text(b=2)))
case("prompt batch vs noise batch", E, refused(InputError, "the prompt", "batch 2", "3 images"))(
    lambda f: sample(f, prompt_embeds=text(b=2), pooled_prompt_embeds=pooled(b=2), noise=lat(b=3)))
case("noise with 4 channels", E, refused(InputError, "noise", "4 channels", "FLUX autoencoder"))(
    lambda f: sample(f, noise=lat(c=4)))
case("init latent with 4 channels", E, refused(InputError, "init latent", "4 channels", "not an SD1.x/SDXL VAE"))(
    lambda f: sample(f, init_latent=lat(c=4), denoise=0.5))
case("context latent with 4 channels", E, refused(InputError, "context latent 1", "4 channels"))(
    lambda f: sample(f, references=[lat(c=4)]))
case("context latent batch 3 for 2 images", E, refused(InputError, "context latent 1", "batch 3"))(
    lambda f: sample(f, prompt_embeds=text(b=2), pooled_prompt_embeds=pooled(b=2), references=[lat(b=3)]))
case("zero-length prompt", E, refused(InputError, "prompt", "empty", "at least one token"))(
    lambda f: sample(f, prompt_embeds=text(length=0)))
case("integer prompt embeddings", E, refused(InputError, "prompt text embeddings", "int64", "floating point"))(
    lambda f: sample(f, prompt_embeds=torch.zeros(1, 8, 32, dtype=torch.long)))
case("prompt given as a list", E, refused(InputError, "prompt text embeddings", "must be a tensor"))(
    lambda f: sample(f, prompt_embeds=[[0.0] * 32]))
case("seed 2**64", E, refused(InputError, "seed", "0 .. 18446744073709551615"))(lambda f: sample(f, seed=2**64))
case("negative seed", E, refused(InputError, "seed", "0 .. "))(lambda f: sample(f, seed=-1))
case("fractional seed", E, refused(InputError, "seed", "integer"))(lambda f: sample(f, seed=1.5))
case("steps 0", E, refused(InputError, "steps", ">= 1"))(lambda f: sample(f, steps=0))
case("steps 1e9", E, refused(InputError, "steps", "limit", "KONTEXT_MAX_STEPS"))(lambda f: sample(f, steps=10**9))
case("guidance nan", E, refused(InputError, "guidance", "finite"))(lambda f: sample(f, guidance=float("nan")))
case("true_cfg negative", E, refused(InputError, "true_cfg", ">= 0"))(lambda f: sample(f, true_cfg=-1.0))
case("denoise 0", E, refused(InputError, "denoise", "(0.0, 1.0]"))(lambda f: sample(f, denoise=0.0))
case("denoise nan", E, refused(InputError, "denoise", "finite"))(lambda f: sample(f, denoise=float("nan")))
case("unknown solver", E, refused(InputError, "rk4", "euler"))(lambda f: sample(f, solver="rk4"))
case("unknown layout", E, refused(InputError, "diagonal", "offset"))(
    lambda f: sample(f, references=[lat()], layout="diagonal"))
case("no output size at all", E, refused(InputError, "no output size", "give size"))(
    lambda f: sample(f, size_latent=None))
case("noise size disagrees with size", E, refused(InputError, "mismatched sizes", "noise"))(
    lambda f: sample(f, noise=lat(h=6)))
case("prompt with NaN", E, refused(NumericalError, "prompt text embeddings", "NaN", "bf16 or fp32"))(
    lambda f: sample(f, prompt_embeds=torch.full((1, 8, 32), float("nan"))))
case("context latent with Inf", E, refused(NumericalError, "context latent 1", "NaN or Inf", "VAE"))(
    lambda f: sample(f, references=[torch.full((1, 16, 4, 4), float("inf"))]))
case("edit with images but no ae", E, refused(InputError, "context images", "autoencoder"))(
    lambda f: pipeline.edit(f.model(), None, images=[Image.new("RGB", (32, 32))], prompt_embeds=text(),
                            pooled_prompt_embeds=pooled(), steps=1))
case("edit resize 'zoom'", E, refused(InputError, "resize mode 'zoom'", "stretch"))(
    lambda f: pipeline.edit(f.model(), f.autoencoder(), images=[Image.new("RGB", (32, 32))], resize="zoom",
                            prompt_embeds=text(), pooled_prompt_embeds=pooled(), steps=1))
case("sample a Kontext-Tiny-sized model", E, finite_latent(4, 6, b=2))(
    lambda f: sample(f, prompt_embeds=text(b=2), pooled_prompt_embeds=pooled(b=2), size_latent=(4, 6),
                     references=[lat(h=4, w=4)]))
case("true CFG with a negative prompt", E, finite_latent(4, 4))(
    lambda f: sample(f, true_cfg=2.0, negative_prompt_embeds=text(), negative_pooled_prompt_embeds=pooled()))
case("seed 2**64-1 (largest)", E, finite_latent(4, 4))(lambda f: sample(f, seed=2**64 - 1))
case("numpy integer seed and steps", E, finite_latent(4, 4))(lambda f: sample(f, seed=np.int64(7), steps=np.int32(2)))


def _edit_image(f: Files, size=None, resize="stretch", image=None):
    return pipeline.edit(f.model(), f.autoencoder(), images=[image or Image.new("RGB", (40, 24), (200, 30, 30))],
                         prompt_embeds=text(), pooled_prompt_embeds=pooled(), steps=1, size=size, resize=resize)


def _edit_ok(w, h):
    def check(r):
        assert r.latent.shape == (1, 16, h // 8, w // 8) and bool(torch.isfinite(r.latent).all())
        assert r.images[0].size == (w, h)
    return Accepted(check)


# 6. sizes and memory ------------------------------------------------------------------------------------------

S = "sizes and memory"
case("edit size (0, 0)", S, refused(InputError, "size 0x0", "too small", ">= 16", "leave the size unset"))(
    lambda f: _edit_image(f, size=(0, 0)))
case("edit size negative", S, refused(InputError, "size -32x64", "too small"))(lambda f: _edit_image(f, size=(-32, 64)))
case("edit size not a pair", S, refused(InputError, "size must be (width, height)"))(lambda f: _edit_image(f, size=512))
case("edit size 200000x200000", S, refused(InputError, "200000x200000", "limit", "KONTEXT_MAX_PIXELS"))(
    lambda f: _edit_image(f, size=(200000, 200000)))
case("edit keep mode on a small image", S, _edit_ok(32, 16))(lambda f: _edit_image(f, resize="keep"))
case("edit with explicit size 48x32", S, _edit_ok(48, 32))(lambda f: _edit_image(f, size=(48, 32)))
case("denoise 1e-9 (2.8e10-step schedule)", S, refused(InputError, "denoise=1e-09", "limit",
                                                       "KONTEXT_MAX_SCHEDULE_STEPS", "use denoise >="))(
    lambda f: flux_sigmas(28, 4096, denoise=1e-9))
case("denoise 0.001 (28000-step schedule, kept partial)", S, Accepted(
    lambda s: (s.shape == (29,) and bool(torch.isfinite(s).all()) and float(s[-1]) == 0.0) or (_ for _ in ()).throw(
        AssertionError(s))))(lambda f: flux_sigmas(28, 4096, denoise=0.001))
case("size limit raised by the environment", S, Accepted(lambda r: r == (8192, 4096)))(
    lambda f: _with_env("KONTEXT_MAX_PIXELS", str(8192 * 4096), lambda: val.check_size(8192, 4096)))
case("resize keep on 12000x12000 under a 3 GiB rlimit", S,
     refused(InputError, "12000x12000", "resize 'keep'", "limit", "KONTEXT_MAX_PIXELS", "'stretch'"))(
    lambda f: in_limited_process(
        "from PIL import Image\nfrom kontext_core.images import prepare_image\n"
        "prepare_image(Image.new('RGB', (12000, 12000)), 'keep', what='context image 1')"))
case("size 200000x200000 under a 3 GiB rlimit", S, refused(InputError, "200000x200000", "KONTEXT_MAX_PIXELS"))(
    lambda f: in_limited_process(
        "f = B.Files()\nB.sample(f, size_latent=(25000, 25000))"))
case("denoise 1e-9 through sample under a 3 GiB rlimit", S, refused(InputError, "denoise=1e-09", "limit"))(
    lambda f: in_limited_process("f = B.Files()\nB.sample(f, steps=28, denoise=1e-9, init_latent=B.lat())"))


def _with_env(name, value, fn):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        return fn()
    finally:
        if old is None:
            os.environ.pop(name)
        else:
            os.environ[name] = old


# 2. NaN / Inf -------------------------------------------------------------------------------------------------

N = "non-finite results"


def _nan_transformer(f: Files) -> Path:
    sd = {k: v.to(torch.bfloat16) for k, v in f.flux_sd().items()}
    sd["double_blocks.0.img_mlp.0.weight"][3, 5] = float("nan")
    return f.write("nan-weight.safetensors", sd)


def _nan_gguf(f: Files) -> Path:
    import gguf

    from kontext_core.weights.gguf_convert import convert_to_gguf

    out = f.dir / "nan-scale-Q8_0.gguf"
    convert_to_gguf(f.transformer(), out, "Q8_0")
    reader = gguf.GGUFReader(str(out))
    t = next(t for t in reader.tensors if t.name == "double_blocks.0.img_mlp.0.weight")
    offset = int(t.data_offset)
    del reader
    with open(out, "r+b") as fh:  # the first Q8_0 block's fp16 scale := NaN
        fh.seek(offset)
        fh.write(struct.pack("<e", float("nan")))
    return out


def _nan_ae(f: Files) -> Path:
    sd = f.ae_sd()
    sd["encoder.conv_in.weight"][0, 0, 0, 0] = float("nan")
    return f.write("ae-nan.safetensors", sd)


def _overflow_fp16(f: Files):
    sd = {k: (v * 300 if v.ndim > 1 else v).to(torch.float16) for k, v in f.flux_sd().items()}
    model = load_transformer(f.write("overflow-fp16.safetensors", sd))
    return pipeline.sample(model, prompt_embeds=text() * 100, pooled_prompt_embeds=pooled() * 100,
                           size_latent=(4, 4), steps=2, dtype=torch.float16)


case("NaN in a bf16 transformer weight", N,
     refused(NumericalError, "transformer", "first step", "nan-weight.safetensors", "re-download"))(
    lambda f: pipeline.sample(load_transformer(_nan_transformer(f)), prompt_embeds=text(),
                              pooled_prompt_embeds=pooled(), size_latent=(4, 4), steps=2))
case("NaN in a GGUF block scale", N, refused(NumericalError, "nan-scale-Q8_0.gguf", "corrupt weights"))(
    lambda f: pipeline.sample(load_transformer(_nan_gguf(f)), prompt_embeds=text(),
                              pooled_prompt_embeds=pooled(), size_latent=(4, 4), steps=2))
case("NaN in an AE weight", N, refused(NumericalError, "autoencoder", "encoding context image 1", "ae-nan.safetensors"))(
    lambda f: pipeline.edit(f.model(), load_autoencoder(_nan_ae(f)), images=[Image.new("RGB", (32, 32))],
                            prompt_embeds=text(), pooled_prompt_embeds=pooled(), steps=1))
case("fp16 overflow", N, refused(NumericalError, "fp16 overflow is the most likely cause", "bfloat16 or float32"))(
    _overflow_fp16)


# 3. model families and weights files ------------------------------------------------------------------------

W = "model files"


def _variant(f: Files, in_channels: int, name: str) -> Path:
    return f.write(name, f.flux_sd(FluxParams(**{**SMALL.to_dict(), "in_channels": in_channels})))


def _sd_checkpoint(f: Files) -> Path:
    return f.write("sd15-full.safetensors", {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
        "model.diffusion_model.out.2.weight": torch.zeros(4, 8, 3, 3),
        "first_stage_model.encoder.conv_in.weight": torch.zeros(4, 3, 3, 3),
        "first_stage_model.decoder.conv_in.weight": torch.zeros(4, 4, 3, 3),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(10, 4)})


def _sd_vae(f: Files, quant: bool = True) -> Path:
    sd = f.ae_sd(AutoEncoderParams(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, z_channels=4))
    if quant:
        sd["quant_conv.weight"], sd["quant_conv.bias"] = torch.zeros(8, 8, 1, 1), torch.zeros(8)
        sd["post_quant_conv.weight"], sd["post_quant_conv.bias"] = torch.zeros(4, 4, 1, 1), torch.zeros(4)
    return f.write("sd-vae-quant.safetensors" if quant else "vae-z4.safetensors", sd)


def _diffusers_folder(f: Files, axes) -> Path:
    folder = f.dir / f"diffusers-{abs(hash(str(axes)))}"
    (folder / "transformer").mkdir(parents=True, exist_ok=True)
    save_file({"x_embedder.weight": torch.zeros(64, 64)}, str(folder / "transformer" /
                                                               "diffusion_pytorch_model.safetensors"))
    (folder / "transformer" / "config.json").write_text(json.dumps({"axes_dims_rope": axes}))
    return folder


def _edited(f: Files, name: str, key: str, value) -> Path:
    sd = f.flux_sd()
    sd[key] = value
    return f.write(name, sd)


case("FLUX Fill transformer (img_in 384)", W, refused(CheckpointError, "fill-small.safetensors", "FLUX.1 Fill", "384",
                                                      "Expected a FLUX.1 Kontext transformer"))(
    lambda f: load_transformer(_variant(f, 384, "fill-small.safetensors")))
case("FLUX Depth transformer (img_in 128)", W, refused(CheckpointError, "depth-small.safetensors", "Depth or Canny",
                                                       "flux1-kontext-dev"))(
    lambda f: load_transformer(_variant(f, 128, "depth-small.safetensors")))
case("info on a Fill transformer", W, refused(CliFailed, "fill-small.safetensors", "FLUX.1 Fill"))(
    lambda f: cli_error(["info", str(_variant(f, 384, "fill-small.safetensors"))]))
case("Fill transformer through the ComfyUI loader's checks", W, refused(CheckpointError, "FLUX.1 Fill"))(
    lambda f: __import__("nodes.logic", fromlist=["x"]).prepare_checkpoint(_variant(f, 384, "fill-small.safetensors")))
case("full SD checkpoint bundling a VAE", W, refused(CheckpointError, "sd15-full.safetensors", "Stable Diffusion",
                                                     "Expected a FLUX.1 Kontext transformer"))(
    lambda f: load_transformer(_sd_checkpoint(f)))
case("info on an SD VAE (z=4, quant convs)", W, refused(CliFailed, "sd-vae-quant.safetensors", "quant convs"))(
    lambda f: cli_error(["info", str(_sd_vae(f))]))
case("AE with 4 latent channels", W, refused(CheckpointError, "vae-z4.safetensors", "4 latent channels", "16",
                                             "ae.safetensors"))(
    lambda f: load_autoencoder(_sd_vae(f, quant=False)))
case("zero-size transformer tensor", W, refused(CheckpointError, "zero-size.safetensors", "img_in.weight",
                                                "zero size", "again"))(
    lambda f: load_transformer(_edited(f, "zero-size.safetensors", "img_in.weight", torch.zeros(0, 64))))
case("integer-dtype transformer weight", W, refused(CheckpointError, "int-weight.safetensors", "txt_in.weight",
                                                    "int32", "floating point"))(
    lambda f: load_transformer(_edited(f, "int-weight.safetensors", "txt_in.weight",
                                       torch.zeros(64, 32, dtype=torch.int32))))
case("zero-size AE tensor", W, refused(CheckpointError, "ae-zero.safetensors", "zero size"))(
    lambda f: load_autoencoder(f.write("ae-zero.safetensors", {**f.ae_sd(), "decoder.conv_out.bias": torch.zeros(0)})))
case("non-integer axes_dims_rope", W, refused(CheckpointError, "config.json", "axes_dims_rope", "positive integers"))(
    lambda f: load_transformer(_diffusers_folder(f, ["a", "b", "c"])))
case("fractional axes_dims_rope", W, refused(CheckpointError, "config.json", "axes_dims_rope"))(
    lambda f: load_transformer(_diffusers_folder(f, [4.5, 6, 6])))
case("info on a missing file", W, refused(CliFailed, "missing.safetensors", "no such file"))(
    lambda f: cli_error(["info", str(f.dir / "missing.safetensors")]))
case("Kontext-Tiny-sized transformer loads", W, Accepted(lambda m: m.params == SMALL))(lambda f: f.model())
case("16-channel small AE round trip", W, Accepted(lambda x: x.shape == (1, 3, 32, 48)))(
    lambda f: f.autoencoder().decode(f.autoencoder().encode(torch.zeros(1, 3, 32, 48))))
case("info on the small transformer and AE", W, Accepted(lambda r: r[0] == 0 and "FLUX transformer" in r[1]
                                                         and "FLUX autoencoder" in r[1]))(
    lambda f: run_cli(["info", str(f.transformer()), str(f.ae())]))


# 4. safetensors headers ----------------------------------------------------------------------------------------

H = "safetensors headers"


def _crafted(f: Files, name: str, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path = f.dir / name
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


case("overlapping data_offsets", H, refused(CheckpointError, "overlap.safetensors", "overlap", "Download"))(
    lambda f: read_header(_crafted(f, "overlap.safetensors", {
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, bytes(24))))
case("negative data_offsets", H, refused(CheckpointError, "negative.safetensors", "data_offsets", "download"))(
    lambda f: read_header(_crafted(f, "negative.safetensors", {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, bytes(8))))
case("truncated safetensors", H, refused(CheckpointError, "truncated.safetensors", "truncated", "download it again"))(
    lambda f: read_header(_crafted(f, "truncated.safetensors", {
        "a": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}}, bytes(16))))
case("header that is not JSON", H, refused(CheckpointError, "garbage.safetensors", "not valid JSON"))(
    lambda f: read_header(f.dir.joinpath("garbage.safetensors") if f.dir.joinpath("garbage.safetensors").write_bytes(
        struct.pack("<Q", 4) + b"{{{{") else None))
case("tensors with a gap between them (tolerated)", H, Accepted(lambda r: set(r[0]) == {"a", "b"}))(
    lambda f: read_header(_crafted(f, "gap.safetensors", {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}}, bytes(24))))


# 5. images ------------------------------------------------------------------------------------------------------

I = "images"


def _png16(f: Files) -> Image.Image:
    path = f.dir / "grey16.png"
    Image.fromarray(np.full((16, 24), 32768, dtype=np.uint16)).save(path)
    return Image.open(path)


def _grey_is(value: int, size=(24, 16)):
    def check(img):
        arr = np.asarray(img.convert("RGB"))
        assert img.size == size and abs(int(arr.mean()) - value) <= 1, (img.size, arr.mean())
    return Accepted(check)


case("16-bit greyscale PNG", I, _grey_is(128))(lambda f: im.to_pil(_png16(f)))
case("uint8 CHW tensor", I, _grey_is(200))(lambda f: im.to_pil(torch.full((3, 16, 24), 200, dtype=torch.uint8)))
case("float numpy HWC array in [0, 1]", I, _grey_is(64))(lambda f: im.to_pil(np.full((16, 24, 3), 0.25)))
case("uint16 numpy array", I, _grey_is(255))(lambda f: im.to_pil(np.full((16, 24), 65535, dtype=np.uint16)))
case("(1, H, W, 3) tensor in [0, 1]", I, _grey_is(255))(lambda f: im.to_pil(torch.ones(1, 16, 24, 3)))
case("bf16 tensor with rounding overshoot", I, _grey_is(255))(
    lambda f: im.to_pil(torch.full((3, 16, 24), 1.0004, dtype=torch.bfloat16).float()))
case("float tensor 0..255", I, refused(InputError, "image", "[0, 255]", "uint8", "divide by 255"))(
    lambda f: im.to_pil(torch.linspace(0, 255, 3 * 16 * 24).reshape(3, 16, 24)))
case("float tensor in [-1, 1]", I, refused(InputError, "[-1, 1]", "(x + 1) / 2"))(
    lambda f: im.to_pil(torch.linspace(-1, 1, 3 * 16 * 24).reshape(3, 16, 24)))
case("rank-5 tensor", I, refused(InputError, "image", "shape (1, 2, 16, 24, 3)", "expected"))(
    lambda f: im.to_pil(torch.rand(1, 2, 16, 24, 3)))
case("batch of 2 given as one image", I, refused(InputError, "shape (2, 16, 24, 3)", "one by one"))(
    lambda f: im.to_pil(torch.rand(2, 16, 24, 3)))
case("image with NaN", I, refused(InputError, "NaN", "[0, 1]"))(
    lambda f: im.to_pil(torch.full((16, 24, 3), float("nan"))))
case("int64 tensor", I, refused(InputError, "int64", "uint8"))(lambda f: im.to_pil(torch.zeros(16, 24, 3, dtype=torch.long)))
case("two-channel image", I, refused(InputError, "shape (16, 24, 2)", "C in 1/3/4"))(
    lambda f: im.to_pil(np.zeros((16, 24, 2), dtype=np.uint8)))
case("a path string instead of an image", I, refused(InputError, "str", "PIL image"))(lambda f: im.to_pil("car.png"))
case("edit from a 16-bit PNG", I, _edit_ok(16, 16))(lambda f: _edit_image(f, resize="keep", image=_png16(f)))


# 7. CLI ----------------------------------------------------------------------------------------------------------

C = "command line"
for argv, needles in [
    (["plan", "--vram", "0"], ("--vram", "> 0")), (["plan", "--vram", "-5"], ("--vram", "> 0")),
    (["plan", "--vram", "nan"], ("--vram", "finite")), (["plan", "--size", "0x0"], ("--size", "too small", "WxH")),
    (["plan", "--size=-64x64"], ("--size", "too small")), (["plan", "--size", "big"], ("size", "1024x1024")),
    (["plan", "--refs", "-1"], ("--refs", "0 .. 16")), (["plan", "--ram", "0"], ("--ram", "> 0")),
    (["plan", "--pcie-gbps", "0"], ("--pcie-gbps", "> 0")), (["plan", "--size", "100000x100000"], ("limit",)),
    (["convert", "/nonexistent/in.safetensors", "/tmp/x.gguf"], ("in.safetensors", "no such file")),
]:
    case(f"cli {' '.join(argv)}", C, refused(CliFailed, *needles))(lambda f, argv=argv: cli_error(argv))
case("convert into a missing folder names the output, not the temp file", C,
     refused(CliFailed, "no-such-dir/out.gguf", "cannot write", "folder exists"))(
    lambda f: cli_error(["convert", str(f.transformer()), str(f.dir / "no-such-dir" / "out.gguf")]))
case("convert with an unknown type", C, refused(CliFailed, "Q9_X", "choose one of"))(
    lambda f: cli_error(["convert", str(f.transformer()), str(f.dir / "o.gguf"), "--type", "Q9_X"]))
case("info on a directory with a .safetensors folder inside", C, refused(CliFailed, "x.safetensors"))(
    lambda f: cli_error(["info", str(_dir_with_folder(f))]))
case("plan with defaults and a small model", C, Accepted(lambda r: r[0] == 0 and "storage" in r[1]))(
    lambda f: run_cli(["plan", str(f.transformer()), "--gpu", "RTX 3060", "--vram", "8", "--refs", "0"]))


def _dir_with_folder(f: Files) -> Path:
    d = f.dir / "odd-folder"
    (d / "x.safetensors").mkdir(parents=True, exist_ok=True)
    return d


# 8. conditioning files --------------------------------------------------------------------------------------------

K = "conditioning files"
case("integer tensors in a conditioning file", K, refused(CheckpointError, "int-cond.safetensors", "int64",
                                                          "Save the conditioning again"))(
    lambda f: load_embeddings(f.write("int-cond.safetensors", {"prompt_embeds": torch.zeros(1, 4, 8, dtype=torch.long),
                                                               "pooled_prompt_embeds": torch.zeros(1, 8)})))
case("non-numeric guidance metadata", K, refused(CheckpointError, "guidance-abc.safetensors", "'abc'", "such as 2.5"))(
    lambda f: load_embeddings(f.write("guidance-abc.safetensors", {"prompt_embeds": text(), "pooled_prompt_embeds":
                                                                   pooled()}, {"guidance": "abc"})))
case("guidance metadata nan", K, refused(CheckpointError, "guidance-nan.safetensors", "guidance"))(
    lambda f: load_embeddings(f.write("guidance-nan.safetensors", {"prompt_embeds": text(), "pooled_prompt_embeds":
                                                                   pooled()}, {"guidance": "nan"})))
case("conditioning file without pooled output", K, refused(CheckpointError, "nopooled.safetensors", "pooled_prompt_embeds"))(
    lambda f: load_embeddings(f.write("nopooled.safetensors", {"prompt_embeds": text()})))
case("conditioning file with a batch mismatch", K, refused(CheckpointError, "batch.safetensors", "batch 2"))(
    lambda f: load_embeddings(f.write("batch.safetensors", {"prompt_embeds": text(b=2), "pooled_prompt_embeds": pooled()})))
case("conditioning round trip", K, Accepted(lambda r: r[0].shape == (1, 8, 32) and r[2] == 2.5))(
    lambda f: (save_embeddings(f.dir / "ok-cond.safetensors", text(), pooled(), 2.5),
               load_embeddings(f.dir / "ok-cond.safetensors"))[1])


# 9. text encoders (T5-XXL / CLIP-L files for --prompt with a real model) --------------------------------------------

T = "text encoders"


def _t5_folder(f: Files) -> Path:
    """A tiny diffusers-layout FLUX text folder (T5, CLIP, both tokenizers)."""
    def make():
        from tiny_text_encoders import write_flux_text_folder
        return write_flux_text_folder(f.dir / "flux-text")[0]
    return f.once("t5_folder", make)


def _t5_file(f: Files) -> Path:
    def make():
        from safetensors.torch import load_file
        sd = load_file(str(_t5_folder(f) / "text_encoder_2" / "model.safetensors"))
        return f.write("t5xxl_small.safetensors", {k: v for k, v in sd.items() if "embed_tokens" not in k})
    return f.once("t5_file", make)


def _clip_file(f: Files) -> Path:
    def make():
        from safetensors.torch import load_file
        return f.write("clip_l_small.safetensors", load_file(str(_t5_folder(f) / "text_encoder" / "model.safetensors")))
    return f.once("clip_file", make)


def _te(*args, **kw):
    from kontext_core.text_encoders import load_clip_l, load_t5, load_text_encoders
    return {"t5": load_t5, "clip": load_clip_l, "both": load_text_encoders}[args[0]](*args[1:], **kw)


def _long_prompt(f: Files):
    import logging

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    log = logging.getLogger("kontext_core")
    log.addHandler(handler)
    try:
        embeds, pooled_ = _te("both", _t5_folder(f)).encode("make the red car blue " * 130 + "zebra")
    finally:
        log.removeHandler(handler)
    return embeds.shape, records


def _flux_gguf(f: Files) -> Path:
    from kontext_core.weights.gguf_convert import convert_to_gguf
    return f.once("flux_gguf", lambda: convert_to_gguf(f.transformer(), f.dir / "kontext-small-Q8_0.gguf", "Q8_0")
                  or f.dir / "kontext-small-Q8_0.gguf")


case("transformer given as T5", T, refused(CheckpointError, "kontext-small.safetensors", "FLUX transformer",
                                           "--transformer"))(lambda f: _te("t5", f.transformer()))
case("autoencoder given as CLIP-L", T, refused(CheckpointError, "ae-small.safetensors", "autoencoder", "--ae"))(
    lambda f: _te("clip", f.ae()))
case("T5 given as CLIP-L", T, refused(CheckpointError, "t5xxl_small.safetensors", "T5 text encoder", "--t5"))(
    lambda f: _te("clip", _t5_file(f)))
case("transformer GGUF given as T5", T, refused(CheckpointError, "kontext-small-Q8_0.gguf", "'flux' model",
                                                "T5 encoder GGUF"))(lambda f: _te("t5", _flux_gguf(f)))
case("single-file T5 without tokenizers", T, refused(CheckpointError, "tokenizer/ and tokenizer_2/",
                                                     "comfy/sd1_tokenizer", "FLUX.1-Kontext-dev"))(
    lambda f: _te("both", _t5_file(f), _clip_file(f)))
case("prompt longer than 512 T5 tokens: cut with a warning", T,
     Accepted(lambda r: r[0][1] == 512 and any("cut off" in m and "zebra" in m.replace(" ", "") for m in r[1])))(
    _long_prompt)
case("cli --t5 without a transformer", T, refused(CliFailed, "--t5", "--transformer and --ae"))(
    lambda f: cli_error(["edit", str(f.dir / "x.png"), "--prompt", "x", "--t5", str(_t5_file(f))]))


# nodes call the same checks (one place, one message) --------------------------------------------------------------

ND = "nodes"


def _logic():
    from nodes import logic
    return logic


case("node: conditioning of the wrong width", ND, refused(InputError, "positive conditioning", "width 4096",
                                                          "expects 32", "DualCLIPLoader"))(
    lambda f: _logic().check_text_dims(_logic().prompt_parts([[text(width=4096), {"pooled_output": pooled()}]]), 32, 24))
case("node: width x height above the limit", ND, refused(InputError, "width x height", "KONTEXT_MAX_PIXELS"))(
    lambda f: _logic().output_latent_size([], None, 65536, 65536))
case("node: seed 2**64", ND, refused(InputError, "seed"))(
    lambda f: _logic().check_sampler_options(20, 1.0, 1.0, False, "euler", "kontext", ("kontext",), 2.5, 2**64))
case("node: denoise 1e-9", ND, refused(InputError, "denoise", "KONTEXT_MAX_SCHEDULE_STEPS"))(
    lambda f: _logic().check_sampler_options(20, 1e-9, 1.0, False, "euler", "kontext", ("kontext",)))
case("node: SD latent as a reference", ND, refused(InputError, "reference 1", "4 channels", "FLUX autoencoder"))(
    lambda f: _logic().add_references([[text(), {"pooled_output": pooled()}]], [{"samples": lat(c=4)}]))
case("node: width 0 = automatic", ND, Accepted(lambda r: r == (1, 4, 6)))(
    lambda f: _logic().output_latent_size([lat(h=4, w=6)], None, 0, 0))


# --------------------------------------------------------------------------------------------------- runner

def outcome(c: Case, files: Files) -> tuple[str, str]:
    """('refused' | 'accepted' | 'FAILED', detail) for one case."""
    try:
        result = c.run(files)
    except Exception as e:  # noqa: BLE001 - every outcome is classified below
        if isinstance(c.expect, Refused) and isinstance(e, c.expect.error):
            missing = [n for n in c.expect.needles if n.lower() not in str(e).lower()]
            if not missing:
                return "refused", str(e)
            return "FAILED", f"message lacks {missing}: {e}"
        return "FAILED", f"{type(e).__name__}: {e}"
    if isinstance(c.expect, Accepted):
        try:
            c.expect.check(result)
        except Exception as e:  # noqa: BLE001
            return "FAILED", f"accepted but wrong result: {type(e).__name__}: {e}"
        return "accepted", ""
    return "FAILED", "accepted, expected a refusal"


def main() -> int:
    files = Files()
    counts = {"refused": 0, "accepted": 0, "FAILED": 0}
    for c in CASES:
        kind, detail = outcome(c, files)
        counts[kind] += 1
        if kind == "FAILED" or "-v" in sys.argv:
            print(f"{kind:8s} [{c.item}] {c.name}: {detail}")
    print(f"bad-input corpus: tried {len(CASES)}, clear error {counts['refused']}, accepted {counts['accepted']}, "
          f"failed {counts['FAILED']}")
    return 1 if counts["FAILED"] else 0


if __name__ == "__main__":
    sys.exit(main())
