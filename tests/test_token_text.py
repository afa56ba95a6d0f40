"""Display strings in traces (issue 20): recorded by the tracer, saved losslessly, old traces still load."""

import json

import pyarrow.parquet as pq
import pytest

import attnflow as af
from attnflow.tokens import PARTIAL, text_of
from test_tokens import TEXT, byte_bpe
from tiny_models import tiny_model


@pytest.fixture(scope="module")
def traced():
    tok = byte_bpe()
    model = tiny_model("llama", vocab_size=len(tok), max_position_embeddings=256)
    tr = af.trace(model, [TEXT, "the river bank"], tokenizer=tok, heads="mean", rows="last",
                  max_new_tokens=4, progress=False)
    return tok, tr


def test_trace_text_concatenates_to_the_prompt_and_keeps_raw_tokens(traced):
    tok, tr = traced
    for b, prompt in enumerate([TEXT, "the river bank"]):
        n = tr.prompt_lengths[b]
        ids = tr.input_ids[b, tr.pad_offsets[b]:].tolist()
        assert tr.tokens[b] == tok.convert_ids_to_tokens(ids)  # raw vocabulary strings kept
        special = [i in tok.all_special_ids for i in ids[:n]]
        assert text_of(tr.text[b][:n], special) == prompt
        # the completion reads as its decoded text
        completion = tok.decode(ids[n:])
        assert "".join(t for t in tr.text[b][n:] if t != PARTIAL) == completion
    assert PARTIAL in tr.text[0]  # multi-byte characters split across byte tokens here
    assert any("â" in t or "Ġ" in t for t in tr.tokens[0])  # the raw strings are byte-alphabet spellings


def test_text_survives_save_and_load(traced, tmp_path):
    _, tr = traced
    back = af.AttentionTrace.load(tr.save(tmp_path / "t"))
    assert back.text == tr.text and back.tokens == tr.tokens
    assert back.item(1).text == [tr.text[1]]
    col = pq.read_table(tmp_path / "t" / "tokens").column("text").to_pylist()
    assert col[: len(tr.text[0])] == tr.text[0]


def test_schema_v1_trace_still_loads_with_text_none(traced, tmp_path):
    _, tr = traced
    path = tr.save(tmp_path / "v1")
    tokens = pq.read_table(path / "tokens" / "part-0.parquet")
    pq.write_table(tokens.drop(["text"]), path / "tokens" / "part-0.parquet")
    man = json.loads((path / "manifest.json").read_text())
    man["schema_version"] = 1
    (path / "manifest.json").write_text(json.dumps(man))
    old = af.AttentionTrace.load(path)
    assert old.text is None and old.tokens == tr.tokens
    assert old.display(0) == tr.tokens[0]


def test_text_length_must_match_tokens(traced):
    from dataclasses import replace

    from attnflow.errors import ShapeError

    _, tr = traced
    with pytest.raises(ShapeError, match="one display string per token"):
        replace(tr, text=[t[:-1] for t in tr.text])
