"""Prompts -> left-padded batches, and the checks of trace() arguments (tracers/inputs.py)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_tokenizer

from attnflow.errors import BadArgumentError, PromptError
from attnflow.attention_trace import Span
from attnflow.tracers import inputs


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(chat_template=True)


def test_prompt_kinds(tok):
    ids = tok("the cat sat")["input_ids"]
    assert ids == [4, 6, 8]
    enc = inputs.encode(["the cat sat", [1, 5, 6]], tok)
    assert enc.sequences == [[4, 6, 8], [1, 5, 6]] and enc.prompt_lengths == [3, 3]
    assert inputs.encode([7, 8], tok).sequences == [[7, 8]]  # one prompt of ids, used as given
    assert inputs.encode(torch.tensor([[7, 8], [9, 10]])).sequences == [[7, 8], [9, 10]]
    assert inputs.encode("the cat", tok).sequences == [[4, 6]]


def test_chat_template(tok):
    chat = [{"role": "q", "content": "where does alice live ?"}]
    enc = inputs.encode(chat, tok)
    assert tok.convert_ids_to_tokens(enc.sequences[0]) == [
        "<bos>", "q", ":", "where", "does", "alice", "live", "?", ".", "answer", ":",
    ]
    assert inputs.encode([chat, chat], tok).sequences == enc.sequences * 2
    with pytest.raises(PromptError, match="no chat template"):
        inputs.encode(chat, tiny_tokenizer())


def test_completions_mark_prompt_lengths(tok):
    enc = inputs.encode(["the cat", [1, 5]], tok, completions=["sat on", [9]])
    assert enc.sequences == [[4, 6, 8, 9], [1, 5, 9]]
    assert enc.prompt_lengths == [2, 2] and enc.lengths == [4, 3]
    with pytest.raises(BadArgumentError, match="2 completions for 1 prompts"):
        inputs.encode(["the cat"], tok, completions=["a", "b"])


def test_left_pad_and_positions():
    ids, mask = inputs.left_pad([[5, 6], [7, 8, 9]], pad_id=0)
    assert ids.tolist() == [[0, 5, 6], [7, 8, 9]]
    assert mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    assert inputs.position_ids(mask).tolist() == [[0, 0, 1], [0, 1, 2]]


@pytest.mark.parametrize("bad", ["", "   ", [], [[]]])
def test_empty_prompt(bad, tok):
    with pytest.raises(PromptError, match="empty"):
        inputs.encode(bad, tok)


def test_text_without_tokenizer():
    with pytest.raises(BadArgumentError, match="tokenizer"):
        inputs.encode("the cat")


def test_lengths_and_vocab():
    inputs.check_lengths([[1] * 8], max_positions=8)
    with pytest.raises(PromptError, match="prompt 1 has 9 tokens but the model takes at most 8"):
        inputs.check_lengths([[1], [1] * 9], max_positions=8)
    with pytest.raises(PromptError, match=r"\+ 3 to generate"):
        inputs.check_lengths([[1] * 6], max_positions=8, extra=3)
    with pytest.raises(PromptError, match="vocabulary"):
        inputs.check_lengths([[1, 100]], max_positions=None, vocab_size=100)


def test_layers():
    assert inputs.check_layers(None, 3) == [0, 1, 2]
    assert inputs.check_layers([0, -1], 3) == [0, 2]
    assert inputs.check_layers([2, 0, -3], 3) == [0, 2]
    assert inputs.check_layers(-1, 3) == [2]
    for bad in ([3], [-4], [0.5], [], "0"):
        with pytest.raises(BadArgumentError):
            inputs.check_layers(bad, 3)
    with pytest.raises(BadArgumentError, match=r"-3\.\.2"):
        inputs.check_layers([5], 3)


def test_heads():
    assert inputs.check_heads("mean", 2, 4, [0, 1]) == "mean"
    w = inputs.check_heads(torch.tensor([[1.0, 1, 0, 0], [0, 0, 0, 2], [1, 1, 1, 1]]), 3, 4, [0, 2])
    assert torch.allclose(w, torch.tensor([[0.5, 0.5, 0, 0], [0.25] * 4]))
    assert torch.allclose(inputs.check_heads(torch.ones(2, 4), 3, 4, [0, 2]), torch.full((2, 4), 0.25))
    for bad in ("median", torch.ones(3, 5), -torch.ones(3, 4), torch.zeros(3, 4), 3):
        with pytest.raises(BadArgumentError):
            inputs.check_heads(bad, 3, 4, [0, 1, 2])
    assert inputs.head_label(w) == "weighted"


def test_rows():
    assert inputs.check_rows(None, False) is None
    assert inputs.check_rows("last", False) == "last"
    assert inputs.check_rows(-1, False) == [-1]
    for bad in ("first", [], [1.5], [True]):
        with pytest.raises(BadArgumentError):
            inputs.check_rows(bad, True)
    with pytest.raises(BadArgumentError, match="needs a completion"):
        inputs.check_rows("completion", False)
    lengths, plens = [5, 3], [3, 3]
    assert inputs.row_positions(None, lengths, plens) == [[0, 1, 2, 3, 4], [0, 1, 2]]
    assert inputs.row_positions("last", lengths, plens) == [[4], [2]]
    # rows that produce completion tokens 3, 4 are 2, 3; an example without completion has none
    assert inputs.row_positions("completion", lengths, plens) == [[2, 3], []]
    assert inputs.row_positions([-1, 0, 4 - 5], lengths, plens) == [[0, 4], [0, 2]]
    with pytest.raises(BadArgumentError, match="example 1 of length 3"):
        inputs.row_positions([4], lengths, plens)


def test_row_index_is_padded_and_right_aligned():
    idx = inputs.row_index([[0, 1, 2], [2], []], lengths=[3, 4, 2], seq=4)
    assert idx.tolist() == [[1, 2, 3], [-1, -1, 2], [-1, -1, -1]]


def test_spans_and_chunks():
    s = Span("doc", "document", 0, 2)
    assert inputs.check_spans([[s], None], [3, 4]) == [[s], []]
    with pytest.raises(BadArgumentError, match="ends at 5"):
        inputs.check_spans([[Span("doc", "document", 0, 5)]], [3])
    with pytest.raises(BadArgumentError):
        inputs.check_spans([[s]], [3, 4])
    assert inputs.chunks(5, 2) == [range(0, 2), range(2, 4), range(4, 5)]
    with pytest.raises(BadArgumentError):
        inputs.chunks(5, 0)
