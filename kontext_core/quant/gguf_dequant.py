"""Vectorised PyTorch dequantization of GGML block formats (the payload of GGUF files).

`dequantize(data, qtype, shape, dtype)` turns the raw bytes of one quantized tensor into a dense tensor on the
same device. Results are bit-identical to `gguf.quants.dequantize` (the reference numpy implementation) in
float32; float16/bfloat16 outputs are the float32 result rounded once.

How it is fast (this runs for every quantized layer on every forward pass):

* Blocks are viewed as a `(n_blocks, type_size)` byte matrix; the packed fields are re-viewed as 16- or
  32-bit words so one integer op unpacks 2 or 4 quants at a time (`w & 0x0F0F0F0F` yields four low nibbles,
  already in output order because GGML is little-endian). Fields that are not word-aligned inside a block
  are first copied out contiguously (one copy with long rows).
* fp16 scales are read by viewing the byte matrix as float16 and taking a column (or a pair of them as one
  int32 word) - no byte shuffles. Per-block scale products (d*scale, dmin*min) are computed with column-wise
  ops once per tensor (per chunk, their fixed per-op cost was ~15% of the total), each factor as its own
  contiguous plane: a broadcast multiply by a strided (n, 8, 1) factor is ~1.7x slower than by a contiguous one.
* Signed quants are produced directly as int8 bytes with carry-free word arithmetic (for Q4_0:
  `(v + 0x7878) ^ 0x8080` turns two offset-8 nibbles into two int8 values), so the float stage is one
  integer->float32 copy plus one or two broadcast multiply/add ops, in the reference's order (bit-exact).
* Torch's CPU kernels pay a fixed cost per contiguous run, so the code avoids ops over many short strided
  rows (that alone was worth 2-3x). On CPU the work runs in chunks of ~1M output elements; large outputs
  are allocated through numpy, which asks the kernel for transparent huge pages (torch's default CPU
  allocator only does with THP_MEM_ALLOC_ENABLE=1; without them first-touch page faults of the output cost
  more than the arithmetic). On accelerators the whole tensor is one batch of kernels.

benchmarks/bench_gguf_dequant.py measures this against gguf-py on the same bytes: on the 2-core dev VM,
single-threaded (like numpy), 3.0-3.9x for the legacy and K types (Q4_K 4.0-4.5x), 4-5x for IQ4, float32
output; 3.6-5x with torch's two threads.

Field layouts (one block; byte offsets):
  Q8_0   34 B /32: d f16 @0, int8 q[32] @2                         x = d*q
  Q4_0   18 B /32: d @0, q[16] @2 (lo nibbles = 0..15, hi = 16..31)  x = d*(q-8)
  Q4_1   20 B /32: d @0, m @2, q[16] @4                             x = d*q + m
  Q5_0   22 B /32: d @0, qh u32 @2 (bit j = 5th bit of quant j), q[16] @6   x = d*(q-16)
  Q5_1   24 B /32: d @0, m @2, qh @4, q[16] @8                      x = d*q + m
  IQ4_NL 18 B /32: d @0, q[16] @2                                   x = d*K[q]  (K = non-linear 16-value grid)
  Q2_K   84 B/256: sc[16] @0 (lo 4 bits scale, hi 4 bits min), q2[64] @16, d @80, dmin @82
  Q3_K  110 B/256: hmask[32] @0, q2[64] @32, 16 packed 6-bit scales[12] @96, d @108
  Q4_K  144 B/256: d @0, dmin @2, 8+8 packed 6-bit scales/mins[12] @4, q4[128] @16
  Q5_K  176 B/256: d @0, dmin @2, scales[12] @4, qh[32] @16, q4[128] @48
  Q6_K  210 B/256: ql[128] @0, qh[64] @128, int8 scales[16] @192, d @208
  IQ4_XS 136 B/256: d @0, scales_h u16 @2, scales_l[4] @4, q4[128] @8
"""

from __future__ import annotations

import math
import threading
from typing import Callable

import numpy as np
import torch

from gguf import GGMLQuantizationType as QT
from gguf.constants import GGML_QUANT_SIZES

