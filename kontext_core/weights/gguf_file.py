"""Reading and writing GGUF files holding a FLUX.1 / Kontext transformer.

`read_gguf(path)` parses and validates the whole header against the file before touching tensor data (so a
truncated download, a corrupt header, a non-FLUX model or an unsupported quant type is reported with the file
name and what to do), then memory-maps the file and takes each tensor at the offset that one parse found:

* quantized tensors become `GGMLTensor`s: zero-copy uint8 views of the (copy-on-write) memory map holding
  the raw blocks, with `qtype` and `logical_shape` (torch order);
* F32 / F16 / BF16 tensors become plain torch tensors of their stored dtype (also zero-copy views).

GGUF stores dimensions innermost-first (ggml order); we return torch order. Converters that had to reshape
a tensor (city96's ComfyUI-GGUF tools) record the original shape as an int array under
`comfy.gguf.orig_shape.<tensor name>`; it is honoured. A `model.diffusion_model.` key prefix is stripped.

`write_gguf(path, tensors, ...)` streams tensors to disk with `gguf.GGUFWriter`'s two-pass API: all tensor
infos first, then each tensor's data produced on demand, so converting a 24 GB model holds one tensor in
memory at a time. The file is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from gguf import GGMLQuantizationType as QT
from gguf.constants import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT

from ..errors import CheckpointError, UnsupportedQuantError
from ..quant.gguf_dequant import SUPPORTED_TYPES, nbytes_for, qtype_of
from ..quant.gguf_quantize import quantize
from ..quant.ggml_tensor import GGMLTensor

__all__ = ["GGUFContents", "read_gguf", "write_gguf", "scan_header", "GGUFHeader", "PREFIX",
           "ORIG_SHAPE_KEY"]

PREFIX = "model.diffusion_model."
ORIG_SHAPE_KEY = "comfy.gguf.orig_shape."
EXPECTED_ARCH = "flux"
_MAGIC = b"GGUF"
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_COUNT = 1 << 24

# GGUF metadata value types -> (struct format, size); 8 = string, 9 = array
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4), 6: ("<f", 4),
            7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_NP_SCALARS = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
               7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}

_FLOAT_TORCH = {QT.F32: torch.float32, QT.F16: torch.float16, QT.BF16: torch.bfloat16}


# ================================================================================================== header

class _Short(Exception):
    """The header ran past the end of the file."""


@dataclass
class TensorEntry:
    name: str  # as stored in the file
    dims: tuple[int, ...]  # ggml order (innermost first)
    raw_type: int
    offset: int  # relative to the data section

    @property
    def torch_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.dims))


@dataclass
class GGUFHeader:
    version: int
    metadata: dict[str, Any]
    tensors: list[TensorEntry]
    alignment: int
    data_offset: int
    file_size: int


class _Cursor:
    def __init__(self, buf, size: int):
        self.buf, self.size, self.pos = buf, size, 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.size:
            raise _Short()
        b = self.buf[self.pos:self.pos + n]
        self.pos += n
        return b

    def scalar(self, fmt: str, size: int):
        return struct.unpack(fmt, self.take(size))[0]

    def u32(self) -> int:
        return self.scalar("<I", 4)

    def u64(self) -> int:
        return self.scalar("<Q", 8)

    def string(self) -> str:
        n = self.u64()
        raw = self.take(n)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"a string at byte {self.pos - n} is not valid UTF-8") from e

    def value(self, vtype: int, depth: int = 0):
        if vtype in _SCALARS:
            return self.scalar(*_SCALARS[vtype])
        if vtype == 8:
            return self.string()
        if vtype == 9:
            if depth > 2:
                raise ValueError("metadata arrays nested too deeply")
            etype = self.u32()
            count = self.u64()
            if etype in _SCALARS:
                size = _SCALARS[etype][1]
                if count * size > self.size - self.pos:
                    raise _Short()
                arr = np.frombuffer(self.take(count * size), dtype=np.dtype(_NP_SCALARS[etype]).newbyteorder("<"))
                return arr.tolist()
            if count > self.size - self.pos:  # every element needs at least one byte
                raise _Short()
            return [self.value(etype, depth + 1) for _ in range(count)]
        raise ValueError(f"unknown metadata value type {vtype}")


def scan_header(path: str | os.PathLike) -> GGUFHeader:
    """Parse and sanity-check a GGUF header without trusting it (CheckpointError naming `path` on failure)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            if size == 0:
                raise CheckpointError(f"{path}: file is empty (0 bytes); it is not a GGUF model. Download it again.")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read file ({e}).") from e
    try:
        return _parse(mm, size, path)
    finally:
        mm.close()


