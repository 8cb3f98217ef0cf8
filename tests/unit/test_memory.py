"""The activation formula (`kontext_core.memory.activation_bytes`) against peaks measured while the blocks run.

The measurement counts every CPU tensor storage the forward creates (through a dispatch mode, so each op's
outputs are seen) and frees it when its last tensor dies; the peak of that live total, plus the block input, is
the activation peak. Attention runs through scaled_dot_product_attention's fused CPU kernel (no N^2 matrix).
"""

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from kontext_core.memory import activation_bytes
from kontext_core.model.attention import RopeEmbedder
from kontext_core.model.flux import FluxParams
from kontext_core.model.layers import DoubleStreamBlock, SingleStreamBlock

PARAMS = FluxParams(vec_in_dim=24, context_in_dim=32, hidden_size=256, num_heads=4, depth=1, depth_single_blocks=1,
                    axes_dim=(8, 28, 28))


class LiveTensorPeak(TorchDispatchMode):
    """Peak bytes of the tensor storages created inside the `with` block and alive at the same time."""

    def __init__(self):
        super().__init__()
        self.refs, self.sizes, self.now, self.peak = {}, {}, 0, 0

    def _release(self, key):
        self.refs[key] -= 1
        if not self.refs[key]:
            del self.refs[key]
            self.now -= self.sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key == 0:
                continue
            if key not in self.refs:
                self.refs[key], self.sizes[key] = 0, storage.nbytes()
                self.now += storage.nbytes()
                self.peak = max(self.peak, self.now)
            self.refs[key] += 1
            weakref.finalize(t, self._release, key)
        return out


def rope(n_tokens):
    ids = torch.zeros(1, n_tokens, 3)
    ids[..., 1], ids[..., 2] = torch.arange(n_tokens) // 32, torch.arange(n_tokens) % 32
    return RopeEmbedder(10_000, PARAMS.axes_dim)(ids)


def measured_single(n, dtype):
    block = SingleStreamBlock(PARAMS.hidden_size, PARAMS.num_heads, PARAMS.mlp_ratio, dtype=dtype)
    x, vec = torch.randn(1, n, PARAMS.hidden_size, dtype=dtype), torch.randn(1, PARAMS.hidden_size, dtype=dtype)
    pe = rope(n)
    with torch.no_grad(), LiveTensorPeak() as m:
        block(x, vec, pe)
    return m.peak + x.nbytes


def measured_double(n_img, n_txt, dtype):
    block = DoubleStreamBlock(PARAMS.hidden_size, PARAMS.num_heads, PARAMS.mlp_ratio, qkv_bias=True, dtype=dtype)
    img, txt = (torch.randn(1, k, PARAMS.hidden_size, dtype=dtype) for k in (n_img, n_txt))
    vec, pe = torch.randn(1, PARAMS.hidden_size, dtype=dtype), rope(n_img + n_txt)
    with torch.no_grad(), LiveTensorPeak() as m:
        block(img, txt, vec, pe)
    return m.peak + img.nbytes + txt.nbytes


def test_the_measurement_sees_a_known_allocation():
    with LiveTensorPeak() as m:
        a = torch.ones(1000, dtype=torch.float32)
        b = a * 2  # 4000 B more, alive together
        del a, b
        c = torch.ones(500, dtype=torch.float32)
    assert m.peak == 8000 and m.now == 2000 and c.numel() == 500


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n", [512, 1536])
def test_activation_formula_bounds_the_measured_block_peak(n, dtype):
    formula = activation_bytes(PARAMS, n, dtype)
    single = measured_single(n, dtype)
    double = measured_double(n - 256, 256, dtype)
    # An upper bound for both block kinds (the single block is the widest point) ...
    assert double <= single <= formula
    # ... that is not loose: measured 1.20 (bf16) / 1.10 (fp32) on CPU. The rotated fp32 q/k the formula counts
    # are freed before the peak (at linear2) on CPU; the margin covers CUDA kernels' layouts.
    assert formula <= 1.25 * single, (formula, single)
