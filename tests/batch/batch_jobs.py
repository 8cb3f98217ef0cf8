"""Small Kontext-Tiny jobs for the batch tests: scenes of the tiny model's task, written as PNG files."""

import csv
import os

import numpy as np
from PIL import Image

from kontext_core.tiny.edits import make_triple
from kontext_core.tiny.scene import render

STEPS = 2  # the tests check plumbing (what is written, skipped, retried), not edit quality


def write_pictures(folder, n, first_seed=0):
    """n scene pictures p<seed>.png and their instructions."""
    os.makedirs(folder, exist_ok=True)
    rows = []
    for seed in range(first_seed, first_seed + n):
        t = make_triple(seed)
        Image.fromarray(render(t.context).image).save(os.path.join(folder, f"p{seed}.png"))
        rows.append({"image": f"pics/p{seed}.png", "instruction": t.instruction, "seed": str(seed)})
    return rows


def write_csv(path, rows, columns=None):
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    return str(path)


def make_job(folder, n=5):
    """A manifest of n edits (pictures in folder/pics): (its path, its rows)."""
    rows = write_pictures(os.path.join(folder, "pics"), n)
    for r in rows:
        r["steps"] = str(STEPS)
    return write_csv(os.path.join(folder, "jobs.csv"), rows), rows


def read_png(path):
    return np.asarray(Image.open(path).convert("RGB"))


def output_files(out_dir):
    """Every file under out_dir, relative, sorted."""
    return sorted(os.path.relpath(os.path.join(r, f), out_dir) for r, _, fs in os.walk(out_dir) for f in fs)