def _parse(mm, size: int, path: Path) -> GGUFHeader:
    head = mm[:4]
    if head != _MAGIC:
        hint = ""
        if len(head) == 4 and size >= 8 and struct.unpack("<Q", mm[:8])[0] < size:
            hint = " It may be a .safetensors file: load it with the safetensors loader."
        raise CheckpointError(
            f"{path}: not a GGUF file (expected the magic bytes 'GGUF', found {bytes(head)!r}).{hint} "
            "Choose a .gguf model file or re-download it.")
    c = _Cursor(mm, size)
    c.pos = 4
    try:
        version = c.u32()
        if version & 0xFFFF == 0 and version != 0:
            raise CheckpointError(f"{path}: this GGUF file is big-endian, which is not supported. "
                                  "Use a little-endian (standard) GGUF file.")
        if version not in (2, 3):
            raise CheckpointError(f"{path}: GGUF version {version} is not supported (expected 2 or 3). "
                                  "Re-convert the model with a current GGUF converter.")
        n_tensors, n_kv = c.u64(), c.u64()
        if n_tensors > _MAX_COUNT or n_kv > _MAX_COUNT:
            raise ValueError(f"implausible counts ({n_tensors} tensors, {n_kv} metadata entries)")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = c.string()
            vtype = c.u32()
            metadata[key] = c.value(vtype)
        tensors = []
        for _ in range(n_tensors):
            name = c.string()
            n_dims = c.u32()
            if not 1 <= n_dims <= _MAX_DIMS:
                raise ValueError(f"tensor '{name}' has {n_dims} dimensions (GGUF allows 1 to {_MAX_DIMS})")
            dims = tuple(c.u64() for _ in range(n_dims))
            if any(d > 1 << 40 for d in dims):
                raise ValueError(f"tensor '{name}' has an implausible dimension {dims}")
            raw_type = c.u32()
            offset = c.u64()
            tensors.append(TensorEntry(name, dims, raw_type, offset))
    except _Short:
        raise CheckpointError(
            f"{path}: file is truncated: it ends ({size} bytes) inside the GGUF header. The download was "
            "probably interrupted; download the file again.") from None
    except (ValueError, struct.error) as e:
        raise CheckpointError(f"{path}: GGUF header is corrupt ({e}). Download the file again.") from None
    alignment = metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise CheckpointError(f"{path}: GGUF header is corrupt (general.alignment = {alignment!r} is not a power "
                              "of two). Download the file again.")
    data_offset = -(-c.pos // alignment) * alignment
    return GGUFHeader(int(version), metadata, tensors, alignment, data_offset, size)


# ================================================================================================== reading

@dataclass
class GGUFContents:
    path: Path
    tensors: dict[str, torch.Tensor]  # GGMLTensor for quantized tensors, plain tensors for F32/F16/BF16
    qtypes: dict[str, str]  # tensor name -> GGML type name ("Q4_K", "F32", ...)
    arch: str
    metadata: dict[str, Any]  # scalar / string / small-list metadata, as stored
    file_size: int
    version: int = 3
    orig_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


def _strip(name: str) -> str:
    return name[len(PREFIX):] if name.startswith(PREFIX) else name


def _looks_like_flux(names: Iterable[str]) -> bool:
    names = [_strip(n) for n in names]
    return any(n.startswith(("double_blocks.", "single_blocks.")) for n in names) and "img_in.weight" in names


def _check_arch(path: Path, header: GGUFHeader) -> str:
    arch = header.metadata.get("general.architecture")
    if arch is None:
        if _looks_like_flux(t.name for t in header.tensors):
            return EXPECTED_ARCH
        raise CheckpointError(
            f"{path}: the GGUF file has no general.architecture and its tensor names do not look like a "
            "FLUX transformer (no img_in / double_blocks / single_blocks). A FLUX.1 Kontext transformer "
            "GGUF is expected.")
    if not isinstance(arch, str) or arch.lower() != EXPECTED_ARCH:
        raise CheckpointError(
            f"{path}: this GGUF holds a '{arch}' model, but a FLUX/Kontext transformer GGUF "
            f"(general.architecture = '{EXPECTED_ARCH}') is expected. Pick the Kontext transformer file; "
            "text-encoder GGUFs (e.g. T5) belong in a CLIP/text-encoder loader.")
    return arch.lower()


def _resolve_type(path: Path, t: TensorEntry) -> QT:
    try:
        q = QT(t.raw_type)
    except ValueError:
        raise UnsupportedQuantError(
            f"{path}: tensor '{t.name}' uses GGML type id {t.raw_type}, which this engine does not know. "
            f"Supported: {', '.join(x.name for x in sorted(SUPPORTED_TYPES, key=int))}. Use a GGUF quantized "
            "with one of those types.") from None
    if q not in SUPPORTED_TYPES:
        raise UnsupportedQuantError(
            f"{path}: tensor '{t.name}' is stored as {q.name}, which this engine cannot dequantize. "
            f"Supported: {', '.join(x.name for x in sorted(SUPPORTED_TYPES, key=int))}. Use a GGUF file "
            "quantized with one of those types (e.g. Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0).")
    return q


def _validate_layout(path: Path, header: GGUFHeader) -> list[tuple[TensorEntry, QT, int]]:
    """Types, byte sizes, ordering and bounds of every tensor; returns (entry, type, nbytes)."""
    out = []
    names = set()
    for t in header.tensors:
        if t.name in names:
            raise CheckpointError(f"{path}: tensor '{t.name}' appears twice in the GGUF header; the file is corrupt.")
        names.add(t.name)
        q = _resolve_type(path, t)
        bs, _ = GGML_QUANT_SIZES[q]
        if t.dims[0] % bs:
            raise CheckpointError(
                f"{path}: tensor '{t.name}' has shape {list(t.torch_shape)} but {q.name} stores rows in blocks of "
                f"{bs}; a row of {t.dims[0]} elements cannot match the data. The file is corrupt.")
        out.append((t, q, nbytes_for(q, t.torch_shape)))
    size = header.file_size
    for t, q, nb in out:
        end = header.data_offset + t.offset + nb
        if end > size:
            raise CheckpointError(
                f"{path}: file is truncated: tensor '{t.name}' ({q.name}, shape {list(t.torch_shape)}) needs "
                f"bytes up to {end}, but the file has only {size} bytes. The download was probably "
                "interrupted; download the file again.")
    by_offset = sorted(out, key=lambda e: e[0].offset)
    for (t, q, nb), (t2, _, _) in zip(by_offset, by_offset[1:]):
        if t.offset + nb > t2.offset:
            raise CheckpointError(
                f"{path}: tensor '{t.name}' declares shape {list(t.torch_shape)} as {q.name} ({nb} bytes), but "
                f"the next tensor '{t2.name}' starts {t2.offset - t.offset} bytes after it: the header does not "
                "match the data. The file is corrupt; download or convert it again.")
    return out


def _orig_shape(path: Path, metadata: dict, t: TensorEntry, numel: int) -> tuple[int, ...] | None:
    v = metadata.get(ORIG_SHAPE_KEY + t.name)
    if v is None:
        v = metadata.get(ORIG_SHAPE_KEY + _strip(t.name))
    if v is None:
        return None
    try:
        shape = tuple(int(s) for s in v)
    except (TypeError, ValueError):
        raise CheckpointError(f"{path}: metadata {ORIG_SHAPE_KEY}{t.name} = {v!r} is not a list of ints; "
                              "the file is corrupt.") from None
    n = math.prod(shape)
    if n != numel:
        raise CheckpointError(
            f"{path}: metadata says tensor '{t.name}' had shape {list(shape)} ({n} elements) but it stores "
            f"{numel} elements (shape {list(t.torch_shape)}). The file is corrupt.")
    return shape


def read_gguf(path: str | os.PathLike, *, check_arch: Callable[[Path, GGUFHeader], str] | None = None
              ) -> GGUFContents:
    """Validate and memory-map a FLUX/Kontext transformer GGUF. See the module docstring.

    `check_arch(path, header)` replaces the FLUX architecture check for other models (e.g. a T5 encoder GGUF):
    it returns the architecture name or raises CheckpointError."""
    path = Path(path)
    header = scan_header(path)
    arch = (check_arch or _check_arch)(path, header)
    entries = _validate_layout(path, header)

    try:
        # Copy-on-write map: writable views for torch, the file itself is never modified.
        data = np.memmap(path, dtype=np.uint8, mode="c")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot map the file ({e}).") from e

    tensors: dict[str, torch.Tensor] = {}
    qtypes: dict[str, str] = {}
    orig_shapes: dict[str, tuple[int, ...]] = {}
    for t, q, nb in entries:
        name = _strip(t.name)
        if name in tensors:
            raise CheckpointError(f"{path}: tensor '{name}' appears both with and without the '{PREFIX}' "
                                  "prefix; the file is ambiguous.")
        orig = _orig_shape(path, header.metadata, t, math.prod(t.dims))
        shape = orig if orig is not None else t.torch_shape
        if orig is not None:
            orig_shapes[name] = orig
        start = header.data_offset + t.offset  # within the file: checked by _validate_layout
        raw = torch.from_numpy(data[start:start + nb])
        if q in _FLOAT_TORCH:
            dt = _FLOAT_TORCH[q]
            if raw.data_ptr() % dt.itemsize:
                raw = raw.clone()  # misaligned (allowed by the format only with odd alignments): copy
            tensors[name] = raw.view(dt).view(shape)
        else:
            bs, ts = GGML_QUANT_SIZES[q]
            stored = t.torch_shape
            byte_shape = (*stored[:-1], stored[-1] // bs * ts)
            tensors[name] = GGMLTensor(raw.view(byte_shape), q, shape)
        qtypes[name] = q.name
    metadata = {k: v for k, v in header.metadata.items() if not k.startswith(ORIG_SHAPE_KEY)}
    return GGUFContents(path=path, tensors=tensors, qtypes=qtypes, arch=arch, metadata=metadata,
                        file_size=header.file_size, version=header.version, orig_shapes=orig_shapes)


# ================================================================================================== writing

def _add_metadata(writer, key: str, value) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        if 0 <= value < 1 << 32:
            writer.add_uint32(key, value)
        else:
            writer.add_int64(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, (list, tuple)):
        if not value:
            return
        writer.add_array(key, list(value))
    else:
        raise TypeError(f"metadata '{key}': unsupported value type {type(value).__name__}")


def _to_raw(name: str, arr, q: QT, shape: tuple[int, ...], nbytes: int) -> np.ndarray:
    """The bytes to store for one tensor: raw uint8 blocks as given, or floats converted / quantized."""
    if isinstance(arr, torch.Tensor):
        arr = arr.detach().cpu()
        arr = arr.view(torch.uint8).numpy() if arr.dtype == torch.bfloat16 and q == QT.BF16 else arr.numpy()
    arr = np.asarray(arr)
    if arr.dtype != np.uint8:
        if q == QT.F32:
            arr = arr.astype(np.float32, copy=False)
        elif q == QT.F16:
            arr = arr.astype(np.float16, copy=False)
        else:
            rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
            arr = quantize(np.asarray(arr, dtype=np.float32).reshape(rows, shape[-1]), q)
    arr = np.ascontiguousarray(arr)
    if arr.nbytes != nbytes:
        raise ValueError(f"tensor '{name}': {arr.nbytes} bytes given for {q.name} shape {list(shape)}, "
                         f"which needs {nbytes} bytes")
    return arr.reshape(-1).view(np.uint8)


def write_gguf(path: str | os.PathLike, tensors_iter, arch: str = EXPECTED_ARCH, metadata: dict | None = None,
               *, progress: Callable[[int, int, str], None] | None = None) -> Path:
    """Write a GGUF file, streaming tensor data.

    tensors_iter yields `(name, data, qtype, torch_shape)`. `data` is either the array to store (raw uint8
    block bytes; or float values for F32/F16/BF16 - and for quantized types, which are then quantized
    here), or a zero-argument callable returning it, called only when that tensor is written. Pass
    callables to keep peak memory at one tensor: the iterator itself is consumed once, up front, to collect
    names, types and shapes. `metadata` values may be str, int, float, bool or lists of those.
    `progress(i, n, name)` is called after each tensor is written. Returns the path.
    """
    from gguf import GGUFWriter

    path = Path(path)
    plan = []
    for item in tensors_iter:
        name, data, qtype, shape = item
        q = qtype_of(qtype)
        shape = tuple(int(s) for s in shape)
        plan.append((name, data, q, shape, nbytes_for(q, shape)))
    tmp = path.with_name(path.name + ".partial")
    try:
        writer = GGUFWriter(tmp, arch)
    except OSError as e:
        raise _write_error(path, e) from None
    try:
        for k, v in (metadata or {}).items():
            if k == "general.architecture":
                continue
            _add_metadata(writer, k, v)
        for name, _, q, shape, nb in plan:
            writer.add_tensor_info(name, shape, np.dtype(np.float32), nb, raw_dtype=q)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for i, (name, data, q, shape, nb) in enumerate(plan):
            arr = data() if callable(data) else data
            writer.write_tensor_data(_to_raw(name, arr, q, shape, nb))
            del arr
            if progress is not None:
                progress(i + 1, len(plan), name)
        writer.close()
        os.replace(tmp, path)
    except BaseException as e:
        try:
            writer.close()
        except Exception:
            pass
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise _write_error(path, e) from None
        raise
    return path


def _write_error(path: Path, e: OSError) -> CheckpointError:
    """Name the user's output path, not the temporary file it is written through."""
    return CheckpointError(f"{path}: cannot write the GGUF file ({e.strerror or e}). Check that the folder exists, "
                           "is writable and has enough free space.")
