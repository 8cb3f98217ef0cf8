"""Memory-mapped safetensors reading with validation and clear errors.

We parse the header ourselves (8-byte little-endian length + JSON) so that a truncated or corrupt file is
reported with its name and what is wrong before any tensor is touched, and so tensors can be zero-copy views
of one copy-on-write mmap of the file: loading costs no RAM until pages are read, and the model's parameters
*are* those pages (no second copy of the weights is ever materialised).
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Return ({name: TensorInfo}, metadata) after checking the header against the file size."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: file is {size} bytes, too short to be a safetensors file. "
                                      "Re-download it.")
            (n,) = struct.unpack("<Q", head)
            if n <= 0 or n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(
                    f"{path}: not a valid safetensors file (header length {n} for a {size}-byte file). "
                    "The file is corrupt, truncated, or in another format (GGUF files need the GGUF loader; "
                    ".ckpt/.pt pickles are not loaded for safety).")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read file ({e}).") from e
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({e}); the file is corrupt.") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object; the file is corrupt.")
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + n
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype = entry["dtype"]
            shape = tuple(int(d) for d in entry["shape"])
            start, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: malformed header entry for tensor '{name}'; the file is corrupt.") from e
        if dtype not in DTYPES:
            raise CheckpointError(f"{path}: tensor '{name}' has dtype {dtype}, which this loader does not support "
                                  f"(supported: {', '.join(DTYPES)}).")
        if start < 0 or end < start or any(d < 0 for d in shape):
            raise CheckpointError(f"{path}: tensor '{name}' has data_offsets [{start}, {end}] and shape {list(shape)}; "
                                  "offsets must satisfy 0 <= begin <= end and dimensions be >= 0. The file is "
                                  "corrupt; download it again.")
        info = TensorInfo(name, dtype, shape, base + start, base + end)
        expect = info.numel * DTYPES[dtype].itemsize
        if info.nbytes != expect:
            raise CheckpointError(f"{path}: tensor '{name}' declares shape {list(shape)} {dtype} ({expect} bytes) "
                                  f"but occupies {info.nbytes} bytes; the file is corrupt.")
        if info.end > size:
            raise CheckpointError(
                f"{path}: file is truncated: tensor '{name}' ends at byte {info.end} but the file has {size} "
                "bytes. The download was probably interrupted; download it again.")
        infos[name] = info
    _check_no_overlap(path, infos)
    return infos, metadata


def _check_no_overlap(path, infos: dict[str, TensorInfo]) -> None:
    """Two tensors sharing bytes would alias each other (a write to one changes the other); the safetensors
    library refuses such headers and so do we. Gaps between tensors are tolerated (harmless padding)."""
    prev = None
    for info in sorted((i for i in infos.values() if i.nbytes), key=lambda i: i.start):
        if prev is not None and info.start < prev.end:
            raise CheckpointError(f"{path}: tensors '{prev.name}' (bytes {prev.start}-{prev.end}) and '{info.name}' "
                                  f"(from byte {info.start}) overlap; the header is corrupt or crafted. Download "
                                  "the file again from its original source.")
        prev = info


class SafetensorsFile:
    """A validated, memory-mapped safetensors file. `tensor(name)` returns a zero-copy CPU view."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.infos, self.metadata = read_header(self.path)
        self._mm: mmap.mmap | None = None

    def keys(self):
        return self.infos.keys()

    def _map(self) -> mmap.mmap:
        if self._mm is None:
            with open(self.path, "rb") as f:
                # Copy-on-write: tensors are writable views, the file on disk is never modified.
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._mm

    def tensor(self, name: str) -> torch.Tensor:
        info = self.infos[name]
        dtype = DTYPES[info.dtype]
        if info.numel == 0:
            return torch.empty(info.shape, dtype=dtype)
        itemsize = dtype.itemsize
        mm = self._map()
        if info.start % itemsize == 0:
            t = torch.frombuffer(mm, dtype=dtype, count=info.numel, offset=info.start)
        else:  # unaligned (never produced by the safetensors writer, but allowed by the format): copy
            t = torch.frombuffer(bytearray(mm[info.start:info.end]), dtype=dtype)
        return t.view(info.shape)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: self.tensor(k) for k in self.infos}


def find_shards(path: str | os.PathLike, *, prefer: tuple[str, ...] = ()) -> list[Path]:
    """Resolve a file, a sharded index json, or a folder (diffusers layout) to the safetensors files to read.

    For a folder, `prefer` names index files / single files to look for first (e.g. the diffusers transformer
    index), then any `*.safetensors.index.json`, then all `*.safetensors` in the folder.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or folder.")
    if p.is_file():
        if p.name.endswith(".index.json"):
            return _shards_from_index(p)
        return [p]
    for name in prefer:
        cand = p / name
        if cand.is_file():
            return _shards_from_index(cand) if name.endswith(".index.json") else [cand]
    indexes = sorted(p.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        return _shards_from_index(indexes[0])
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{p}: folder contains no .safetensors files (expected a single checkpoint, "
                              "a sharded set with *.safetensors.index.json, or a diffusers component folder).")
    return files


def _shards_from_index(index: Path) -> list[Path]:
    try:
        wm = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a valid safetensors index (needs a 'weight_map' object): {e}") from e
    shards = []
    for name in dict.fromkeys(wm.values()):
        shard = index.parent / name
        if not shard.is_file():
            raise CheckpointError(f"{index}: lists shard '{name}', which is missing from {index.parent}. "
                                  "Download every shard of the model.")
        shards.append(shard)
    return shards


def load_state_dict(path: str | os.PathLike, *, prefer: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """All tensors of a file / index / folder as zero-copy mmap views (CPU)."""
    sd: dict[str, torch.Tensor] = {}
    for shard in find_shards(path, prefer=prefer):
        f = SafetensorsFile(shard)
        for k in f.keys():
            if k in sd:
                raise CheckpointError(f"{shard}: tensor '{k}' also appears in another shard; the set is inconsistent.")
            sd[k] = f.tensor(k)
    return sd
