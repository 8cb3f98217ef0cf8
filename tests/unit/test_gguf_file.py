"""GGUF reading/writing: round trips, zero-copy views, and every error a user can run into."""

import struct

import numpy as np
import pytest
import torch

import gguf
from gguf import GGMLQuantizationType as QT

from kontext_core.errors import CheckpointError, UnsupportedQuantError
from kontext_core.quant.ggml_tensor import GGMLTensor
from kontext_core.weights.gguf_file import ORIG_SHAPE_KEY, read_gguf, scan_header, write_gguf

RNG = np.random.default_rng(0)
W_QKV = (RNG.standard_normal((96, 64)) * 0.02).astype(np.float32)
W_IMG = (RNG.standard_normal((32, 64)) * 0.02).astype(np.float32)
SCALE = RNG.standard_normal(16).astype(np.float32)


def small_flux(prefix=""):
    return [
        (prefix + "img_in.weight", W_IMG, QT.F16, (32, 64)),
        (prefix + "double_blocks.0.img_attn.qkv.weight", gguf.quants.quantize(W_QKV, QT.Q8_0), QT.Q8_0, (96, 64)),
        (prefix + "double_blocks.0.img_attn.qkv.bias", np.zeros(96, np.float32), QT.F32, (96,)),
        (prefix + "single_blocks.0.norm.query_norm.scale", SCALE, QT.F32, (16,)),
    ]


def write_small(path, arch="flux", prefix="", metadata=None):
    return write_gguf(path, small_flux(prefix), arch=arch, metadata=metadata)


# ------------------------------------------------------------------------------------------ hand-made files

def _s(x: str) -> bytes:
    b = x.encode()
    return struct.pack("<Q", len(b)) + b


