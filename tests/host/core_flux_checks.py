"""Direct checks run by comfy_driver.py: our MODEL against core's Flux on the same tiny weights, under the host
mechanisms users combine a Flux model with (attention backend, block patches, ControlNet, EasyCache).

Core's Flux is the independent reference: it is ComfyUI's own `comfy.model_base.Flux` built with the tiny
model's dimensions (core's file detection assumes the full-size FLUX dimensions, so the model is built from the
same classes it would use, with the sizes given) and loaded with the same BFL file as ours. Every check returns
plain numbers and lists; the assertions are in test_host_core_flux.py. Nothing here imports torch at import
time (ComfyUI's main module must come first).
"""

from __future__ import annotations

STEPS = 6


def _core_flux(path: str, params):
    """core's Flux MODEL (a ModelPatcher) on the BFL file at `path`, fp32, with our model's dimensions."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils
    import torch

    config = comfy.supported_models.Flux(_core_unet_config(params))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, device=torch.device("cpu"))
    sd = comfy.utils.load_torch_file(path, safe_load=True)
    missing, unexpected = model.diffusion_model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"core Flux does not fit {path}: missing {missing[:4]}, unexpected {unexpected[:4]}")
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def _core_unet_config(params) -> dict:
    p = params
    return dict(image_model="flux", in_channels=p.in_channels // 4, out_channels=p.out_channels // 4, patch_size=2,
                vec_in_dim=p.vec_in_dim, context_in_dim=p.context_in_dim, hidden_size=p.hidden_size,
                mlp_ratio=p.mlp_ratio, num_heads=p.num_heads, depth=p.depth,
                depth_single_blocks=p.depth_single_blocks, axes_dim=list(p.axes_dim), theta=p.theta,
                qkv_bias=p.qkv_bias, guidance_embed=p.guidance_embed)


def _both(pack_module, job):
    import folder_paths

    cm = pack_module(".nodes.comfy_model")
    path = folder_paths.get_full_path_or_raise("diffusion_models", job["model"])
    ours = cm.load_transformer_model(path)
    return ours, _core_flux(path, ours.model.diffusion_model.params)


def _inputs(params, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(1, 16, 4, 6, generator=g), t=torch.tensor([0.7]),
                ctx=torch.randn(1, 8, params.context_in_dim, generator=g),
                y=torch.randn(1, params.vec_in_dim, generator=g), g=torch.tensor([2.5]),
                ref=torch.randn(1, 16, 4, 6, generator=g))


def _forward(patcher, i, transformer_options=None, **kwargs):
    import torch

    dit = patcher.model.diffusion_model
    with torch.no_grad():
        return dit(i["x"], i["t"], i["ctx"], y=i["y"], guidance=i["g"], ref_latents=[i["ref"]],
                   transformer_options=transformer_options if transformer_options is not None else {}, **kwargs)


def _diff(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


# ------------------------------------------------------------------------------ attention + block patches

def _block_patches(calls: list):
    """patches_replace["dit"] entries of the kinds caching and adapter packs install: one wraps the original
    block and changes its result, one runs it on changed inputs with its own transformer_options, one skips it."""

    def double_0(args, extra):
        calls.append(("double_0", tuple(args["img"].shape), tuple(args["txt"].shape), sorted(args)))
        out = extra["original_block"](args)
        return {"img": out["img"] * 1.1 + 0.05, "txt": out["txt"] - 0.02}

    def double_1(args, extra):
        calls.append(("double_1", tuple(args["img"].shape)))
        return extra["original_block"]({**args, "img": args["img"] * 0.8,
                                        "transformer_options": {**args["transformer_options"], "marked": True}})

    def single_1(args, extra):
        calls.append(("single_1", tuple(args["img"].shape), sorted(args)))
        return {"img": args["img"] * 0.9}

    return {("double_block", 0): double_0, ("double_block", 1): double_1, ("single_block", 1): single_1}


def _post_input(calls: list):
    def patch(d):
        calls.append(("post_input", sorted(d), tuple(d["img"].shape), tuple(d["img_ids"].shape)))
        return {**d, "img": d["img"] * 1.05, "txt": d["txt"] + 0.01}
    return patch


def check_core_flux_patches(job: dict, pack_module) -> dict:
    """One forward of each model: plain, with block patches + a post_input patch, with an attention mask, and
    with a recording attention backend in place of ComfyUI's (patched where core's Flux looks it up)."""
    import comfy.ldm.flux.math
    import torch

    ours, core = _both(pack_module, job)
    i = _inputs(ours.model.diffusion_model.params)
    res: dict = {"success": True}
    plain = {name: _forward(m, i) for name, m in (("ours", ours), ("core", core))}
    res["plain_diff"] = _diff(plain["ours"], plain["core"])

    patched, calls = {}, {}
    for name, m in (("ours", ours), ("core", core)):
        log: list = []
        opts = {"patches_replace": {"dit": _block_patches(log)}, "patches": {"post_input": [_post_input(log)]}}
        patched[name] = _forward(m, i, opts)
        calls[name] = log
    res.update(patched_diff=_diff(patched["ours"], patched["core"]),
               patch_effect=_diff(patched["core"], plain["core"]), patch_calls=calls)

    # A mask over [text ‖ target ‖ reference] tokens as core's StyleModelApply produces: additive bias (B, L, L).
    n = i["ctx"].shape[1] + 2 * (4 // 2) * (6 // 2)
    mask = torch.zeros(1, n, n)
    mask[:, :, :3] = -1e4  # no token attends to the first three text tokens
    masked = {name: _forward(m, i, attention_mask=mask) for name, m in (("ours", ours), ("core", core))}
    res.update(mask_diff=_diff(masked["ours"], masked["core"]), mask_effect=_diff(masked["core"], plain["core"]))

    # The attention backend: what each model hands it, call by call.
    original = comfy.ldm.flux.math.optimized_attention
    records: dict = {}
    for name, m in (("ours", ours), ("core", core)):
        rec: list = []
        opts = {"patches_replace": {"dit": _block_patches([])}}

        def recorder(q, k, v, heads, *args, **kwargs):
            to = kwargs.get("transformer_options")
            rec.append({"shapes": [list(t.shape) for t in (q, k, v)], "dtype": str(q.dtype), "heads": heads,
                        "args": len(args), "kwargs": sorted(kwargs), "skip_reshape": kwargs.get("skip_reshape"),
                        "mask": None if kwargs.get("mask") is None else list(kwargs["mask"].shape),
                        "options": "forward's" if to is opts else sorted(to) if isinstance(to, dict) else repr(to)})
            out = original(q, k, v, heads, *args, **kwargs)
            rec[-1]["out_shape"] = list(out.shape)
            return out

        comfy.ldm.flux.math.optimized_attention = recorder
        try:
            _forward(m, i, opts, attention_mask=mask)
        finally:
            comfy.ldm.flux.math.optimized_attention = original
        records[name] = rec
    res["attention_calls"] = records

    # optimized_attention_override (a per-model attention replacement in transformer_options)
    overrides: dict = {}
    for name, m in (("ours", ours), ("core", core)):
        seen: list = []

        def override(func, *args, **kwargs):
            seen.append(func.__name__)
            return func(*args, **kwargs) * 0.5
        out = _forward(m, i, {"optimized_attention_override": override})
        overrides[name] = {"calls": seen, "out": out}
    res.update(override_calls={k: v["calls"] for k, v in overrides.items()},
               override_diff=_diff(overrides["ours"]["out"], overrides["core"]["out"]),
               override_effect=_diff(overrides["core"]["out"], plain["core"]))
    return res


# ------------------------------------------------------------------------------------ sampling checks

def _conditioning(params, seed=5):
    import torch

    g = torch.Generator().manual_seed(seed)
    ctx = torch.randn(1, 8, params.context_in_dim, generator=g)
    pooled = torch.randn(1, params.vec_in_dim, generator=g)
    ref = torch.randn(1, 16, 4, 6, generator=g)
    pos = [[ctx, {"pooled_output": pooled, "guidance": 2.5, "reference_latents": [ref]}]]
    neg = [[torch.zeros_like(ctx), {"pooled_output": torch.zeros_like(pooled)}]]
    return pos, neg


def _ksample(model, pos, neg, steps=STEPS, seed=3):
    import nodes
    import torch

    latent = {"samples": torch.zeros(1, 16, 4, 6)}
    return nodes.common_ksampler(model, seed, steps, 1.0, "euler", "simple", pos, neg, latent)[0]["samples"]


def _tiny_controlnet(params, seed=21):
    """core's Flux ControlNet (XLabs layout: pixel hint, double- and single-block residuals) with the tiny
    model's dimensions and seeded random weights, wrapped as core's loader wraps it."""
    import comfy.controlnet
    import comfy.ldm.flux.controlnet
    import comfy.model_management as mm
    import comfy.ops
    import torch

    net = comfy.ldm.flux.controlnet.ControlNetFlux(operations=comfy.ops.disable_weight_init,
                                                   device=torch.device("cpu"), dtype=torch.float32,
                                                   **_core_unet_config(params))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("scale"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 / p[0].numel() ** 0.5))
    net.eval()
    return comfy.controlnet.ControlNet(net, load_device=mm.get_torch_device(), manual_cast_dtype=None,
                                       extra_conds=["y", "guidance"])


def check_core_flux_controlnet(job: dict, pack_module) -> dict:
    """core KSampler on both models with a core ControlNet applied by core's ControlNetApplyAdvanced."""
    import comfy.controlnet
    import nodes
    import torch

    ours, core = _both(pack_module, job)
    params = ours.model.diffusion_model.params
    pos, neg = _conditioning(params)
    cnet = _tiny_controlnet(params)
    g = torch.Generator().manual_seed(8)
    hint = torch.rand(1, 32, 48, 3, generator=g)  # the latent is 4x6: an 8x larger image
    cpos, cneg = nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, cnet, hint, 0.9, 0.0, 1.0)
    out = {name: _ksample(m, cpos, cneg) for name, m in (("ours", ours), ("core", core))}
    plain = _ksample(core, pos, neg)
    residual_calls: dict = {}
    orig = comfy.controlnet.ControlNet.get_control  # ControlNetApplyAdvanced applies a copy of `cnet`
    for name, m in (("ours", ours), ("core", core)):  # the residuals each model is handed
        seen: list = []

        def counting(self, *a, _seen=seen, **k):
            c = orig(self, *a, **k)
            _seen.append({key: len(v) for key, v in c.items() if v is not None})
            return c
        comfy.controlnet.ControlNet.get_control = counting
        try:
            _ksample(m, cpos, cneg, steps=1)
        finally:
            comfy.controlnet.ControlNet.get_control = orig
        residual_calls[name] = seen
    return {"success": True, "diff": _diff(out["ours"], out["core"]), "effect": _diff(out["core"], plain),
            "control_outputs": residual_calls}


