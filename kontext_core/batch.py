"""Batch editing: many pictures, one model load, resumable.

A job is a folder of pictures with one instruction, or a CSV / JSONL manifest with one row per edit (columns in
MANIFEST_COLUMNS). `load_job` checks every row before any work starts and reports all bad rows at once.
`run_local` edits the job on this machine; `batch_ray.run_ray` runs the same job on a Ray cluster. Both share
the pieces below, so outputs, sidecars and the resume rule are the same:

- each output is written to a temporary name and renamed (a reader never sees half a PNG), then its sidecar
  `<output stem>.json` (instruction, seed, settings, model files and hashes) the same way;
- an item is finished when its PNG exists and its sidecar records the same request (same image, instruction,
  seed, steps, size, guidance, model hashes). A rerun skips finished items and redoes everything else, so an
  interrupted job loses nothing that was finished, and an edit whose settings changed is done again.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError, KontextError

MANIFEST_COLUMNS = ("image", "instruction", "embeds", "seed", "size", "steps", "output")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
REPORT_FILE = "batch-report.json"
TEMP_MARK = ".tmp-"  # temporary files are ".<name>.tmp-<random>"; leftovers of a killed run are removed
DEFAULT_BATCH_SIZE = 4


class JobError(InputError):
    """The job has bad rows; `problems` lists every one (file/line, what is wrong, what to do)."""

    def __init__(self, source: str, problems: list[str]):
        self.source, self.problems = source, problems
        n = len(problems)
        super().__init__(f"{source}: {n} problem{'s' * (n != 1)} found, nothing was edited:\n  " +
                         "\n  ".join(problems))


@dataclass(frozen=True)
class Item:
    """One edit of a job, checked: the image's header was read, its working size decided."""
    where: str  # for messages: "jobs.csv line 4" or the picture's path
    image: str  # as written in the job (requests name it so: a job folder that moves still resumes)
    path: str  # the image file
    instruction: str | None  # a text prompt (Kontext-Tiny's text encoder)
    embeds: str | None  # a prompt-embeddings file as written (real models)
    embeds_path: str | None
    seed: int
    steps: int
    size: tuple[int, int]  # working = output size (width, height)
    output: str  # PNG path relative to the output folder
    text_shape: tuple[int, ...] | None = None  # the embeddings' shape: only equal shapes share a batch

    @property
    def sidecar(self) -> str:
        return str(Path(self.output).with_suffix(".json"))

    @property
    def group(self) -> tuple:
        """Items with the same group key are edited together as one batch."""
        return self.size, self.steps, self.text_shape or ()


@dataclass
class Job:
    source: str
    items: list[Item]


# --------------------------------------------------------------------------------------------------- model

@dataclass(frozen=True)
class ModelSpec:
    """Which model edits the job: the bundled Kontext-Tiny (no files given) or a transformer + autoencoder whose
    prompts come as embedding files. Picklable, so Ray workers load the same model from it."""
    transformer: str | None = None
    ae: str | None = None
    device: str = "auto"

    @property
    def is_tiny(self) -> bool:
        return self.transformer is None

    def check(self) -> None:
        if bool(self.transformer) != bool(self.ae):
            raise InputError("editing with your own model needs both --transformer and --ae (with an 'embeds' "
                             "file per row); give neither for the bundled Kontext-Tiny")
        for p in (self.transformer, self.ae):
            if p and not os.path.exists(p):
                raise InputError(f"{p}: no such file")

    def files(self) -> dict[str, str]:
        if self.is_tiny:
            from .tiny import weight_paths

            return {role: str(p) for role, p in weight_paths().items()}
        return {"transformer": self.transformer, "ae": self.ae}

    def describe(self, known: dict | None = None) -> tuple[dict[str, dict[str, str]], dict]:
        """(role -> {file name, sha256}: what a sidecar records and the resume rule compares, the hashes with the
        files' signatures). `known` (a previous run's hashes) spares re-reading a file that has not changed:
        hashing a 24 GB transformer means reading all of it."""
        known, hashes, described = known or {}, {}, {}
        for role, p in self.files().items():
            key, sig = os.path.abspath(p), stat_signature(p)
            old = known.get(key) or {}
            digest = old["sha256"] if old.get("signature") == sig and old.get("sha256") else file_digest(p)
            hashes[key] = {"signature": sig, "sha256": digest}
            described[role] = {"file": os.path.basename(os.path.normpath(p)), "sha256": digest}
        return described, hashes

    def default_size(self, width: int, height: int) -> tuple[int, int]:
        """The working size of a picture of this size: Kontext's nearest bucket, or Kontext-Tiny's only size."""
        from .images import target_size

        if self.is_tiny:
            from .tiny import IMAGE_SIZE

            return IMAGE_SIZE, IMAGE_SIZE
        return target_size(width, height, "stretch")

    def resolved_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def load(self) -> "Editor":
        device = self.resolved_device()
        if self.is_tiny:
            from . import tiny

            m = tiny.load(device=device)
            return Editor(m.transformer, m.ae, m.text_encoder)
        from .weights.ae_layout import load_autoencoder
        from .weights.loader import load_transformer

        return Editor(load_transformer(self.transformer, device=device), load_autoencoder(self.ae, device=device))