from ..errors import CheckpointError, UnsupportedQuantError

__all__ = ["SUPPORTED_TYPES", "dequantize", "block_info", "nbytes_for", "qtype_of", "qtype_name"]

# Non-linear 4-bit grid shared by IQ4_NL and IQ4_XS (from the GGUF format definition).
IQ4_GRID = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)

_FLOAT_TYPES = {QT.F32: torch.float32, QT.F16: torch.float16, QT.BF16: torch.bfloat16}

# Output elements per CPU chunk: bounds the temporaries (recycled by the allocator) while keeping the
# number of torch ops per tensor small.
CPU_CHUNK_ELEMS = 1 << 20
# Outputs at least this big are allocated through numpy on CPU (huge-page backed, see module docstring).
_NUMPY_ALLOC_MIN_BYTES = 1 << 20


def qtype_of(qtype) -> QT:
    """Normalise an int / name / enum to `GGMLQuantizationType` (UnsupportedQuantError if unknown)."""
    if isinstance(qtype, QT):
        return qtype
    try:
        if isinstance(qtype, str):
            return QT[qtype.upper()]
        return QT(int(qtype))
    except (KeyError, ValueError, TypeError):
        raise UnsupportedQuantError(
            f"unknown GGML tensor type {qtype!r}; supported types are {_supported_names()}. "
            "The file may come from a newer converter: use a GGUF quantized with one of the supported types."
        ) from None


def qtype_name(qtype) -> str:
    try:
        return qtype_of(qtype).name
    except UnsupportedQuantError:
        return str(qtype)


def block_info(qtype) -> tuple[int, int]:
    """(elements per block, bytes per block) of a GGML type."""
    q = qtype_of(qtype)
    return GGML_QUANT_SIZES[q]


def nbytes_for(qtype, shape) -> int:
    """Bytes a tensor of `shape` (torch order: the last dim is the contiguous row) occupies as `qtype`.

    Raises CheckpointError when the row length is not a multiple of the type's block size.
    """
    bs, ts = block_info(qtype)
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    row = shape[-1] if shape else 1
    if row % bs:
        raise CheckpointError(
            f"a {qtype_name(qtype)} tensor needs rows that are a multiple of {bs} elements, but shape "
            f"{list(shape)} has rows of {row}. The tensor cannot be stored in this type.")
    return numel // bs * ts


# ---------------------------------------------------------------------------------------------- constants

_CONST_CACHE: dict[tuple[str, torch.device], torch.Tensor] = {}