def check_core_flux_easycache(job: dict, pack_module) -> dict:
    """core's EasyCache node on both models, core KSampler: the same steps skipped, the same result."""
    from comfy_extras.nodes_easycache import EasyCacheNode

    ours, core = _both(pack_module, job)
    pos, neg = _conditioning(ours.model.diffusion_model.params)
    res: dict = {"success": True, "runs": {}}
    outs = {}
    for name, m in (("ours", ours), ("core", core)):
        cached = EasyCacheNode.execute(m, job["threshold"], 0.15, 0.95, False).result[0]
        dit = m.model.diffusion_model
        inner = "_forward_comfy" if hasattr(dit, "_forward_comfy") else "_forward"
        orig = getattr(dit, inner)
        evaluated: list = []

        def counting(*a, _orig=orig, _log=evaluated, **k):  # the model itself ran (not a cached step)
            to = k["transformer_options"] if "transformer_options" in k else a[7]
            _log.append(round(float(to["sigmas"][0]), 5))
            return _orig(*a, **k)
        setattr(dit, inner, counting)
        try:
            outs[name] = _ksample(cached, pos, neg, steps=job["steps"])
        finally:
            delattr(dit, inner)
        plain = _ksample(m, pos, neg, steps=job["steps"])
        res["runs"][name] = {"evaluated_sigmas": evaluated, "cache_effect": _diff(outs[name], plain)}
    res["diff"] = _diff(outs["ours"], outs["core"])
    return res