def build_gguf(kv, tensors, alignment=32, version=3) -> bytes:
    """kv: [(key, vtype, payload_bytes)], tensors: [(name, ggml_dims, type_id, data_bytes)] laid out in order."""
    out = bytearray(b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kv)))
    for key, vtype, payload in kv:
        out += _s(key) + struct.pack("<I", vtype) + payload
    offset = 0
    offsets = []
    for name, dims, typ, data in tensors:
        offsets.append(offset)
        out += _s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", typ, offset)
        offset += -(-len(data) // alignment) * alignment
    out += b"\0" * (-len(out) % alignment)
    for (_, _, _, data), off in zip(tensors, offsets):
        out += data + b"\0" * (-len(data) % alignment)
    return bytes(out)


ARCH_FLUX = ("general.architecture", 8, _s("flux"))


def q8_bytes(rows, cols):
    return gguf.quants.quantize(RNG.standard_normal((rows, cols)).astype(np.float32), QT.Q8_0).tobytes()


# ------------------------------------------------------------------------------------------ round trips

def test_round_trip_types_shapes_values(tmp_path):
    p = write_small(tmp_path / "m.gguf", metadata={"general.name": "tiny", "general.file_type": 7})
    c = read_gguf(p)
    assert c.arch == "flux"
    assert c.metadata["general.name"] == "tiny" and c.metadata["general.file_type"] == 7
    assert c.qtypes == {"img_in.weight": "F16", "double_blocks.0.img_attn.qkv.weight": "Q8_0",
                        "double_blocks.0.img_attn.qkv.bias": "F32", "single_blocks.0.norm.query_norm.scale": "F32"}
    img = c.tensors["img_in.weight"]
    assert type(img) is torch.Tensor and img.dtype == torch.float16 and img.shape == (32, 64)
    np.testing.assert_array_equal(img.numpy(), W_IMG.astype(np.float16))
    q = c.tensors["double_blocks.0.img_attn.qkv.weight"]
    assert isinstance(q, GGMLTensor) and q.qtype == QT.Q8_0 and q.logical_shape == (96, 64)
    assert q.dtype == torch.uint8 and q.shape == (96, 68)  # packed bytes: 2 blocks of 34 per row
    ref = gguf.quants.dequantize(gguf.quants.quantize(W_QKV, QT.Q8_0), QT.Q8_0)
    np.testing.assert_array_equal(q.dequantize(torch.float32).numpy(), ref)
    np.testing.assert_array_equal(c.tensors["single_blocks.0.norm.query_norm.scale"].numpy(), SCALE)
    assert c.file_size == p.stat().st_size


def test_tensors_are_views_of_the_file_map(tmp_path):
    p = write_small(tmp_path / "m.gguf")
    c = read_gguf(p)
    a = c.tensors["double_blocks.0.img_attn.qkv.weight"]
    b = c.tensors["img_in.weight"]
    # both live in the same memory map, at the distance their file offsets have
    reader = gguf.GGUFReader(p)
    offs = {t.name: int(t.data_offset) for t in reader.tensors}
    assert b.data_ptr() - a.data_ptr() == offs["img_in.weight"] - offs["double_blocks.0.img_attn.qkv.weight"]
    before = p.read_bytes()
    a.as_subclass(torch.Tensor).zero_()  # copy-on-write: the file on disk is untouched
    assert p.read_bytes() == before


def test_prefix_is_stripped(tmp_path):
    c = read_gguf(write_small(tmp_path / "m.gguf", prefix="model.diffusion_model."))
    assert "img_in.weight" in c.tensors and not any(k.startswith("model.") for k in c.tensors)


def test_orig_shape_metadata_is_honoured(tmp_path):
    w = RNG.standard_normal((2, 96)).astype(np.float32)  # stored 2-D, originally (4, 3, 4, 4)
    v = RNG.standard_normal(12).astype(np.float32)  # stored 1-D, originally (3, 4)
    tensors = small_flux() + [
        ("conv.weight", gguf.quants.quantize(w, QT.Q8_0), QT.Q8_0, (2, 96)),
        ("plain.weight", v, QT.F32, (12,)),
    ]
    meta = {ORIG_SHAPE_KEY + "conv.weight": [4, 3, 4, 4], ORIG_SHAPE_KEY + "plain.weight": [3, 4]}
    c = read_gguf(write_gguf(tmp_path / "m.gguf", tensors, metadata=meta))
    conv = c.tensors["conv.weight"]
    assert conv.logical_shape == (4, 3, 4, 4)
    deq = conv.dequantize(torch.float32)
    assert deq.shape == (4, 3, 4, 4)
    ref = gguf.quants.dequantize(gguf.quants.quantize(w, QT.Q8_0), QT.Q8_0)
    np.testing.assert_array_equal(deq.reshape(2, 96).numpy(), ref)
    assert c.tensors["plain.weight"].shape == (3, 4)
    assert c.orig_shapes == {"conv.weight": (4, 3, 4, 4), "plain.weight": (3, 4)}
    assert not any(k.startswith(ORIG_SHAPE_KEY) for k in c.metadata)


def test_orig_shape_with_wrong_element_count(tmp_path):
    meta = {ORIG_SHAPE_KEY + "img_in.weight": [5, 5]}
    with pytest.raises(CheckpointError, match="img_in.weight"):
        read_gguf(write_small(tmp_path / "m.gguf", metadata=meta))


def test_writer_streams_callables_and_quantizes_floats(tmp_path):
    calls = []

    def make(name, arr):
        def f():
            calls.append(name)
            return arr
        return f

    w = RNG.standard_normal((8, 256)).astype(np.float32)
    plan = [("img_in.weight", make("a", W_IMG), QT.F16, (32, 64)),
            ("double_blocks.0.x.weight", make("b", w), QT.Q4_K, (8, 256)),
            ("single_blocks.0.y.weight", make("c", w), "BF16", (8, 256))]
    seen = []
    p = write_gguf(tmp_path / "m.gguf", iter(plan), progress=lambda i, n, name: seen.append((i, n, name)))
    assert calls == ["a", "b", "c"] and [s[0] for s in seen] == [1, 2, 3]
    r = gguf.GGUFReader(p)
    assert [(t.name, t.tensor_type) for t in r.tensors] == [
        ("img_in.weight", QT.F16), ("double_blocks.0.x.weight", QT.Q4_K), ("single_blocks.0.y.weight", QT.BF16)]
    c = read_gguf(p)
    assert c.tensors["single_blocks.0.y.weight"].dtype == torch.bfloat16
    err = (c.tensors["double_blocks.0.x.weight"].dequantize(torch.float32).numpy() - w)
    assert np.sqrt((err ** 2).mean()) < 0.1
    assert not (tmp_path / "m.gguf.partial").exists()


def test_writer_rejects_wrong_byte_count_and_leaves_no_file(tmp_path):
    plan = [("img_in.weight", np.zeros(10, np.uint8), QT.Q8_0, (1, 32))]
    with pytest.raises(ValueError, match="needs 34 bytes"):
        write_gguf(tmp_path / "bad.gguf", plan)
    assert not (tmp_path / "bad.gguf").exists() and not (tmp_path / "bad.gguf.partial").exists()


# ------------------------------------------------------------------------------------------ errors

def test_truncated_file(tmp_path):
    p = write_small(tmp_path / "m.gguf")
    data = p.read_bytes()
    t = tmp_path / "trunc.gguf"
    t.write_bytes(data[:-200])
    with pytest.raises(CheckpointError, match="truncated") as e:
        read_gguf(t)
    assert str(t) in str(e.value) and "download" in str(e.value)


def test_truncated_inside_header(tmp_path):
    p = write_small(tmp_path / "m.gguf")
    t = tmp_path / "trunc.gguf"
    t.write_bytes(p.read_bytes()[:60])
    with pytest.raises(CheckpointError, match="truncated"):
        read_gguf(t)


def test_bad_magic(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(CheckpointError, match="not a GGUF file") as e:
        read_gguf(p)
    assert str(p) in str(e.value)


def test_safetensors_given_to_gguf_loader(tmp_path):
    from safetensors.numpy import save_file
    p = tmp_path / "model.safetensors"
    save_file({"a": np.zeros(4, np.float32)}, str(p))
    with pytest.raises(CheckpointError, match="safetensors"):
        read_gguf(p)


def test_empty_file(tmp_path):
    p = tmp_path / "e.gguf"
    p.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        read_gguf(p)


def test_garbage_after_magic(tmp_path):
    p = tmp_path / "g.gguf"
    p.write_bytes(b"GGUF" + bytes(RNG.integers(0, 256, 300, dtype=np.uint8)))
    with pytest.raises(CheckpointError) as e:
        read_gguf(p)
    assert str(p) in str(e.value)


def test_corrupt_metadata_block(tmp_path):
    # valid version and counts, then a metadata entry with an impossible value type
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _s("general.architecture") + struct.pack("<I", 77) + bytes(64)
    p = tmp_path / "c.gguf"
    p.write_bytes(data)
    with pytest.raises(CheckpointError, match="corrupt"):
        read_gguf(p)


def test_implausible_string_length_is_reported_not_allocated(tmp_path):
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1 << 60) + bytes(32)
    p = tmp_path / "c.gguf"
    p.write_bytes(data)
    with pytest.raises(CheckpointError, match="truncated|corrupt"):
        read_gguf(p)


def test_wrong_architecture(tmp_path):
    p = write_small(tmp_path / "llm.gguf", arch="llama")
    with pytest.raises(CheckpointError) as e:
        read_gguf(p)
    msg = str(e.value)
    assert "'llama'" in msg and "FLUX" in msg and str(p) in msg


def test_missing_architecture_allowed_only_for_flux_keys(tmp_path):
    img = np.zeros((4, 64), np.float16).tobytes()
    flux = build_gguf([], [("img_in.weight", (64, 4), int(QT.F16), img),
                           ("double_blocks.0.img_attn.qkv.weight", (32, 2), int(QT.Q8_0), q8_bytes(2, 32))])
    (tmp_path / "ok.gguf").write_bytes(flux)
    c = read_gguf(tmp_path / "ok.gguf")
    assert c.arch == "flux" and c.qtypes["double_blocks.0.img_attn.qkv.weight"] == "Q8_0"
    other = build_gguf([], [("token_embd.weight", (64, 4), int(QT.F16), img)])
    (tmp_path / "no.gguf").write_bytes(other)
    with pytest.raises(CheckpointError, match="no general.architecture"):
        read_gguf(tmp_path / "no.gguf")


def test_tensor_bytes_do_not_match_shape(tmp_path):
    # tensor a claims 4 rows of Q8_0 (136 bytes) but only 2 rows (68 bytes, padded to 96) precede tensor b
    a = q8_bytes(2, 32)
    data = build_gguf([ARCH_FLUX], [("img_in.weight", (32, 2), int(QT.Q8_0), a),
                                    ("double_blocks.0.x.weight", (32, 2), int(QT.Q8_0), q8_bytes(2, 32))])
    hdr = scan_header_bytes(tmp_path, data)
    # patch the first tensor's second dimension (2 -> 4) in the header
    name = b"img_in.weight"
    i = data.index(name) + len(name) + 4  # skip n_dims
    dims = struct.unpack_from("<QQ", data, i)
    assert dims == (32, 2)
    bad = data[:i] + struct.pack("<QQ", 32, 4) + data[i + 16:]
    p = tmp_path / "mismatch.gguf"
    p.write_bytes(bad)
    with pytest.raises(CheckpointError, match="does not match") as e:
        read_gguf(p)
    assert "img_in.weight" in str(e.value) and hdr.data_offset > 0


def scan_header_bytes(tmp_path, data):
    p = tmp_path / "tmp_scan.gguf"
    p.write_bytes(data)
    return scan_header(p)


def test_row_length_not_a_multiple_of_the_block(tmp_path):
    data = build_gguf([ARCH_FLUX], [("img_in.weight", (40, 1), int(QT.Q8_0), bytes(64))])
    p = tmp_path / "rows.gguf"
    p.write_bytes(data)
    with pytest.raises(CheckpointError, match="blocks of 32"):
        read_gguf(p)


def test_unsupported_quant_type_written_by_the_writer(tmp_path):
    w = gguf.GGUFWriter(tmp_path / "tq.gguf", "flux")
    raw = np.zeros((2, 54), np.uint8)  # TQ1_0: 256 elements in 54 bytes
    w.add_tensor("img_in.weight", raw, raw_shape=(2, 54), raw_dtype=QT.TQ1_0)
    w.add_tensor("double_blocks.0.img_attn.qkv.weight", np.zeros((2, 34), np.uint8), raw_shape=(2, 34),
                 raw_dtype=QT.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedQuantError) as e:
        read_gguf(tmp_path / "tq.gguf")
    assert "img_in.weight" in str(e.value) and "TQ1_0" in str(e.value)


def test_unknown_type_id(tmp_path):
    data = build_gguf([ARCH_FLUX], [("img_in.weight", (32, 1), 31, bytes(64))])
    p = tmp_path / "unk.gguf"
    p.write_bytes(data)
    with pytest.raises(UnsupportedQuantError, match="type id 31") as e:
        read_gguf(p)
    assert "img_in.weight" in str(e.value)


def test_duplicate_tensor_names(tmp_path):
    t = ("img_in.weight", (32, 1), int(QT.Q8_0), q8_bytes(1, 32))
    p = tmp_path / "dup.gguf"
    p.write_bytes(build_gguf([ARCH_FLUX], [t, t]))
    with pytest.raises(CheckpointError, match="twice"):
        read_gguf(p)


def test_unsupported_version(tmp_path):
    p = tmp_path / "v1.gguf"
    p.write_bytes(build_gguf([ARCH_FLUX], [], version=1))
    with pytest.raises(CheckpointError, match="version 1"):
        read_gguf(p)


def test_hand_built_file_matches_reference_reader(tmp_path):
    # our header scanner and gguf-py's reader agree on a file with odd alignment and array metadata
    kv = [ARCH_FLUX, ("general.alignment", 4, struct.pack("<I", 64)),
          ("some.array", 9, struct.pack("<IQ", 5, 3) + struct.pack("<3i", 1, -2, 3))]
    data = build_gguf(kv, [("img_in.weight", (32, 3), int(QT.Q8_0), q8_bytes(3, 32)),
                           ("final_layer.linear.bias", (5,), int(QT.F32), np.arange(5, dtype=np.float32).tobytes())],
                      alignment=64)
    p = tmp_path / "a.gguf"
    p.write_bytes(data)
    h = scan_header(p)
    r = gguf.GGUFReader(p)
    assert h.data_offset == r.data_offset and h.alignment == 64
    assert h.metadata["some.array"] == [1, -2, 3]
    c = read_gguf(p)
    np.testing.assert_array_equal(c.tensors["final_layer.linear.bias"].numpy(), np.arange(5, dtype=np.float32))
