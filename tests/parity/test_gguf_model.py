"""A tiny FLUX converted to each GGUF type runs through the engine; outputs stay close to the fp32 model.

Dims are chosen so K-quants really apply (rows of 256). Bounds are relative RMS errors ‖Δ‖/‖out‖ of one
forward, set ~1.5x above what was measured; they shrink with the type's bits as expected. Q8_0 is also
checked against a model whose weights were dequantized with gguf-py (the independent decoder): 1e-5.
"""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from kontext_core.model.flux import Flux, FluxParams
from kontext_core.quant.ggml_tensor import GGMLTensor
from kontext_core.weights.gguf_convert import convert_to_gguf
from kontext_core.weights.loader import load_transformer, read_transformer

P = FluxParams(vec_in_dim=32, context_in_dim=64, hidden_size=256, num_heads=4, depth=1, depth_single_blocks=1,
               axes_dim=(8, 28, 28))
# measured: Q8_0 .0085, Q6_K .030, Q5_K_M .067, Q4_K_M .099, Q5_0 .085, Q4_0 .166, Q3_K_M .27, Q2_K .40,
# F16 .0005, BF16 .0042 (a random network amplifies weight error ~1.5x; real weights are smoother)
BOUNDS = {"Q8_0": 0.013, "Q6_K": 0.045, "Q5_K_M": 0.10, "Q4_K_M": 0.15, "Q5_0": 0.13, "Q4_0": 0.25,
          "Q3_K_M": 0.40, "Q2_K": 0.60, "F16": 0.001, "BF16": 0.007}


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    torch.manual_seed(0)
    m = Flux(P)
    sd = {k: (torch.randn_like(v) * (1.0 / v.shape[-1] ** 0.5) if v.ndim > 1 else 1 + 0.1 * torch.randn_like(v))
          for k, v in m.state_dict().items()}
    path = tmp_path_factory.mktemp("gguf") / "tiny.safetensors"
    save_file(sd, str(path))
    return path


def run(model):
    g = torch.Generator().manual_seed(1)
    x, ref = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 16, 8, 8, generator=g)
    with torch.no_grad():
        return model.forward_latent(x, torch.tensor([0.6]), torch.randn(1, 6, 64, generator=g),
                                    torch.randn(1, 32, generator=g), torch.tensor([2.5]), [ref])


@pytest.mark.parametrize("target", list(BOUNDS))
def test_converted_model_close_to_fp32(src, tmp_path, target):
    out = tmp_path / f"tiny-{target}.gguf"
    convert_to_gguf(src, out, target)
    ck = read_transformer(out)
    assert ck.container == "gguf" and ck.layout == "bfl"
    model = load_transformer(out)
    w = model.double_blocks[0].img_mlp[0].weight
    if target not in ("F16", "BF16"):
        assert isinstance(w, GGMLTensor), "block weights must stay quantized in memory"
    ref = run(load_transformer(src))
    rel = ((run(model) - ref).norm() / ref.norm()).item()
    print(f"\n[{target}] ‖Δ‖/‖out‖ = {rel:.4f} (bound {BOUNDS[target]})")
    assert rel < BOUNDS[target]


def test_q8_0_engine_equals_gguf_py_dequantized_weights(src, tmp_path):
    import gguf

    out = tmp_path / "q8.gguf"
    convert_to_gguf(src, out, "Q8_0")
    reader = gguf.GGUFReader(str(out))
    dense = {}
    for t in reader.tensors:
        arr = gguf.quants.dequantize(np.array(t.data), t.tensor_type)
        dense[t.name] = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).reshape(
            tuple(int(d) for d in reversed(t.shape)))
    d = (run(load_transformer(out)) - run(load_transformer(dense))).abs().max().item()
    print(f"\n[Q8_0 vs gguf-py dequantized] max|Δ| = {d:.2e}")
    assert d < 1e-5
