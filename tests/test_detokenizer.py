"""Incremental detokenization against one decode of all the tokens: the streaming decoder
of the tokenizers library and the window decodes give the same text, piece by piece, for
multi-byte characters split across tokens and for random ids, with the byte-level test
tokenizer and the embedded model's."""

from __future__ import annotations

import random

import pytest
from checkpoints import make_tokenizer

import tr_engine.engine.detokenizer as detokenizer
from tr_engine.engine.detokenizer import IncrementalDetokenizer

TEXTS = ["Hello, wörld — ünïcode ✓ 你好世界 🎉🎉 end.", "  spaces   and\nnewlines\t",
         "naïve café 日本語テキスト"]


def _tokenizers():
    from tr_engine.models.loader import load_tokenizer, resolve_model_path

    return {"bytes": make_tokenizer(), "embedded": load_tokenizer(resolve_model_path(None))}


@pytest.fixture(scope="module")
def tokenizers():
    return _tokenizers()


def _pieces(tokenizer, prompt, ids, stream: bool, monkeypatch) -> tuple[list[str], str]:
    with monkeypatch.context() as m:
        if not stream:
            m.setattr(detokenizer, "DecodeStream", None)
        d = IncrementalDetokenizer(tokenizer, prompt)
    assert (d._stream is not None) == stream
    pieces = [d.add(i) for i in ids] + [d.flush()]
    assert "".join(pieces) == d.text
    return pieces, d.text


@pytest.mark.parametrize("name", ["bytes", "embedded"])
def test_streamed_text_equals_the_whole_decode(tokenizers, name, monkeypatch):
    tok = tokenizers[name]
    rng = random.Random(0)
    prompt = tok.encode("Q: ", add_special_tokens=False)
    cases = [tok.encode(t, add_special_tokens=False) for t in TEXTS]
    cases += [[rng.randrange(0, min(len(tok), 300)) for _ in range(40)] for _ in range(6)]
    for ids in cases:
        whole = tok.decode(ids, skip_special_tokens=True)
        streamed = _pieces(tok, prompt, ids, True, monkeypatch)
        windowed = _pieces(tok, prompt, ids, False, monkeypatch)
        assert streamed[1] == whole
        assert streamed == windowed  # the same text at the same tokens
    # a character cut across tokens comes out whole, once its last byte is in
    ids = tok.encode("🎉", add_special_tokens=False)
    if len(ids) > 1:
        pieces, _ = _pieces(tok, prompt, ids, True, monkeypatch)
        assert pieces[:-2] == [""] * (len(ids) - 1) and pieces[-2] == "🎉"
