"""One test per case of the bad-input corpus (tests/bad_inputs.py): a refusal must have the promised error type
and a message naming the argument or file and what to do; an accepted input must give a finite, correctly sized
result. Memory caps are exercised in children under resource.setrlimit."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bad_inputs as corpus  # noqa: E402


@pytest.fixture(scope="module")
def files():
    return corpus.Files()


def test_corpus_is_large_and_covers_every_item():
    assert len(corpus.CASES) >= 60
    assert len({c.name for c in corpus.CASES}) == len(corpus.CASES)
    items = {c.item for c in corpus.CASES}
    assert {"engine arguments", "non-finite results", "model files", "safetensors headers", "images",
            "sizes and memory", "command line", "conditioning files", "nodes"} <= items
    assert sum(isinstance(c.expect, corpus.Accepted) for c in corpus.CASES) >= 15


@pytest.mark.parametrize("case", corpus.CASES, ids=[c.name for c in corpus.CASES])
def test_case(case, files):
    kind, detail = corpus.outcome(case, files)
    assert kind != "FAILED", detail