def stat_signature(path: str) -> list[int]:
    """[bytes, newest modification time (ns), files] of a file or folder: equal signatures, same contents
    (as far as a rerun needs to trust it)."""
    files = [Path(path)] if os.path.isfile(path) else [p for p in Path(path).rglob("*") if p.is_file()]
    stats = [f.stat() for f in files]
    return [sum(st.st_size for st in stats), max((st.st_mtime_ns for st in stats), default=0), len(stats)]


def file_digest(path: str) -> str:
    """sha256 of a file, or of a folder's files (diffusers layout) in name order."""
    h = hashlib.sha256()
    files = [Path(path)] if os.path.isfile(path) else sorted(p for p in Path(path).rglob("*") if p.is_file())
    for f in files:
        if len(files) > 1:
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


class Editor:
    """A loaded model that edits a chunk of items of one group (`Item.group`) as one batch."""

    def __init__(self, transformer, ae, text_encoder=None):
        self.transformer, self.ae, self.text_encoder = transformer, ae, text_encoder

    def _text(self, items: list[Item]):
        import torch

        if self.text_encoder is not None:
            with torch.no_grad():
                return self.text_encoder([it.instruction for it in items])
        from .conditioning import load_embeddings

        loaded = [load_embeddings(it.embeds_path) for it in items]
        return torch.cat([e for e, _, _ in loaded]), torch.cat([p for _, p, _ in loaded])

    def edit(self, items: list[Item], pictures: list, guidance: float) -> list[np.ndarray]:
        """Edited pictures (H, W, 3) uint8, one per item. Every item has the noise of its own seed, so a result
        does not depend on what else is in the batch."""
        import torch

        from .images import tensor_to_uint8
        from .pipeline import edit, encode_images, make_noise

        if len({it.group for it in items}) != 1:
            raise ValueError("a batch must share one group (size, steps, text shape)")  # a bug in the grouping
        ctx = torch.cat(encode_images(self.ae, pictures, "stretch", items[0].size))
        embeds, pooled = self._text(items)
        noise = torch.cat([make_noise((1, *ctx.shape[1:]), it.seed) for it in items])
        result = edit(self.transformer, self.ae, latents=[ctx], prompt_embeds=embeds, pooled_prompt_embeds=pooled,
                      noise=noise, steps=items[0].steps, guidance=guidance)
        return list(tensor_to_uint8(result.pixels))


# ------------------------------------------------------------------------------------------------ the job

@dataclass
class Defaults:
    """What a folder job uses for every picture, and a manifest for the cells it leaves empty."""
    instruction: str | None = None
    embeds: str | None = None
    seed: int = 0
    steps: int | None = None  # None: Kontext-Tiny's default step count


