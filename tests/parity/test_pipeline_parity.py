"""Full edit parity: the engine's `edit` vs diffusers' FluxKontextPipeline on the same tiny random weights.

diffusers runs with prompt embeddings passed directly (text encoders None), explicit packed latents,
height/width given and max_area = h*w with auto-resize off, which makes it sample exactly BFL's way.
Tolerance: fp32 end to end (AE encode, 4 DiT steps, AE decode); observed max |Δ| ~1e-6 on latents and
images; we assert 1e-5 absolute (latents are O(1), images in [-1, 1]).
"""

import numpy as np
import pytest
import torch
from PIL import Image

from kontext_core import tokens as tok
from kontext_core.pipeline import edit, make_noise
from kontext_core.weights.ae_layout import load_autoencoder
from kontext_core.weights.loader import load_transformer
from tiny_models import TINY_AXES, tiny_diffusers_transformer, write_bfl

ATOL = 1e-5
STEPS = 4


def tiny_diffusers_vae(seed=5):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 32, 64, 64),
                        layers_per_block=2, latent_channels=16, norm_num_groups=32, use_quant_conv=False,
                        use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159).eval()
    with torch.no_grad():
        for n, p in vae.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return vae


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline

    d = tmp_path_factory.mktemp("pipe")
    transformer = tiny_diffusers_transformer(seed=2)
    vae = tiny_diffusers_vae()
    vae.save_pretrained(d / "vae", safe_serialization=True)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                            base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                            max_image_seq_len=4096)
    pipe = FluxKontextPipeline(scheduler=sched, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                               tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    ours = load_transformer(write_bfl(transformer, d / "flux.safetensors"), params={"axes_dim": TINY_AXES})
    ae = load_autoencoder(d / "vae")
    return pipe, ours, ae


def make_image(w, h, seed=0):
    rng = np.random.default_rng(seed)
    # smooth-ish content so LANCZOS resizes are well conditioned
    base = rng.random((h // 4 + 1, w // 4 + 1, 3))
    img = Image.fromarray((base * 255).astype(np.uint8)).resize((w, h), Image.Resampling.BILINEAR)
    return img


def embeds(b=1, L=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, L, 32, generator=g), torch.randn(b, 24, generator=g)


@pytest.mark.parametrize("img_wh,out_wh", [((64, 48), (64, 48)), ((48, 80), (48, 80)),
                                           ((64, 48), (72, 56)),   # output not a multiple of 16 -> 64x48
                                           ((70, 52), None)])      # context not a multiple of 16 -> 64x48
def test_edit_matches_flux_kontext_pipeline(models, img_wh, out_wh):
    pipe, ours, ae = models
    img = make_image(*img_wh)
    w, h = out_wh or img_wh
    lw, lh = (w // 16) * 2, (h // 16) * 2
    noise = make_noise((1, 16, lh, lw), seed=7)
    t5, clip = embeds()
    res = edit(ours, ae, images=[img], prompt_embeds=t5, pooled_prompt_embeds=clip, size=(w, h), resize="keep",
               steps=STEPS, guidance=2.5, noise=noise)
    kw = dict(image=img, prompt_embeds=t5, pooled_prompt_embeds=clip, height=h, width=w, max_area=h * w,
              _auto_resize=False, num_inference_steps=STEPS, guidance_scale=2.5, latents=tok.pack(noise))
    with torch.no_grad():
        lat = pipe(output_type="latent", **kw).images
        pix = pipe(output_type="pt", **kw).images  # [0, 1]
    theirs_latent = tok.unpack(lat, lh, lw)
    d_lat = (res.latent - theirs_latent).abs().max().item()
    d_img = ((res.pixels.clamp(-1, 1) + 1) / 2 - pix).abs().max().item()
    print(f"\n[img {img_wh} out {out_wh}] latent max|Δ| = {d_lat:.2e}, image max|Δ| = {d_img:.2e}")
    assert res.images[0].size == (lw * 8, lh * 8)
    assert d_lat < ATOL and d_img < ATOL


def test_true_cfg_matches_pipeline(models):
    pipe, ours, ae = models
    img = make_image(64, 48, seed=3)
    noise = make_noise((1, 16, 6, 8), seed=11)
    t5, clip = embeds(seed=2)
    n5, nclip = embeds(seed=4)
    res = edit(ours, ae, images=[img], prompt_embeds=t5, pooled_prompt_embeds=clip, resize="keep", steps=3,
               guidance=3.0, noise=noise, true_cfg=2.0, negative_prompt_embeds=n5,
               negative_pooled_prompt_embeds=nclip, decode=False)
    with torch.no_grad():
        lat = pipe(image=img, prompt_embeds=t5, pooled_prompt_embeds=clip, negative_prompt_embeds=n5,
                   negative_pooled_prompt_embeds=nclip, true_cfg_scale=2.0, height=48, width=64, max_area=64 * 48,
                   _auto_resize=False, num_inference_steps=3, guidance_scale=3.0, latents=tok.pack(noise),
                   output_type="latent").images
    d = (res.latent - tok.unpack(lat, 6, 8)).abs().max().item()
    print(f"\n[true cfg] latent max|Δ| = {d:.2e}")
    assert d < ATOL


def test_two_references_match_manual_diffusers_loop(models):
    """diffusers' pipeline takes one context image; for two we drive its transformer and scheduler by hand,
    with the `offset` placement written out independently."""
    pipe, ours, ae = models
    imgs = [make_image(64, 48, seed=5), make_image(32, 64, seed=6)]
    noise = make_noise((1, 16, 6, 8), seed=13)
    t5, clip = embeds(seed=8)
    res = edit(ours, ae, images=imgs, prompt_embeds=t5, pooled_prompt_embeds=clip, resize="keep", steps=STEPS,
               guidance=2.5, noise=noise, decode=False)

    vae, transformer, sched = pipe.vae, pipe.transformer, pipe.scheduler
    refs = []
    for im in imgs:
        x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)[None] * 2 - 1
        with torch.no_grad():
            m = vae.encode(x).latent_dist.mean
        refs.append((m - 0.1159) * 0.3611)

    def ids(h, w, index, r0=0, c0=0):
        rr, cc = torch.meshgrid(torch.arange(h // 2) + r0, torch.arange(w // 2) + c0, indexing="ij")
        return torch.stack([torch.full_like(rr, index), rr, cc], -1).reshape(-1, 3).float()

    # ref 1 (6x8 latent) at the origin; ref 2 (8x4) beside it keeps the canvas squarer (8x12 vs 14x8), so it
    # goes right: column offset 8 latent cells = 4 patches.
    all_ids = torch.cat([ids(6, 8, 0), ids(6, 8, 1), ids(8, 4, 1, 0, 4)])
    ctx = torch.cat([tok.pack(r) for r in refs], 1)
    lat = tok.pack(noise)
    n = lat.shape[1]
    sigmas = np.linspace(1.0, 1 / STEPS, STEPS)
    sched.set_timesteps(sigmas=sigmas, mu=0.5 + (1.15 - 0.5) / (4096 - 256) * (n - 256))
    for t in sched.timesteps:
        with torch.no_grad():
            v = transformer(hidden_states=torch.cat([lat, ctx], 1), encoder_hidden_states=t5, pooled_projections=clip,
                            timestep=(t / 1000).expand(1), img_ids=all_ids, txt_ids=torch.zeros(t5.shape[1], 3),
                            guidance=torch.tensor([2.5])).sample[:, :n]
        lat = sched.step(v, t, lat, return_dict=False)[0]
    d = (res.latent - tok.unpack(lat, 6, 8)).abs().max().item()
    print(f"\n[2 refs] latent max|Δ| = {d:.2e}")
    assert d < ATOL


def test_latent_chain_skips_decode_encode(models):
    """Turn 2 takes turn 1's latent directly: no AE round trip, so the context is bit-identical."""
    _, ours, ae = models
    t5, clip = embeds()
    first = edit(ours, ae, images=[make_image(64, 48)], prompt_embeds=t5, pooled_prompt_embeds=clip, resize="keep",
                 steps=2, seed=1, decode=False)
    # The AE is handed over (as a chain would) but any use of it fails the test.
    second = edit(ours, NoAutoencoder(), latents=[first.latent], prompt_embeds=t5, pooled_prompt_embeds=clip,
                  steps=2, seed=2, decode=False)
    assert second.latent.shape == first.latent.shape
    assert not torch.equal(second.latent, first.latent)
    # and turn 2 is the sampler run on turn 1's latent as is: the reference is diffusers' transformer + scheduler
    pipe = models[0]
    _, want, _ = diffusers_edit_loop(pipe, first.latent, make_noise((1, 16, 6, 8), seed=2), t5, clip, steps=2)
    assert (second.latent - want).abs().max().item() < ATOL


class NoAutoencoder:
    """A spy in place of the AE: an edit from latents must not encode or decode anything."""

    def __getattr__(self, name):
        raise AssertionError(f"the autoencoder was used ({name}) in a latent-only edit")


def diffusers_edit_loop(pipe, context, noise, t5, clip, steps, guidance=2.5, init=None, denoise=1.0):
    """diffusers' transformer and scheduler driven by hand for one context latent (ids written out here).
    With an init latent: diffusers' img2img convention (a schedule of steps/denoise steps entered at
    total - steps, the init noised there by `scale_noise`). Returns (start state, result, sigmas used)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    h, w = noise.shape[-2:]
    rr, cc = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    all_ids = torch.cat([torch.stack([torch.full_like(rr, i), rr, cc], -1).reshape(-1, 3) for i in (0, 1)]).float()
    sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    n, total = (h // 2) * (w // 2), round(steps / denoise)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / total, total), mu=0.5 + (1.15 - 0.5) / (4096 - 256) * (n - 256))
    begin = total - steps
    sched.set_begin_index(begin)
    timesteps = sched.timesteps[begin:]
    lat = tok.pack(noise)
    if init is not None:
        lat = sched.scale_noise(tok.pack(init), timesteps[:1], lat)
    start = tok.unpack(lat, h, w)
    for t in timesteps:
        with torch.no_grad():
            v = pipe.transformer(hidden_states=torch.cat([lat, tok.pack(context)], 1), encoder_hidden_states=t5,
                                 pooled_projections=clip, timestep=(t / 1000).expand(1), img_ids=all_ids,
                                 txt_ids=torch.zeros(t5.shape[1], 3), guidance=torch.tensor([guidance])).sample[:, :n]
        lat = sched.step(v, t, lat, return_dict=False)[0]
    return start, tok.unpack(lat, h, w), sched.sigmas[begin:]


@pytest.mark.parametrize("steps,denoise", [(3, 0.5), (4, 0.8)])
def test_img2img_matches_diffusers_scale_noise_and_partial_schedule(models, steps, denoise):
    """denoise < 1 against diffusers' img2img convention: a schedule for steps/denoise steps entered at
    begin_index = total - steps, the init latent noised by `scale_noise` at that time, then the scheduler's steps."""
    pipe, ours, _ = models
    g = torch.Generator().manual_seed(21)
    init, noise, ctx = (torch.randn(1, 16, 6, 8, generator=g) for _ in range(3))
    t5, clip = embeds(seed=22)
    starts = []
    res = edit(ours, None, latents=[ctx], prompt_embeds=t5, pooled_prompt_embeds=clip, steps=steps, noise=noise,
               init_latent=init, denoise=denoise, decode=False, callback=lambda i, n, x, x0: starts.append(x.clone()))
    start, want, sigmas = diffusers_edit_loop(pipe, ctx, noise, t5, clip, steps, init=init, denoise=denoise)
    assert (starts[0] - start).abs().max().item() < 1e-6
    assert torch.allclose(res.sigmas, sigmas, atol=1e-6)
    assert (res.latent - want).abs().max().item() < ATOL


# --- prompt -> edit with real-style text encoders (tiny T5 + CLIP built in the test) -----------------------------

@pytest.fixture(scope="module")
def flux_folder(models, tmp_path_factory):
    """A complete diffusers FLUX folder (transformer/, vae/, text_encoder(_2)/, tokenizer(_2)/) and the pipeline
    that runs it with its own tokenizers and text encoders."""
    from diffusers import FluxKontextPipeline
    from tiny_models import write_diffusers
    from tiny_text_encoders import write_flux_text_folder

    pipe, _, _ = models
    root = tmp_path_factory.mktemp("flux_full")
    write_diffusers(pipe.transformer, root)
    pipe.vae.save_pretrained(root / "vae", safe_serialization=True)
    _, t5, clip, ttok, ctok = write_flux_text_folder(root)
    full = FluxKontextPipeline(scheduler=pipe.scheduler, vae=pipe.vae, text_encoder=clip, tokenizer=ctok,
                               text_encoder_2=t5, tokenizer_2=ttok, transformer=pipe.transformer)
    full.set_progress_bar_config(disable=True)
    return root, full


def test_prompt_edit_matches_pipeline_end_to_end(models, flux_folder):
    """prompt -> our tokenizers + T5 + CLIP -> edit, vs FluxKontextPipeline(prompt=...) doing all of it itself."""
    from kontext_core.text_encoders import load_text_encoders

    _, ours, ae = models
    root, full = flux_folder
    prompt = "make the red car blue"
    img = make_image(64, 48, seed=5)
    noise = make_noise((1, 16, 6, 8), seed=9)
    t5, pooled = load_text_encoders(root).encode(prompt)
    res = edit(ours, ae, images=[img], prompt_embeds=t5, pooled_prompt_embeds=pooled, resize="keep", steps=STEPS,
               guidance=2.5, noise=noise)
    with torch.no_grad():
        pix = full(image=img, prompt=prompt, height=48, width=64, max_area=64 * 48, _auto_resize=False,
                   num_inference_steps=STEPS, guidance_scale=2.5, latents=tok.pack(noise), output_type="pt").images
    d = ((res.pixels.clamp(-1, 1) + 1) / 2 - pix).abs().max().item()
    print(f"\n[prompt edit] image max|Δ| = {d:.2e}")
    assert d < ATOL


def test_cli_edit_prompt_with_text_encoder_files_matches_pipeline(flux_folder, tmp_path):
    """`edit IMAGE --prompt ... --transformer --ae --t5` (one diffusers folder for all) writes the pipeline's picture
    (up to the PNG's 8-bit rounding)."""
    from kontext_core.cli import main as cli

    root, full = flux_folder
    img = make_image(64, 48, seed=6)
    img.save(tmp_path / "in.png")
    prompt = "give the character a green hat"
    out = tmp_path / "out.png"
    assert cli(["edit", str(tmp_path / "in.png"), "--prompt", prompt, "--transformer", str(root), "--ae",
                str(root / "vae"), "--t5", str(root), "--resize", "keep", "--steps", "3", "--seed", "4",
                "--guidance", "3.0", "--out", str(out)]) == 0
    noise = make_noise((1, 16, 6, 8), seed=4)
    with torch.no_grad():
        pix = full(image=img, prompt=prompt, height=48, width=64, max_area=64 * 48, _auto_resize=False,
                   num_inference_steps=3, guidance_scale=3.0, latents=tok.pack(noise), output_type="np").images[0]
    ref = np.round(pix * 255).clip(0, 255).astype(int)
    got = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert got.shape == ref.shape and np.abs(got - ref).max() <= 1
