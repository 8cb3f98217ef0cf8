"""The engine's per-call hooks (Flux.forward_tokens / forward_latent `hooks=ForwardHooks(...)`): a host's attention
function replaces SDPA in every block, and block / post-input hooks see and change exactly what they claim to.
References are independent computations: attention written out as softmax(q kᵀ/√d) v, and models with blocks
removed by hand."""

import copy
import math

import torch

from kontext_core.model.flux import ForwardHooks
from kontext_core.weights.loader import load_transformer
from tiny_models import TINY_AXES, diffusers_sd_to_bfl, tiny_diffusers_transformer


def _model():
    ref = tiny_diffusers_transformer(seed=3)
    return load_transformer(diffusers_sd_to_bfl(ref.state_dict()), params={"axes_dim": TINY_AXES})


def _inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, 16, 4, 6, generator=g), torch.tensor([0.7]), torch.randn(1, 5, 32, generator=g),
            torch.randn(1, 24, generator=g), torch.tensor([2.5]), [torch.randn(1, 16, 4, 6, generator=g)])


def _run(model, hooks=None):
    x, t, txt, y, g, refs = _inputs()
    with torch.no_grad():
        return model.forward_latent(x, t, txt, y, g, refs, hooks=hooks)


def test_attn_fn_hook_is_used_by_every_block_and_matches_written_out_attention():
    model = _model()
    calls = []

    def softmax_attention(q, k, v):
        calls.append(tuple(q.shape))
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        return (w @ v).transpose(1, 2).flatten(2)

    plain = _run(model)
    hooked = _run(model, ForwardHooks(attn_fn=softmax_attention))
    p = model.params
    assert len(calls) == p.depth + p.depth_single_blocks
    assert {c[1] for c in calls} == {p.num_heads} and {c[3] for c in calls} == {p.hidden_size // p.num_heads}
    torch.testing.assert_close(hooked, plain, rtol=1e-5, atol=1e-5)
    # and it really is the hook's result that flows on: a scaled attention changes the output
    scaled = _run(model, ForwardHooks(attn_fn=lambda q, k, v: 0.5 * softmax_attention(q, k, v)))
    assert (scaled - plain).abs().max() > 1e-3


def test_block_hooks_can_skip_blocks_like_a_model_without_them():
    model = _model()

    def skip_double_1(i, run, img, txt, vec, pe):
        return (img, txt) if i == 1 else run(img, txt, vec, pe)

    def skip_single_0(i, run, x, vec, pe, n_txt):
        return x if i == 0 else run(x, vec, pe)

    reference = copy.deepcopy(model)
    reference.double_blocks = torch.nn.ModuleList([reference.double_blocks[0]])
    reference.single_blocks = torch.nn.ModuleList(list(reference.single_blocks)[1:])
    got = _run(model, ForwardHooks(double_block=skip_double_1, single_block=skip_single_0))
    torch.testing.assert_close(got, _run(reference), rtol=0, atol=0)
    assert (got - _run(model)).abs().max() > 1e-3


def test_block_hooks_that_run_the_block_change_nothing_and_see_the_token_split():
    model = _model()
    seen = []

    def double(i, run, img, txt, vec, pe):
        seen.append(("double", i, img.shape[1], txt.shape[1]))
        return run(img, txt, vec, pe)

    def single(i, run, x, vec, pe, n_txt):
        seen.append(("single", i, x.shape[1], n_txt))
        return run(x, vec, pe)

    torch.testing.assert_close(_run(model, ForwardHooks(double_block=double, single_block=single)), _run(model),
                               rtol=0, atol=0)
    n_img, n_txt = 2 * (4 // 2) * (6 // 2), 5  # target + one reference of 2x3 tokens each; 5 text tokens
    assert seen == [("double", 0, n_img, n_txt), ("double", 1, n_img, n_txt),
                    ("single", 0, n_img + n_txt, n_txt), ("single", 1, n_img + n_txt, n_txt)]


def test_block_run_takes_an_attention_for_that_block_only():
    model = _model()
    calls = []

    def counting(q, k, v):
        calls.append(1)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)

    def double(i, run, img, txt, vec, pe):
        return run(img, txt, vec, pe, attn_fn=counting) if i == 0 else run(img, txt, vec, pe)

    torch.testing.assert_close(_run(model, ForwardHooks(double_block=double)), _run(model), rtol=1e-6, atol=1e-6)
    assert len(calls) == 1


def test_post_input_hook_sees_projected_tokens_and_its_changes_apply():
    model = _model()
    shapes = []

    def drop_reference(img, txt, img_ids, txt_ids):
        shapes.append((tuple(img.shape), tuple(txt.shape), tuple(img_ids.shape), tuple(txt_ids.shape)))
        n = img.shape[1] // 2  # the target's tokens come first; the reference's follow
        return img[:, :n], txt, img_ids[:, :n], txt_ids

    x, t, txt, y, g, refs = _inputs()
    with torch.no_grad():
        got = model.forward_latent(x, t, txt, y, g, refs, hooks=ForwardHooks(post_input=drop_reference))
        want = model.forward_latent(x, t, txt, y, g, [])
    h = model.params.hidden_size
    assert shapes == [((1, 12, h), (1, 5, h), (1, 12, 3), (1, 5, 3))]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # other token counts: other summation order