def load_job(source: str, model: ModelSpec, defaults: Defaults | None = None) -> Job:
    """A folder of pictures, or a .csv / .jsonl manifest, checked row by row. Raises JobError listing every bad
    row (missing or unreadable file, unknown column, bad seed/size/steps, two rows writing one output)."""
    defaults = defaults or Defaults()
    if os.path.isdir(source):
        rows = _folder_rows(source)
        base = source
    elif source.lower().endswith((".csv", ".jsonl")):
        try:
            rows = _csv_rows(source) if source.lower().endswith(".csv") else _jsonl_rows(source)
        except OSError as e:
            raise InputError(f"{source}: cannot read the manifest ({e})") from None
        except UnicodeDecodeError:
            raise InputError(f"{source}: the manifest is not UTF-8 text; save it as UTF-8 CSV / JSONL") from None
        base = os.path.dirname(source)
    elif os.path.exists(source):
        raise InputError(f"{source}: a job is a folder of pictures, a .csv or a .jsonl manifest; got another "
                         "kind of file")
    else:
        raise InputError(f"{source}: no such folder or manifest")
    problems: list[str] = []
    items: list[Item] = []
    writers: dict[str, str] = {}
    for where, row in rows:
        if isinstance(row, str):  # a problem found while reading (unknown column, bad JSON line)
            problems.append(f"{where}: {row}")
            continue
        try:
            item = _check_row(where, row, base, model, defaults)
        except KontextError as e:
            problems.append(f"{where}: {e}" if not str(e).startswith(where) else str(e))
            continue
        key = os.path.normcase(os.path.normpath(item.output))
        if key in writers:
            problems.append(f"{where}: writes {item.output}, as {writers[key]} does; give one of them another "
                            "'output' name (manifest column)")
            continue
        writers[key] = where
        items.append(item)
    if not problems and not items:
        problems.append("the job holds no pictures" + (f" (looked for {', '.join(IMAGE_SUFFIXES)})"
                                                        if os.path.isdir(source) else ""))
    if problems:
        raise JobError(source, problems)
    return Job(source, items)


def _folder_rows(folder: str):
    for name in sorted(os.listdir(folder)):
        if not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES) and os.path.isfile(os.path.join(folder, name)):
            yield os.path.join(folder, name), {"image": name}


def _unknown(columns) -> str | None:
    unknown = [c for c in columns if c not in MANIFEST_COLUMNS]
    if unknown:
        return (f"unknown column{'s' * (len(unknown) > 1)} {', '.join(repr(c) for c in unknown)}; the columns "
                f"are {', '.join(MANIFEST_COLUMNS)}")
    return None


def _csv_rows(path: str):
    name = os.path.basename(path)
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [(c or "").strip().lower() for c in (reader.fieldnames or [])]
        reader.fieldnames = header
        bad = _unknown(header)
        if bad:
            yield f"{name} header", bad
        if "image" not in header:
            yield f"{name} header", "needs an 'image' column (the picture to edit, relative to the manifest)"
            return
        for row in reader:
            cells = {k: (v or "").strip() for k, v in row.items() if k in MANIFEST_COLUMNS and k is not None}
            if not any(cells.values()):
                continue  # blank line
            if None in row:
                yield f"{name} line {reader.line_num}", f"has {len(header) + len(row[None])} cells for " \
                                                        f"{len(header)} columns"
                continue
            yield f"{name} line {reader.line_num}", {k: v for k, v in cells.items() if v != ""}


def _jsonl_rows(path: str):
    name = os.path.basename(path)
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            where = f"{name} line {n}"
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield where, f"not valid JSON ({e.msg} at column {e.colno})"
                continue
            if not isinstance(row, dict):
                yield where, f"expected a JSON object such as {{\"image\": \"a.png\", \"instruction\": \"...\"}}, " \
                             f"got {type(row).__name__}"
                continue
            bad = _unknown(row)
            if bad:
                yield where, bad
                continue
            yield where, {k: v for k, v in row.items() if v is not None and v != ""}