# ------------------------------------------------------------------------------------------------ speed

def check_core_flux_speed(job: dict, pack_module) -> dict:
    """Median wall time of core KSampler (job["steps"] steps) on our MODEL and on core's, interleaved, same run
    (benchmarks/bench_host_flux.py prints the ratio)."""
    import statistics
    import time

    import comfy.ldm.flux.math
    import comfy.model_management as mm
    import torch

    ours, core = _both(pack_module, job)
    params = ours.model.diffusion_model.params
    h, w = job["latent"]
    g = torch.Generator().manual_seed(5)
    ctx = torch.randn(1, job["text_tokens"], params.context_in_dim, generator=g)
    pooled = torch.randn(1, params.vec_in_dim, generator=g)
    ref = torch.randn(1, 16, h, w, generator=g)
    pos = [[ctx, {"pooled_output": pooled, "guidance": 2.5, "reference_latents": [ref]}]]
    neg = [[torch.zeros_like(ctx), {"pooled_output": torch.zeros_like(pooled)}]]

    def sample(m):
        import nodes
        latent = {"samples": torch.zeros(1, 16, h, w)}
        return nodes.common_ksampler(m, 1, job["steps"], 1.0, "euler", "simple", pos, neg, latent)[0]["samples"]

    outs = {"ours": sample(ours), "core": sample(core)}  # warm-up, and the results compared
    times: dict = {"ours": [], "core": []}
    for _ in range(job["repeats"]):
        for name, m in (("core", core), ("ours", ours)):
            t0 = time.perf_counter()
            sample(m)
            times[name].append(time.perf_counter() - t0)
    return {"success": True, "median_s": {k: statistics.median(v) for k, v in times.items()}, "times_s": times,
            "diff": _diff(outs["ours"], outs["core"]), "threads": torch.get_num_threads(),
            "attention": getattr(comfy.ldm.flux.math.optimized_attention, "__name__", "?"),
            "device": str(mm.get_torch_device()), "hidden": params.hidden_size,
            "blocks": [params.depth, params.depth_single_blocks]}


def checks(pack_module) -> dict:
    """name -> check(job) for comfy_driver.CHECKS."""
    return {name: (lambda job, f=f: f(job, pack_module)) for name, f in (
        ("core_flux_patches", check_core_flux_patches),
        ("core_flux_controlnet", check_core_flux_controlnet),
        ("core_flux_easycache", check_core_flux_easycache),
        ("core_flux_speed", check_core_flux_speed))}
