"""The tiny text encoder: tokenizer rules, FLUX-shaped outputs, a self-describing safetensors file."""

import pytest
import torch

from kontext_core.errors import CheckpointError, InputError
from kontext_core.tiny.text_encoder import TextEncoderConfig, TinyTextEncoder, Tokenizer, is_tiny_text_encoder

VOCAB = ["make", "the", "circle", "blue", "sign", "say", "A", "B", "a"]


def _model():
    torch.manual_seed(0)
    tok = Tokenizer(VOCAB, 8)
    return TinyTextEncoder(TextEncoderConfig(len(tok.vocab), 8, 32, 2, 1, 48, 24), VOCAB)


def test_tokenizer_spells_capitals_and_keeps_articles():
    tok = Tokenizer(VOCAB, 8)
    assert tok.words("Make the sign say AB") == ["make", "the", "sign", "say", "A", "B"]
    assert tok.words("make a circle") == ["make", "a", "circle"]     # lower-case "a" is a word
    assert tok.unknown_words("make the car red") == ["car", "red"]
    ids, mask = tok(["make the circle blue"])
    assert ids.shape == (1, 8) and mask.sum() == 4


def test_empty_prompt_is_refused():
    with pytest.raises(InputError, match="empty"):
        Tokenizer(VOCAB, 8)(["   "])


def test_outputs_have_flux_shapes_and_ignore_padding():
    m = _model().eval()
    txt, pooled = m(["make the circle blue", "make the circle"])
    assert txt.shape == (2, 8, 48) and pooled.shape == (2, 24)
    # the pooled vector of a prompt does not depend on what else is in the batch (padding is masked)
    alone = m(["make the circle"])[1]
    torch.testing.assert_close(alone[0], pooled[1], atol=1e-5, rtol=1e-5)


def test_save_load_round_trip(tmp_path):
    m = _model().eval()
    path = tmp_path / "te.safetensors"
    m.save(path)
    assert is_tiny_text_encoder(path)
    back = TinyTextEncoder.load(path)
    for a, b in zip(m(["make the circle blue"]), back(["make the circle blue"])):
        torch.testing.assert_close(a, b)


def test_other_files_are_refused(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "x.safetensors"
    save_file({"img_in.weight": torch.zeros(2, 2)}, str(p))
    assert not is_tiny_text_encoder(p)
    with pytest.raises(CheckpointError, match="not a Kontext-Tiny text encoder"):
        TinyTextEncoder.load(p)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="damaged"):
        TinyTextEncoder.load(bad)