def _check_row(where: str, row: dict, base: str, model: ModelSpec, d: Defaults) -> Item:
    from .images import open_image, snap16
    from .validation import check_seed, check_size, check_steps, parse_size

    image = row.get("image")
    if not isinstance(image, str) or not image:
        raise InputError("no 'image' given (the picture to edit, relative to the manifest)")
    path = image if os.path.isabs(image) else os.path.join(base, image)
    if not os.path.isfile(path):
        raise InputError(f"image {path}: no such file")
    instruction = row.get("instruction", d.instruction if "embeds" not in row else None)
    embeds = row.get("embeds", d.embeds if "instruction" not in row else None)
    if instruction is not None and embeds is not None:
        raise InputError("has both an instruction and an embeds file; give one")
    if model.is_tiny:
        if instruction is None:
            raise InputError("no instruction: Kontext-Tiny needs a text instruction ('instruction' column or "
                             "--prompt)" + ("; embedding files need --transformer and --ae" if embeds else ""))
        if not isinstance(instruction, str):
            raise InputError(f"instruction must be text, got {instruction!r}")
    elif embeds is None:
        raise InputError("no embeds file: a real model takes the prompt as an embeddings file ('embeds' column "
                         "or --embeds, saved by the 'Save Kontext Conditioning' node); text instructions need "
                         "a text encoder, which the engine has only for Kontext-Tiny")
    embeds_path, text_shape = None, None
    if embeds is not None:
        embeds_path, text_shape = _check_embeds(embeds, base)
    seed = check_seed(_as_int(row.get("seed", d.seed), "seed"))
    steps = row.get("steps", d.steps)
    if steps is None:
        from .tiny import DEFAULT_STEPS as steps
    steps = check_steps(_as_int(steps, "steps"))
    src = open_image(path, load=False)
    if "size" in row:
        size = row["size"]
        w, h = parse_size(size) if isinstance(size, str) else _as_pair(size)
        size = snap16(*check_size(w, h, "size", hint="; give WxH such as 1024x1024"))
    else:
        size = model.default_size(*src.size)
    output = _check_output(row.get("output", Path(image).stem + ".png"))
    return Item(where, image, path, instruction, embeds, embeds_path, seed, steps, size, output, text_shape)


def _as_int(value, name: str):
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            raise InputError(f"{name} must be an integer, got {value!r}") from None
    return value


def _as_pair(value) -> tuple[int, int]:
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return value[0], value[1]
    raise InputError(f"size must be 'WxH' or [width, height], got {value!r}")


def _check_embeds(embeds, base: str) -> tuple[str, tuple[int, ...]]:
    from .conditioning import POOLED_KEY, PROMPT_KEY
    from .weights.safetensors_io import read_header

    if not isinstance(embeds, str):
        raise InputError(f"embeds must be a file name, got {embeds!r}")
    path = embeds if os.path.isabs(embeds) else os.path.join(base, embeds)
    if not os.path.isfile(path):
        raise InputError(f"embeds {path}: no such file")
    infos = read_header(path)[0]
    missing = [k for k in (PROMPT_KEY, POOLED_KEY) if k not in infos]
    if missing:
        raise InputError(f"embeds {path}: not a conditioning file: missing {missing}; save one with the "
                         "'Save Kontext Conditioning' node")
    return path, tuple(infos[PROMPT_KEY].shape)


def _check_output(output) -> str:
    if not isinstance(output, str) or not output.lower().endswith(".png"):
        raise InputError(f"output must be a .png file name, got {output!r}")
    p = Path(output)
    if p.is_absolute() or ".." in p.parts:
        raise InputError(f"output {output!r} must stay inside the output folder (a relative name without '..')")
    if p.name == Path(REPORT_FILE).with_suffix(".png").name:
        raise InputError(f"output {output!r} would clash with the job report {REPORT_FILE}; rename it")
    return p.as_posix()


# ------------------------------------------------------------------------------------- results on disk

def request(item: Item, model: dict, guidance: float) -> dict:
    """What an output was made from; a rerun redoes an item whose finished sidecar records anything else."""
    return {"image": item.image, "instruction": item.instruction, "embeds": item.embeds, "seed": item.seed,
            "steps": item.steps, "size": list(item.size), "guidance": guidance, "resize": "stretch",
            "model": model}


def is_finished(out_dir: str, item: Item, req: dict) -> bool:
    if not os.path.isfile(os.path.join(out_dir, item.output)):
        return False
    try:
        with open(os.path.join(out_dir, item.sidecar), encoding="utf-8") as f:
            return json.load(f).get("request") == req
    except (OSError, ValueError, AttributeError):
        return False  # no sidecar, or a damaged one: the output is redone


