"""Load time and peak RSS for a ~1 GB bf16 transformer checkpoint, vs its file size, in fresh processes.

Compares, in the same run:
  engine:    kontext_core.load_transformer (mmap, tensors assigned to a meta-built module, zero copy)
  reference: the common pattern of building the module (weights allocated) and copying a loaded state dict
             into it with load_state_dict
Each loader runs in its own subprocess; after loading it reads every weight once (a checksum), as a first
forward would, so mmap'd pages are counted. Peak RSS is ru_maxrss of that process minus the RSS it had
after imports (torch's own ~300 MB).

    python benchmarks/bench_load.py [--gb 1.0] [--keep FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {root!r})
import torch
from kontext_core.model.flux import Flux, FluxParams
from kontext_core.weights.loader import load_transformer

def rss_mb():  # current RSS
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * 4096 / 2**20

mode, path, params = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
base = rss_mb()
t0 = time.perf_counter()
if mode == 'engine':
    m = load_transformer(path)
else:
    from safetensors.torch import load_file
    m = Flux(FluxParams(**params), dtype=torch.bfloat16)  # allocated, then weights copied in
    m.load_state_dict(load_file(path))
t_load = time.perf_counter() - t0
for p in m.parameters():  # read every page once (a reduction allocates nothing weight-sized)
    (p.view(torch.int16) if p.element_size() == 2 else p).max()
t_read = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(dict(load_s=t_load, read_s=t_read, peak_mb=peak - base, base_mb=base)))
"""

PARAMS = dict(in_channels=64, out_channels=64, vec_in_dim=768, context_in_dim=4096, hidden_size=1536, mlp_ratio=4.0,
              num_heads=12, depth=8, depth_single_blocks=16, axes_dim=(16, 56, 56), qkv_bias=True, guidance_embed=True)


def make_checkpoint(path: str, gb: float) -> dict:
    sys.path.insert(0, ROOT)
    import torch
    from safetensors.torch import save_file

    from kontext_core.model.flux import Flux, FluxParams

    params = dict(PARAMS)
    h = params["hidden_size"]
    per_double, per_single = 2 * 18 * h * h * 2, 10 * h * h * 2 + 3 * h * h * 2  # bf16 bytes per block
    scale = gb * 2**30 / (params["depth"] * per_double + params["depth_single_blocks"] * per_single)
    params["depth"] = max(1, round(params["depth"] * scale))
    params["depth_single_blocks"] = max(1, round(params["depth_single_blocks"] * scale))
    with torch.device("meta"):
        m = Flux(FluxParams(**params))
    g = torch.Generator().manual_seed(0)
    sd = {k: (torch.randn(v.shape, generator=g) * 0.02).to(torch.bfloat16) for k, v in m.state_dict().items()}
    save_file(sd, path)
    return params


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--keep", help="write the checkpoint here instead of a temp file")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp()
    path = args.keep or os.path.join(tmp, "flux-1gb.safetensors")
    t0 = time.perf_counter()
    params = make_checkpoint(path, args.gb)
    size_mb = os.path.getsize(path) / 2**20
    print(f"checkpoint: {size_mb:.0f} MiB bf16 (hidden {params['hidden_size']}, {params['depth']} double + "
          f"{params['depth_single_blocks']} single blocks), written in {time.perf_counter() - t0:.1f} s")
    rows = {}
    for mode in ("reference", "engine"):
        # drop the page cache's advantage between modes as far as an unprivileged run can: read order is the same
        out = subprocess.run([sys.executable, "-c", CHILD.format(root=ROOT), mode, path, json.dumps(params)],
                             capture_output=True, text=True, check=True)
        rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    print("| loader | load (s) | load + read every weight (s) | peak RSS over baseline (MiB) | peak RSS / file size |")
    print("|---|---|---|---|---|")
    for mode, label in (("reference", "allocate + load_state_dict(load_file)"), ("engine", "kontext_core.load_transformer")):
        r = rows[mode]
        print(f"| {label} | {r['load_s']:.3f} | {r['read_s']:.3f} | {r['peak_mb']:.0f} | {r['peak_mb'] / size_mb:.2f}x |")
    print(f"engine/reference: load + read time {rows['engine']['read_s'] / rows['reference']['read_s']:.3f}x, "
          f"peak RSS {rows['engine']['peak_mb'] / rows['reference']['peak_mb']:.2f}x")
    if not args.keep:
        os.remove(path)


if __name__ == "__main__":
    main()