def _const(name: str, device: torch.device, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    key = (name, device)
    t = _CONST_CACHE.get(key)
    if t is None:
        t = make().to(device)
        _CONST_CACHE[key] = t
    return t


def _iq4_grid(device) -> torch.Tensor:
    return _const("iq4grid", device, lambda: torch.tensor(IQ4_GRID, dtype=torch.float32))


# ---------------------------------------------------------------------------------------------- helpers

_TLS = threading.local()


def _buf(tag: str, shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Scratch tensor for one use site (`tag`) of a kernel.

    Inside `dequantize`'s CPU chunk loop the same buffers are reused for every chunk, so one call allocates
    its scratch once (bounded by the chunk size) instead of once per chunk. Outside a workspace
    (accelerators: one pass over the whole tensor) it is a plain torch.empty.
    """
    shape = tuple(shape)
    ws = getattr(_TLS, "ws", None)
    if ws is None:
        return torch.empty(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * dtype.itemsize
    t = ws.get(tag)
    if t is None or t.numel() < nbytes:
        t = torch.empty(max(nbytes, 64), dtype=torch.uint8, device=device)
        ws[tag] = t
    return t[:nbytes].view(dtype).view(shape)


def _f16(b: torch.Tensor, off: int) -> torch.Tensor:
    """fp16 field at byte offset `off` of each block -> (n, 1) float32 (exact)."""
    return b.view(torch.float16)[:, off // 2].float().unsqueeze(1)


def _f16_pair(b: torch.Tensor, off: int) -> torch.Tensor:
    """Two adjacent fp16 fields at a 4-aligned byte offset -> (n, 2) float32, read as one int32 word."""
    col = b.view(torch.int32)[:, off // 4]
    w = torch.empty(col.shape, dtype=torch.int32, device=col.device).copy_(col)  # canonical strides
    return w.view(torch.float16).view(-1, 2).float()


def _region32(b: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Bytes [start, stop) of every block as a contiguous (n, (stop-start)//4) int32 tensor.

    One strided copy with long rows; the bit twiddling after it runs on contiguous memory, which is what
    makes torch's CPU kernels fast (an op over many short strided rows pays a fixed cost per row).
    """
    r = b[:, start:stop]
    out = _buf(f"region{start}", r.shape, torch.uint8, r.device)  # aligned, canonical strides
    return out.copy_(r).view(torch.int32)


def _bits_to_bytes_lut(device, set_value: int, clear_value: int) -> torch.Tensor:
    """256-entry int64 table: byte v -> 8 bytes whose byte k is set_value if bit k of v is set, else clear_value."""
    def make():
        v = torch.arange(256, dtype=torch.int64).view(256, 1)
        bits = (v >> torch.arange(8, dtype=torch.int64).view(1, 8)) & 1
        by = torch.where(bits.bool(), set_value, clear_value).to(torch.uint8)
        return by.contiguous().view(torch.int64).view(256)
    return _const(f"bitlut{set_value},{clear_value}", device, make)


_M4x4 = 0x0F0F0F0F  # the low nibble of every byte of an int32 word
_M4x2 = 0x0F0F  # ... of an int16 word


# ---------------------------------------------------------------------------------------------- kernels
# Each type has `prep(blocks) -> tuple` computing per-block float32 scales (each with one row per block) and
# `body(blocks, out, *scales)` writing float32 values into `out` (n, block_size). prep runs once for the whole
# tensor; on CPU body runs per chunk (on row slices of the scales), elsewhere once. Integer work is done on contiguous 16/32-bit words; the float stage is one integer->float32 copy
# plus one or two broadcast ops. Products are formed in the reference's order (scale*quant, then -min or
# +min) so float32 results are bit-identical. Temporaries come from `_buf` (see there).

def _p_d(b):
    return (_f16(b, 0),)


def _p_dm(b):
    return _f16(b, 0), _f16(b, 2)


def _lo_hi(w: torch.Tensor, mask: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Low and high nibbles of every byte of the word tensor w, as two word tensors of w's shape."""
    lo = torch.bitwise_and(w, mask, out=_buf("lo", w.shape, w.dtype, w.device))
    hi = torch.bitwise_right_shift(w, 4, out=_buf("hi", w.shape, w.dtype, w.device))
    return lo, hi.bitwise_and_(mask)


def _b_q8_0(b, o, d):
    o.copy_(b[:, 2:].view(torch.int8))
    o.mul_(d)


def _b_q4_0(b, o, d):
    n = b.shape[0]
    lo, hi = _lo_hi(b.view(torch.int16), _M4x2)  # (n, 9) words; bytes 2..17 are the quants
    for t in (lo, hi):
        # per byte v -> v + 0xF8 (mod 256), i.e. v - 8 read as int8, without carries between the bytes:
        # v + 0x78 stays below 0x100, then flipping bit 7 adds the remaining 0x80.
        t.add_(0x7878).bitwise_xor_(-0x7F80)  # -0x7F80 == 0x8080 as int16
    o3 = o.view(n, 2, 16)
    o3[:, 0].copy_(lo.view(torch.int8).view(n, 18)[:, 2:])
    o3[:, 1].copy_(hi.view(torch.int8).view(n, 18)[:, 2:])
    o.mul_(d)


def _b_q4_1(b, o, d, m):
    n = b.shape[0]
    lo, hi = _lo_hi(b.view(torch.int32), _M4x4)  # (n, 5) words; bytes 4..19 are the quants
    o3 = o.view(n, 2, 16)
    o3[:, 0].copy_(lo.view(torch.uint8).view(n, 20)[:, 4:])
    o3[:, 1].copy_(hi.view(torch.uint8).view(n, 20)[:, 4:])
    o.mul_(d).add_(m)


def _q5_quants(b, qs_off: int, qh_off: int, set_value: int, clear_value: int) -> torch.Tensor:
    """(n, 32) uint8: low nibble of quant j from the 16 quant bytes, OR-ed with a byte derived from bit j of the
    32-bit high mask (via a byte -> 8 bytes lookup table)."""
    n, ts = b.shape
    dev = b.device
    idx = _buf("idx", (n, 4), torch.int32, dev).copy_(b[:, qh_off:qh_off + 4])
    high = torch.index_select(_bits_to_bytes_lut(dev, set_value, clear_value), 0, idx.view(-1),
                              out=_buf("high", (n * 4,), torch.int64, dev)).view(torch.uint8).view(n, 32)
    lo, hi = _lo_hi(b.view(torch.int16), _M4x2)
    q = _buf("q", (n, 2, 16), torch.uint8, dev)
    torch.bitwise_or(lo.view(torch.uint8).view(n, ts)[:, qs_off:qs_off + 16], high[:, :16], out=q[:, 0])
    torch.bitwise_or(hi.view(torch.uint8).view(n, ts)[:, qs_off:qs_off + 16], high[:, 16:], out=q[:, 1])
    return q.view(n, 32)


def _b_q5_0(b, o, d):
    # q - 16 == nibble - 16*(1 - h): as int8 that is nibble | 0xF0 where the high bit is clear.
    o.copy_(_q5_quants(b, 6, 2, 0x00, 0xF0).view(torch.int8))
    o.mul_(d)


def _b_q5_1(b, o, d, m):
    o.copy_(_q5_quants(b, 8, 4, 0x10, 0x00))
    o.mul_(d).add_(m)


def _b_iq4_nl(b, o, d):
    n = b.shape[0]
    lo, hi = _lo_hi(b.view(torch.int16), _M4x2)
    idx = _buf("idx", (n, 2, 16), torch.int32, b.device)
    idx[:, 0].copy_(lo.view(torch.uint8).view(n, 18)[:, 2:])
    idx[:, 1].copy_(hi.view(torch.uint8).view(n, 18)[:, 2:])
    torch.index_select(_iq4_grid(b.device), 0, idx.view(-1), out=o.view(-1))
    o.mul_(d)


def _scaled(ints: torch.Tensor, d: torch.Tensor, tag: str) -> torch.Tensor:
    """float32 copy of ints (n, g, k) multiplied by d (n, g, 1), in a reusable buffer."""
    f = _buf(tag, ints.shape, torch.float32, ints.device).copy_(ints)
    return f.mul_(d)


def _p_q2_k(b):
    # 16 bytes = 4 int32 columns; per byte: low nibble = scale, high nibble = min (one sub-block each).
    # Column-wise ops on (n,) vectors avoid torch's per-row cost of ops over (n, 16)-shaped slices.
    # Scales and mins go to separate planes (2, n, ...) so that each factor handed to the body is a
    # contiguous (n, 16, 1) tensor: a broadcast multiply by a strided factor is ~1.7x slower.
    n = b.shape[0]
    w = b.view(torch.int32)
    f = _buf("p_sm", (2, n, 4), torch.int32, b.device)
    for k in range(4):
        col = w[:, k]
        torch.bitwise_and(col, _M4x4, out=f[0, :, k])
        torch.bitwise_and(col >> 4, _M4x4, out=f[1, :, k])
    dm = _scaled(f.view(torch.uint8).view(2, n, 16), _f16_pair(b, 80).t().unsqueeze(-1), "p_dm")
    return dm[0].unsqueeze(-1), dm[1].unsqueeze(-1)  # d * scale, dmin * min: contiguous (n, 16, 1) each


def _b_q2_k(b, o, dl, ml):
    n = b.shape[0]
    qs = _region32(b, 16, 80).view(n, 2, 8)  # (n, h, 32 bytes)
    # element h*128 + s*32 + l  <-  bit pair s of quant byte h*32 + l
    p = _buf("q", (n, 2, 4, 8), torch.int32, b.device)
    p[:, :, 0].copy_(qs)
    for s_ in range(1, 4):
        torch.bitwise_right_shift(qs, 2 * s_, out=p[:, :, s_])
    p.bitwise_and_(0x03030303)
    o.copy_(p.view(torch.uint8).view(n, 256))
    o.view(n, 16, 16).mul_(dl).sub_(ml)


def _p_q3_k(b):
    # 16 six-bit scales: low 4 bits in bytes 96-103 (lo nibble: scales 0-7, hi nibble: 8-15), high 2 bits
    # in bytes 104-107 (bit pair i//4 of byte 104 + i%4); stored with an offset of 32.
    n = b.shape[0]
    dev = b.device
    sb = _buf("p_sb", (n, 12), torch.uint8, dev).copy_(b[:, 96:108])
    sc = _buf("p_sc", (n, 16), torch.uint8, dev)
    torch.bitwise_and(sb[:, 0:8], 15, out=sc[:, 0:8])
    torch.bitwise_right_shift(sb[:, 0:8], 4, out=sc[:, 8:16])
    hi = _buf("p_hi", (n, 4, 4), torch.uint8, dev)
    for k in range(4):
        torch.bitwise_right_shift(sb[:, 8:12], 2 * k, out=hi[:, k])
    sc.bitwise_or_(hi.view(n, 16).bitwise_and_(3).bitwise_left_shift_(4)).sub_(32)  # wraps; int8 view = sc - 32
    return (_scaled(sc.view(torch.int8).view(n, 1, 16), _f16(b, 108).view(n, 1, 1), "p_dl").view(n, 16, 1),)


def _b_q3_k(b, o, dl):
    n = b.shape[0]
    dev = b.device
    qs = _region32(b, 32, 96).view(n, 2, 8)
    q = _buf("q", (n, 2, 4, 8), torch.int32, dev)  # (n, h, s, 32 bytes): low 2 bits
    q[:, :, 0].copy_(qs)
    for s_ in range(1, 4):
        torch.bitwise_right_shift(qs, 2 * s_, out=q[:, :, s_])
    q.bitwise_and_(0x03030303)
    # high bit = bit h*4+s of hmask byte l; where it is CLEAR the quant is low - 4, i.e. low | 0xFC as int8
    hmask = _region32(b, 0, 32)  # (n, 8)
    hm = _buf("hm", (n, 8, 8), torch.int32, dev)  # (n, h*4+s, 32 bytes)
    hm[:, 0].copy_(hmask)
    for k in range(1, 8):
        torch.bitwise_right_shift(hmask, k, out=hm[:, k])
    hm.bitwise_and_(0x01010101).bitwise_xor_(0x01010101).mul_(0xFC)  # per byte 0xFC or 0, no carries
    q.view(n, 8, 8).bitwise_or_(hm)
    o.copy_(q.view(torch.int8).view(n, 256))
    o.view(n, 16, 16).mul_(dl)


def _p_q4_k(b):
    """Scales and mins of Q4_K/Q5_K blocks: 8 + 8 six-bit values packed in bytes 4-15.

    Word 1 holds scales 0-3 in the low 6 bits of its bytes, word 2 mins 0-3; word 3 holds the low 4 bits of
    scales 4-7 (low nibbles) and of mins 4-7 (high nibbles), whose top 2 bits are the top bits of words 1/2.
    Returns d*scale and dmin*min as (n, 8, 1) float32.
    """
    n = b.shape[0]
    w = b.view(torch.int32)
    a, m, c = w[:, 1], w[:, 2], w[:, 3]
    # planes (scales, mins) x n x (words 0-3, 4-7): each returned factor is then a contiguous (n, 8, 1)
    # tensor (a broadcast multiply by a strided factor is ~1.7x slower)
    sm = _buf("p_sm", (2, n, 2), torch.int32, b.device)
    torch.bitwise_and(a, 0x3F3F3F3F, out=sm[0, :, 0])
    torch.bitwise_and(c, _M4x4, out=sm[0, :, 1])
    sm[0, :, 1].bitwise_or_((a >> 2) & 0x30303030)
    torch.bitwise_and(m, 0x3F3F3F3F, out=sm[1, :, 0])
    torch.bitwise_right_shift(c, 4, out=sm[1, :, 1])
    sm[1, :, 1].bitwise_and_(_M4x4).bitwise_or_((m >> 2) & 0x30303030)
    dm = _scaled(sm.view(torch.uint8).view(2, n, 8), _f16_pair(b, 0).t().unsqueeze(-1), "p_dm")
    return dm[0].unsqueeze(-1), dm[1].unsqueeze(-1)  # d * scale, dmin * min


def _k4_planes(b: torch.Tensor, word_off: int) -> torch.Tensor:
    """The 128 packed 4-bit quants of Q4_K/Q5_K (32 int32 words from word `word_off` of each block) ->
    (2, n, 4, 8) int32 nibble planes: [0] the low nibbles (sub-blocks 0, 2, 4, 6), [1] the high ones
    (sub-blocks 1, 3, 5, 7). Read straight from the block bytes (no region copy) into contiguous planes:
    writing each plane whole is cheaper than interleaving 32-byte runs here; `_k4_store` interleaves them
    during the int -> float32 copy, which writes strided rows anyway."""
    n = b.shape[0]
    qs = b.view(torch.int32)[:, word_off:word_off + 32]
    p = _buf("q", (2, n, 32), torch.int32, b.device)
    torch.bitwise_and(qs, _M4x4, out=p[0])
    torch.bitwise_right_shift(qs, 4, out=p[1])
    p[1].bitwise_and_(_M4x4)
    return p.view(2, n, 4, 8)


def _k4_store(p: torch.Tensor, o: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> None:
    """o (n, 256) = d * q - m with q from `_k4_planes` (element 64c + 32h + l <- plane h, byte 32c + l)."""
    n = o.shape[0]
    o4 = o.view(n, 4, 2, 32)
    pu = p.view(torch.uint8).view(2, n, 4, 32)
    o4[:, :, 0].copy_(pu[0])
    o4[:, :, 1].copy_(pu[1])
    o.view(n, 8, 32).mul_(d).sub_(m)


def _b_q4_k(b, o, d, m):
    _k4_store(_k4_planes(b, 4), o, d, m)


def _b_q5_k(b, o, d, m):
    n = b.shape[0]
    p = _k4_planes(b, 12)
    # 5th bit of element l of sub-block j = 2c + h (plane h, group c) = bit j of qh byte l: move it to bit 4
    qh = _region32(b, 16, 48)  # (n, 8)
    hb = _buf("hb", (2, n, 4, 8), torch.int32, b.device)  # laid out like the planes
    for j in range(8):
        h, c = j % 2, j // 2
        if j <= 4:
            torch.bitwise_left_shift(qh, 4 - j, out=hb[h, :, c])
        else:
            torch.bitwise_right_shift(qh, j - 4, out=hb[h, :, c])
    p.bitwise_or_(hb.bitwise_and_(0x10101010))
    _k4_store(p, o, d, m)


def _p_q6_k(b):
    n = b.shape[0]
    return (_scaled(b[:, 192:208].view(torch.int8).view(n, 1, 16), _f16(b, 208).view(n, 1, 1),
                    "p_d").view(n, 16, 1),)


def _b_q6_k(b, o, d):
    n = b.shape[0]
    dev = b.device
    # element e = h*128 + s*32 + l: low 4 bits = nibble s//2 of ql byte h*64 + (s%2)*32 + l,
    # high 2 bits = bit pair s of qh byte h*32 + l; stored with an offset of 32.
    ql = _region32(b, 0, 128).view(n, 2, 16)  # (n, h, 64 bytes = (s%2, l))
    lo = _buf("lo", (n, 2, 2, 16), torch.int32, dev)  # (n, h, s//2, 64 bytes)
    lo[:, :, 0].copy_(ql)
    torch.bitwise_right_shift(ql, 4, out=lo[:, :, 1])
    lo.bitwise_and_(_M4x4)
    qh = _region32(b, 128, 192).view(n, 2, 8)
    hi = _buf("hi", (n, 2, 4, 8), torch.int32, dev)  # (n, h, s, 32 bytes): pair s at bits 4-5
    torch.bitwise_left_shift(qh, 4, out=hi[:, :, 0])
    torch.bitwise_left_shift(qh, 2, out=hi[:, :, 1])
    hi[:, :, 2].copy_(qh)
    torch.bitwise_right_shift(qh, 2, out=hi[:, :, 3])
    hi.bitwise_and_(0x30303030)
    q = hi.view(torch.uint8).view(n, 256)
    q.sub_(32).add_(lo.view(torch.uint8).view(n, 256))  # bytewise, wrapping: read as int8 it is q - 32
    o.copy_(q.view(torch.int8))
    o.view(n, 16, 16).mul_(d)


def _p_iq4_xs(b):
    # 8 six-bit scales (offset 32): low 4 bits = nibble j%2 of byte 4 + j//2, high 2 bits = bit pair j of
    # the little-endian u16 at byte 2.
    n = b.shape[0]
    dev = b.device
    ls = _buf("p_ls", (n, 4, 2), torch.int16, dev)
    sl = _buf("p_sl", (n, 4), torch.int16, dev).copy_(b[:, 4:8])
    torch.bitwise_and(sl, 15, out=ls[:, :, 0])
    torch.bitwise_right_shift(sl, 4, out=ls[:, :, 1])
    sh = b.view(torch.int16)[:, 1]
    hi = _buf("p_hi", (n, 8), torch.int16, dev)
    for j in range(8):
        torch.bitwise_right_shift(sh, 2 * j, out=hi[:, j])
    ls = ls.view(n, 8).bitwise_or_(hi.bitwise_and_(3).bitwise_left_shift_(4)).sub_(32)
    return (_scaled(ls.view(n, 1, 8), _f16(b, 0).view(n, 1, 1), "p_dl").view(n, 8, 1),)


def _b_iq4_xs(b, o, dl):
    n = b.shape[0]
    qs = _region32(b, 8, 136).view(n, 8, 4)  # sub-block j: 16 bytes, low nibbles first, then high
    q = _buf("q", (n, 8, 2, 4), torch.int32, b.device)
    q[:, :, 0].copy_(qs)
    torch.bitwise_right_shift(qs, 4, out=q[:, :, 1])
    q.bitwise_and_(_M4x4)
    idx = _buf("idx", (n * 256,), torch.int32, b.device).copy_(q.view(torch.uint8).view(-1))
    torch.index_select(_iq4_grid(b.device), 0, idx, out=o.view(-1))
    o.view(n, 8, 32).mul_(dl)


_KERNELS: dict[QT, tuple[Callable, Callable]] = {
    QT.Q8_0: (_p_d, _b_q8_0),
    QT.Q5_0: (_p_d, _b_q5_0),
    QT.Q5_1: (_p_dm, _b_q5_1),
    QT.Q4_0: (_p_d, _b_q4_0),
    QT.Q4_1: (_p_dm, _b_q4_1),
    QT.Q2_K: (_p_q2_k, _b_q2_k),
    QT.Q3_K: (_p_q3_k, _b_q3_k),
    QT.Q4_K: (_p_q4_k, _b_q4_k),
    QT.Q5_K: (_p_q4_k, _b_q5_k),
    QT.Q6_K: (_p_q6_k, _b_q6_k),
    QT.IQ4_NL: (_p_d, _b_iq4_nl),
    QT.IQ4_XS: (_p_iq4_xs, _b_iq4_xs),
}

SUPPORTED_TYPES: frozenset[QT] = frozenset((*_FLOAT_TYPES, *_KERNELS))


def _supported_names() -> str:
    return ", ".join(t.name for t in sorted(SUPPORTED_TYPES, key=int))


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes >= _NUMPY_ALLOC_MIN_BYTES:
            # numpy madvises large buffers for transparent huge pages; torch's CPU allocator only does so
            # when THP_MEM_ALLOC_ENABLE=1. The tensor owns the array, so its lifetime is the tensor's.
            return torch.from_numpy(np.empty(nbytes, dtype=np.uint8)).view(dtype).view(shape)
    return torch.empty(shape, dtype=dtype, device=device)


def _as_plain_bytes(data) -> torch.Tensor:
    if isinstance(data, np.ndarray):
        data = torch.from_numpy(np.ascontiguousarray(data).view(np.uint8))
    if not isinstance(data, torch.Tensor):
        raise TypeError(f"dequantize expects a uint8 torch.Tensor of raw block bytes, got {type(data).__name__}")
    if type(data) is not torch.Tensor:
        data = data.as_subclass(torch.Tensor)
    if data.dtype != torch.uint8:
        data = data.contiguous().view(torch.uint8) if data.dim() else data.reshape(1).view(torch.uint8)
    return data.reshape(-1)


def dequantize(data: torch.Tensor, qtype, shape, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Dequantize raw GGML block bytes to a dense `shape` tensor of `dtype` on `data`'s device.

    data: uint8 tensor (any shape; read as a flat byte string). qtype: GGMLQuantizationType, its int value or
    name. shape: torch-order shape of the weight (the last dim is the contiguous, quantized row).
    Raises UnsupportedQuantError for types without a kernel, CheckpointError if the byte count does not
    match `shape`.
    """
    q = qtype_of(qtype)
    if q not in SUPPORTED_TYPES:
        raise UnsupportedQuantError(
            f"GGML type {q.name} is not supported by this engine's dequantizer; supported types are "
            f"{_supported_names()}. Use a GGUF file quantized with one of those types.")
    shape = tuple(int(s) for s in shape)
    expected = nbytes_for(q, shape)
    data = _as_plain_bytes(data)
    if data.numel() != expected:
        raise CheckpointError(
            f"{q.name} tensor of shape {list(shape)} needs {expected} bytes but {data.numel()} were given; "
            "the tensor data does not match its declared shape and type (corrupt or mislabelled file).")
    device = data.device
    if data.storage_offset() % 8:  # word views below need aligned storage offsets
        data = data.clone()
    if q in _FLOAT_TYPES:
        src = data.view(_FLOAT_TYPES[q]).view(shape)
        if src.dtype == dtype:
            return src
        return _empty(shape, dtype, device).copy_(src)
    numel = math.prod(shape)
    if numel == 0:
        return torch.empty(shape, dtype=dtype, device=device)
    bs, ts = GGML_QUANT_SIZES[q]
    n = numel // bs
    blocks = data.view(n, ts)
    out = _empty((n, bs), dtype, device)
    if device.type == "cpu":
        _run_chunked(q, blocks, out)
    else:
        _run_whole(q, blocks, out)
    return out.view(shape)


def _run_whole(q: QT, blocks: torch.Tensor, out: torch.Tensor) -> None:
    """One pass over all blocks (accelerators: a handful of large kernels)."""
    prep, body = _KERNELS[q]
    scales = prep(blocks)
    if out.dtype == torch.float32:
        body(blocks, out, *scales)
    else:
        tmp = torch.empty(out.shape, dtype=torch.float32, device=out.device)
        body(blocks, tmp, *scales)
        out.copy_(tmp)


def _run_chunked(q: QT, blocks: torch.Tensor, out: torch.Tensor) -> None:
    """CPU: chunks of ~CPU_CHUNK_ELEMS outputs, scratch buffers reused across chunks."""
    prep, body = _KERNELS[q]
    n, bs = out.shape
    step = max(1, CPU_CHUNK_ELEMS // bs)
    tmp = None if out.dtype == torch.float32 else torch.empty((min(step, n), bs), dtype=torch.float32)
    outer = getattr(_TLS, "ws", None)
    _TLS.ws = {}
    try:
        # Scales for the whole tensor at once: prep is a dozen ops on (n,)-sized columns, so per chunk its
        # fixed per-op cost dominated (~15% of the total for the K types); its outputs are small.
        scales = prep(blocks)
        for s in range(0, n, step):
            e = min(n, s + step)
            b = blocks[s:e]
            sc = [x[s:e] for x in scales]  # every prep output has one row per block
            if tmp is None:
                body(b, out[s:e], *sc)
            else:
                t = tmp[: e - s]
                body(b, t, *sc)
                out[s:e].copy_(t)
    finally:
        _TLS.ws = outer
