"""The one-machine batch runner: up-front validation, batch results equal single edits, sidecars, resume,
atomic writes, failed items reported while the rest is done."""

import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image

from batch_jobs import STEPS, make_job, output_files, read_png, write_csv, write_pictures
from kontext_core import batch, tiny
from kontext_core.batch import Defaults, JobError, ModelSpec, load_job, run_local
from kontext_core.cli import main as cli

TINY = ModelSpec()


# ------------------------------------------------------------------------------------------ validation

def test_every_bad_row_is_reported_before_any_work(tmp_path, capsys):
    rows = write_pictures(tmp_path / "pics", 3)
    (tmp_path / "pics" / "garbage.png").write_bytes(b"this is not a picture")
    rows += [
        {"image": "pics/missing.png", "instruction": "turn the circle red"},
        {"image": "pics/garbage.png", "instruction": "turn the circle red"},
        {"image": "pics/p0.png", "instruction": "turn the circle red", "seed": "abc", "output": "other.png"},
        {"image": "pics/p1.png", "instruction": "turn the circle red", "size": "8x8", "output": "small.png"},
        {"image": "pics/p2.png", "instruction": "x", "steps": "0", "output": "nosteps.png"},
        {"image": "pics/p1.png", "instruction": "a second edit of p1 without its own output name"},
        {"image": "pics/p2.png", "instruction": "x", "output": "../escape.png"},
    ]
    manifest = write_csv(tmp_path / "jobs.csv", rows, ["image", "instruction", "seed", "size", "steps", "output",
                                                       "colour"])
    out = tmp_path / "out"
    assert cli(["batch", manifest, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "8 problems found, nothing was edited" in err
    for expected in ("unknown column 'colour'", "line 5: image", "missing.png: no such file",
                     "line 6: ", "garbage.png: cannot read the image", "line 7: seed must be an integer, got 'abc'",
                     "line 8: size 8x8 is too small", "line 9: steps must be >= 1",
                     "line 10: writes p1.png, as jobs.csv line 3 does", "line 11: output '../escape.png'"):
        assert expected in err, expected
    assert not out.exists()  # nothing started


def test_jsonl_rows_and_folder_jobs_are_checked_too(tmp_path):
    write_pictures(tmp_path / "pics", 1)
    (tmp_path / "jobs.jsonl").write_text('{"image": "pics/p0.png", "instruction": "turn the circle red"}\n'
                                         '{"image": "pics/p0.png", "prompt": "x"}\n'
                                         'not json\n'
                                         '["a list"]\n'
                                         '{"image": "pics/p0.png", "instruction": "x", "size": [64], "output": "b.png"}\n')
    with pytest.raises(JobError) as e:
        load_job(str(tmp_path / "jobs.jsonl"), TINY)
    assert [p.split(":")[0] for p in e.value.problems] == ["jobs.jsonl line 2", "jobs.jsonl line 3",
                                                           "jobs.jsonl line 4", "jobs.jsonl line 5"]
    assert "unknown column 'prompt'" in e.value.problems[0]
    with pytest.raises(JobError, match="Kontext-Tiny needs a text instruction"):
        load_job(str(tmp_path / "pics"), TINY)  # a folder without --prompt
    with pytest.raises(JobError, match="real model takes the prompt as an embeddings file"):
        load_job(str(tmp_path / "pics"), ModelSpec("t.safetensors", "ae.safetensors"), Defaults("make it red"))
    job = load_job(str(tmp_path / "pics"), TINY, Defaults("make it red", seed=7))
    assert [(it.image, it.instruction, it.seed, it.size, it.output) for it in job.items] == \
        [("p0.png", "make it red", 7, (64, 64), "p0.png")]


def test_chunks_hold_one_size_and_step_count_each(tmp_path):
    rows = write_pictures(tmp_path / "pics", 5)
    sizes = ["64x64", "48x48", "64x64", "48x48", "64x64"]
    for r, s in zip(rows, sizes):
        r["size"] = s
    rows[4]["steps"] = "3"
    job = load_job(write_csv(tmp_path / "jobs.csv", rows), TINY, Defaults(steps=STEPS))
    plan = batch.Plan({}, 2.5, {}, todo=sorted(job.items, key=lambda it: it.group))
    chunks = plan.chunks(batch_size=4)
    assert sorted([(c[0].size, c[0].steps, len(c)) for c in chunks]) == \
        [((48, 48), 2, 2), ((64, 64), 2, 2), ((64, 64), 3, 1)]
    assert all(len({it.group for it in c}) == 1 for c in chunks)


# ------------------------------------------------------------------------------------------ the runner

def test_batched_outputs_equal_single_edits_and_sidecars_say_what_made_them(tmp_path):
    manifest, rows = make_job(tmp_path, 3)
    out = tmp_path / "out"
    assert cli(["batch", manifest, "--out", str(out), "--batch-size", "3"]) == 0
    for r in rows:
        stem = os.path.splitext(os.path.basename(r["image"]))[0]
        single = tmp_path / f"single_{stem}.png"
        assert cli(["edit", str(tmp_path / r["image"]), "--prompt", r["instruction"], "--seed", r["seed"],
                    "--steps", str(STEPS), "--out", str(single)]) == 0
        diff = np.abs(read_png(out / f"{stem}.png").astype(int) - read_png(single).astype(int))
        assert diff.max() <= 2, (stem, diff.max())  # the same edit; batching only reorders float sums
        side = json.loads((out / f"{stem}.json").read_text())
        req = side["request"]
        assert (req["image"], req["instruction"], req["seed"], req["steps"], req["size"]) == \
            (r["image"], r["instruction"], int(r["seed"]), STEPS, [64, 64])
        path = tiny.weight_paths()["transformer"]
        assert req["model"]["transformer"] == {"file": path.name,
                                               "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    report = json.loads((out / batch.REPORT_FILE).read_text())
    assert sorted(report["done"]) == ["p0.png", "p1.png", "p2.png"] and report["failed"] == {}


def test_rerun_skips_finished_items_and_redoes_partial_or_changed_ones(tmp_path):
    manifest, rows = make_job(tmp_path, 4)
    out = str(tmp_path / "out")
    written = []

    def interrupt_after_two(item):
        written.append(item.output)
        if len(written) == 2:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the job

    job = load_job(manifest, TINY)
    first = run_local(job, out, TINY, batch_size=1, progress=False, on_written=interrupt_after_two)
    assert first.interrupted and first.done == written == ["p0.png", "p1.png"]
    assert output_files(out) == [batch.REPORT_FILE, "p0.json", "p0.png", "p1.json", "p1.png"]
    kept = read_png(os.path.join(out, "p0.png"))
    stamp = os.stat(os.path.join(out, "p0.png")).st_mtime_ns

    os.unlink(os.path.join(out, "p1.json"))  # p1: a PNG without its sidecar (killed between the two writes)
    open(os.path.join(out, ".p2.png.tmp-x1y2"), "wb").write(b"half a png")  # a killed write's leftover
    second = run_local(job, out, TINY, batch_size=2, progress=False)
    assert not second.interrupted and second.skipped == 1 and sorted(second.done) == ["p1.png", "p2.png", "p3.png"]
    assert output_files(out) == [batch.REPORT_FILE] + [f"p{i}.{e}" for i in range(4) for e in ("json", "png")]
    assert os.stat(os.path.join(out, "p0.png")).st_mtime_ns == stamp and np.array_equal(
        read_png(os.path.join(out, "p0.png")), kept)

    rows[3]["seed"] = "99"  # a changed request is not finished
    third = run_local(load_job(write_csv(manifest, rows), TINY), out, TINY, progress=False)
    assert third.skipped == 3 and third.done == ["p3.png"]
    assert json.loads(open(os.path.join(out, "p3.json")).read())["request"]["seed"] == 99


def test_a_rerun_hashes_only_model_files_that_changed(tmp_path, monkeypatch):
    manifest, _ = make_job(tmp_path, 1)
    out = tmp_path / "out"
    run_local(load_job(manifest, TINY), str(out), TINY, progress=False)
    hashed = []
    real_digest = batch.file_digest
    monkeypatch.setattr(batch, "file_digest", lambda p: hashed.append(os.path.basename(p)) or real_digest(p))
    assert run_local(load_job(manifest, TINY), str(out), TINY, progress=False).skipped == 1
    assert hashed == []  # the report's hashes were reused: same size, same modification time
    report = json.loads((out / batch.REPORT_FILE).read_text())
    transformer = str(tiny.weight_paths()["transformer"])
    report["model_hashes"][transformer]["signature"][1] += 1  # as if the file had been replaced since
    (out / batch.REPORT_FILE).write_text(json.dumps(report))
    assert run_local(load_job(manifest, TINY), str(out), TINY, progress=False).skipped == 1  # same contents
    assert hashed == [os.path.basename(transformer)]


def test_a_corrupt_picture_fails_alone(tmp_path, capsys):
    manifest, rows = make_job(tmp_path, 3)
    png = (tmp_path / "pics" / "p1.png").read_bytes()
    (tmp_path / "pics" / "p1.png").write_bytes(png[: len(png) // 2])  # header intact, pixel data cut short
    out = tmp_path / "out"
    assert cli(["batch", manifest, "--out", str(out)]) == 1  # the header passes the up-front check
    captured = capsys.readouterr()
    assert "failed: p1.png: jobs.csv line 3:" in captured.err and "cannot read the image" in captured.err
    assert "2 edited, 0 already done, 1 failed of 3" in captured.out
    assert output_files(out) == [batch.REPORT_FILE, "p0.json", "p0.png", "p2.json", "p2.png"]
    assert "cannot read the image" in json.loads((out / batch.REPORT_FILE).read_text())["failed"]["p1.png"]


def test_folder_job_from_the_command_line(tmp_path, capsys):
    write_pictures(tmp_path / "pics", 2)
    (tmp_path / "pics" / "notes.txt").write_text("not a picture: ignored")
    out = tmp_path / "out"
    assert cli(["batch", str(tmp_path / "pics"), "--prompt", "turn the circle red", "--steps", str(STEPS),
                "--out", str(out)]) == 0
    assert "2 edited, 0 already done, 0 failed of 2" in capsys.readouterr().out
    assert cli(["batch", str(tmp_path / "pics"), "--prompt", "turn the circle red", "--steps", str(STEPS),
                "--out", str(out)]) == 0
    assert "0 edited, 2 already done" in capsys.readouterr().out
    assert Image.open(out / "p0.png").size == (64, 64)


def test_atomic_write_leaves_no_half_file(tmp_path, monkeypatch):
    target = tmp_path / "a.png"
    target.write_bytes(b"old complete file")

    def crash(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(batch.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        batch.write_atomic(str(target), b"new data")
    assert target.read_bytes() == b"old complete file" and output_files(tmp_path) == ["a.png"]


def test_embedding_files_drive_a_transformer_and_autoencoder_given_as_files(tmp_path):
    """The real-model path (--transformer/--ae, one embeddings file per row), run with Kontext-Tiny's own files:
    it must give what the instruction path gives, since the embeddings are that instruction's."""
    from kontext_core.conditioning import save_embeddings

    manifest, rows = make_job(tmp_path, 2)
    models = tiny.load()
    for r in rows:
        name = os.path.basename(r["image"]).replace(".png", ".safetensors")
        save_embeddings(tmp_path / name, *models.encode_prompt([r["instruction"]]))
        r["embeds"], r["size"] = name, "64x64"
    real_rows = [{k: v for k, v in r.items() if k != "instruction"} for r in rows]
    paths = tiny.weight_paths()
    files = ModelSpec(str(paths["transformer"]), str(paths["ae"]))
    report = run_local(load_job(write_csv(tmp_path / "real.csv", real_rows), files), str(tmp_path / "real"), files,
                       progress=False)
    assert sorted(report.done) == ["p0.png", "p1.png"] and not report.failed
    run_local(load_job(manifest, TINY), str(tmp_path / "text"), TINY, progress=False)
    for name in ("p0", "p1"):
        diff = np.abs(read_png(tmp_path / "real" / f"{name}.png").astype(int) -
                      read_png(tmp_path / "text" / f"{name}.png").astype(int))
        assert diff.max() <= 2
        req = json.loads((tmp_path / "real" / f"{name}.json").read_text())["request"]
        assert req["embeds"] == f"{name}.safetensors" and req["instruction"] is None
        assert set(req["model"]) == {"transformer", "ae"}


def test_ray_mode_without_ray_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    import sys

    manifest, _ = make_job(tmp_path, 1)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError, as when it is not installed
    assert cli(["batch", manifest, "--out", str(tmp_path / "out"), "--ray"]) == 1
    err = capsys.readouterr().err
    assert "--ray needs Ray Data" in err and "[scale]" in err