def write_atomic(path: str, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename: the file is either absent or complete."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}{TEMP_MARK}")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def png_bytes(pixels: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_result(out_dir: str, item: Item, req: dict, pixels: np.ndarray, seconds: float) -> None:
    """The PNG first, then its sidecar: the sidecar marks the item finished, so it must never precede it."""
    from . import __version__

    write_atomic(os.path.join(out_dir, item.output), png_bytes(pixels))
    meta = {"output": item.output, "request": req, "source": item.where, "seconds": round(seconds, 3),
            "engine": f"kontext_core {__version__}"}
    write_atomic(os.path.join(out_dir, item.sidecar), json.dumps(meta, indent=1).encode())


def remove_stale_temporaries(out_dir: str) -> int:
    """Temporary files a killed run left behind (never a finished output: those have their final names)."""
    n = 0
    for root, _, files in os.walk(out_dir):
        for name in files:
            if name.startswith(".") and TEMP_MARK in name:
                os.unlink(os.path.join(root, name))
                n += 1
    return n


def read_picture(item: Item) -> np.ndarray:
    """The item's picture, fully decoded (a corrupt file fails here, for this item alone), RGB at its working
    size: (H, W, 3) uint8, small enough to ship to a worker."""
    from .images import fit, flatten_alpha, open_image, to_pil

    img = flatten_alpha(to_pil(open_image(item.path), item.path))
    return np.asarray(fit(img, item.size, "stretch"))


# What an edit may raise for bad data (NaN weights, out of memory, a bad embeddings file): the chunk fails, the
# job goes on. Anything else is a bug and stops the job.
EDIT_ERRORS = (KontextError, ValueError, RuntimeError, OSError)


def failure(item: Item, e: BaseException) -> str:
    from .cli import _one_line

    return f"{item.where}: {_one_line(e)}"


@dataclass
class Plan:
    """A job split into what is finished and what is to do, the latter ordered by group (equal sizes together)."""
    model: dict
    guidance: float
    requests: dict[str, dict]  # output -> request
    model_hashes: dict = field(default_factory=dict)  # saved in the report, reused by the next run
    finished: list[Item] = field(default_factory=list)
    todo: list[Item] = field(default_factory=list)

    def chunks(self, batch_size: int) -> list[list[Item]]:
        groups: dict[tuple, list[Item]] = {}
        for it in self.todo:
            groups.setdefault(it.group, []).append(it)
        return [g[i:i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]


def plan_job(job: Job, out_dir: str, model: ModelSpec, guidance: float) -> Plan:
    from .validation import check_guidance

    os.makedirs(out_dir, exist_ok=True)
    remove_stale_temporaries(out_dir)
    described, hashes = model.describe(_previous_hashes(out_dir))
    plan = Plan(described, check_guidance(guidance), {}, hashes)
    for it in job.items:
        req = plan.requests[it.output] = request(it, described, plan.guidance)
        (plan.finished if is_finished(out_dir, it, req) else plan.todo).append(it)
    plan.todo.sort(key=lambda it: it.group)  # stable: job order within a group
    return plan


def _previous_hashes(out_dir: str) -> dict:
    try:
        with open(os.path.join(out_dir, REPORT_FILE), encoding="utf-8") as f:
            hashes = json.load(f).get("model_hashes")
        return hashes if isinstance(hashes, dict) else {}
    except (OSError, ValueError, AttributeError):
        return {}


@dataclass
class Report:
    total: int
    skipped: int = 0  # finished by an earlier run
    done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # output -> why
    interrupted: bool = False
    seconds: float = 0.0
    model_hashes: dict = field(default_factory=dict)  # absolute path -> {signature, sha256}

    def save(self, out_dir: str) -> None:
        write_atomic(os.path.join(out_dir, REPORT_FILE), json.dumps(dataclasses.asdict(self), indent=1).encode())

    def summary(self) -> str:
        text = (f"{len(self.done)} edited, {self.skipped} already done, {len(self.failed)} failed "
                f"of {self.total} in {self.seconds:.1f} s")
        if self.interrupted:
            text += "; interrupted: run the same command again to finish (finished items are kept)"
        elif self.failed:
            text += "; failed items are retried when the command is run again"
        return text


# ----------------------------------------------------------------------------------------- one machine

def run_local(job: Job, out_dir: str, model: ModelSpec, guidance: float | None = None,
              batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = True, on_written=None) -> Report:
    """Edit the job on this machine: the model is loaded once, each chunk of a group is one batch, every result
    is written as soon as its chunk is done. Ctrl-C stops after writing the report (finished items stay)."""
    from .tiny import DEFAULT_GUIDANCE
    from .tiny.progress import Progress
    from .validation import check_batch_size

    batch_size = check_batch_size(batch_size, "--batch-size")
    t0 = time.time()
    plan = plan_job(job, out_dir, model, DEFAULT_GUIDANCE if guidance is None else guidance)
    report = Report(total=len(job.items), skipped=len(plan.finished), model_hashes=plan.model_hashes)
    bar = Progress(len(plan.todo), "batch", every_s=5.0) if progress and plan.todo else None
    try:
        editor = model.load() if plan.todo else None
        for chunk in plan.chunks(batch_size):
            ready, pictures = [], []
            for it in chunk:
                try:
                    pictures.append(read_picture(it))
                    ready.append(it)
                except KontextError as e:
                    report.failed[it.output] = failure(it, e)
            start = time.time()
            try:
                results = editor.edit(ready, pictures, plan.guidance) if ready else []
            except EDIT_ERRORS as e:
                report.failed.update({it.output: failure(it, e) for it in ready})
                results = []
            each = (time.time() - start) / max(len(ready), 1)
            for it, pixels in zip(ready, results):
                write_result(out_dir, it, plan.requests[it.output], pixels, each)
                report.done.append(it.output)
                if on_written:
                    on_written(it)
            if bar:
                bar.update(len(chunk), failed=len(report.failed))
    except KeyboardInterrupt:
        report.interrupted = True
    finally:
        report.seconds = time.time() - t0
        report.save(out_dir)
    return report


# ------------------------------------------------------------------------------------------------ command

def add_batch_parser(sub) -> None:
    """`kontext-core batch JOB --out DIR [--ray [ADDRESS]]`, registered by cli.build_parser."""
    from .tiny import DEFAULT_GUIDANCE

    b = sub.add_parser("batch", help="edit a folder of pictures or a CSV/JSONL manifest; resumable; --ray scales "
                                     "it out over a Ray cluster")
    b.add_argument("job", help="a folder of pictures (with --prompt or --embeds), or a .csv / .jsonl manifest with "
                               f"the columns {', '.join(MANIFEST_COLUMNS)} (only 'image' is required)")
    b.add_argument("--out", required=True, help="output folder: one PNG + one JSON sidecar per item, and "
                                                f"{REPORT_FILE}")
    b.add_argument("--prompt", help="the instruction for every picture (Kontext-Tiny); a manifest's default")
    b.add_argument("--embeds", help="prompt embeddings file for every picture (with --transformer/--ae)")
    b.add_argument("--seed", type=int, default=0, help="noise seed where the job gives none (default 0)")
    b.add_argument("--steps", type=int, help="sampling steps where the job gives none (default: Kontext-Tiny's)")
    b.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE, help="guidance embedding value")
    b.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help=f"pictures of one size edited together (default {DEFAULT_BATCH_SIZE})")
    b.add_argument("--transformer", help="a real Kontext transformer file instead of Kontext-Tiny")
    b.add_argument("--ae", help="the autoencoder that goes with --transformer")
    b.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    b.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="run on Ray Data: alone, a local Ray instance (or the cluster in RAY_ADDRESS); with an "
                        "address (auto, HOST:6379), that cluster. Needs the [scale] extra")
    b.add_argument("--workers", type=int, help="with --ray: model replicas (default: one per GPU of the cluster, "
                                               "or 2 on CPU-only clusters)")
    b.set_defaults(func=cmd_batch)


def cmd_batch(args) -> int:
    from .cli import USER_ERRORS, _one_line

    model = ModelSpec(args.transformer, args.ae, args.device)
    try:
        model.check()
        job = load_job(args.job, model, Defaults(args.prompt, args.embeds, args.seed, args.steps))
        if args.ray:
            from .batch_ray import run_ray

            report = run_ray(job, args.out, model, args.guidance, args.batch_size,
                             address=None if args.ray == "local" else args.ray, workers=args.workers)
        else:
            report = run_local(job, args.out, model, args.guidance, args.batch_size)
    except JobError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except USER_ERRORS as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 1
    for output, why in report.failed.items():
        print(f"failed: {output}: {why}", file=sys.stderr)
    print(report.summary())
    return 130 if report.interrupted else (1 if report.failed else 0)
