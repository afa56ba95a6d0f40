"""A real recorded trace survives AttentionTrace.save / load unchanged; item() unpads it."""

from __future__ import annotations

import pytest
import torch
from test_parquet import assert_same
from tiny_models import prompts_ids, tiny_model, tiny_tokenizer

import attnflow as af
from attnflow import Span

PROMPTS = prompts_ids((5, 9, 7))


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


CASES = {
    "all-rows-fp16": dict(),
    "last-mean-fp32": dict(rows="last", heads="mean", layers=[-1], dtype=torch.float32),
    "listed-rows-bf16": dict(rows=[0, -1], dtype=torch.bfloat16),
    "completion-weighted": dict(
        rows="completion", completions=[[5, 6], [], [7]], heads=torch.tensor([[1.0, 2, 0, 1], [0, 0, 1, 0]])
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_round_trip(model, tmp_path, case):
    spans = [[Span("doc", "document", 0, 3, 0, 10), Span("q", "question", 3, 5)], [], [Span("all", "prompt", 0, 7)]]
    tr = af.trace(model, PROMPTS, spans=spans, progress=False, **CASES[case])
    back = af.AttentionTrace.load(tr.save(tmp_path / case))
    assert_same(tr, back)
    for i in range(len(PROMPTS)):
        assert_same(tr.item(i), back.item(i))


def test_item_unpads(model):
    tok = tiny_tokenizer()
    tr = af.trace(model, ["the cat sat on the mat", "a dog"], tokenizer=tok, progress=False)
    one = tr.item(1)
    assert one.input_ids.tolist() == [[5, 7]] and one.tokens == [["a", "dog"]]
    assert one.patterns.shape == (1, 2, 4, 2, 2) and one.query_positions.tolist() == [[0, 1]]
    assert torch.equal(one.patterns[0], tr.patterns[1, :, :, 4:, 4:])
    assert torch.allclose(one.patterns.float().sum(-1), torch.ones(1, 2, 4, 2), atol=2e-3)


def test_save_replaces_whole_directory(model, tmp_path):
    a = af.trace(model, PROMPTS, progress=False)
    b = af.trace(model, PROMPTS[:1], rows="last", progress=False)
    a.save(tmp_path / "t")
    b.save(tmp_path / "t", overwrite=True)  # issue 17: replacing needs overwrite=True
    assert_same(b, af.AttentionTrace.load(tmp_path / "t"))


def test_progress_bar_and_silence(model, capsys):
    af.trace(model, PROMPTS, batch_size=2, progress=False)
    assert capsys.readouterr().err == ""
    af.trace(model, PROMPTS, batch_size=2, progress=True)
    err = capsys.readouterr().err
    assert "attnflow trace" in err and "3/3" in err
