"""attnflow.attribute on tiny hand-built traces: hand-computed scores and ranks, alignment, errors."""

from __future__ import annotations

import pytest
import torch

import attnflow as af
from attnflow import attribution as at
from attnflow.errors import BadArgumentError
from attnflow.attention_trace import AttentionTrace, Span

# example 0: 4 tokens (prompt 3 + 1 generated); example 1: 3 tokens (prompt 2 + 1), left-padded by 1
EX0 = [[1, 0, 0, 0], [0.5, 0.5, 0, 0], [0.2, 0.3, 0.5, 0], [0.1, 0.2, 0.3, 0.4]]
EX1 = [[1, 0, 0], [0.6, 0.4, 0], [0.3, 0.3, 0.4]]
SPANS0 = [Span("doc A", "document", 0, 2), Span("doc B", "document", 2, 3), Span("q", "question", 3, 4)]
SPANS1 = [Span("doc A", "document", 0, 1), Span("doc B", "document", 1, 2)]


def tiny_trace(layers=1, num_layers=None, dtype=torch.float64):
    P = torch.zeros(2, layers, 1, 4, 4, dtype=dtype)
    P[0, :, 0] = torch.tensor(EX0, dtype=dtype)
    P[1, :, 0, 1:, 1:] = torch.tensor(EX1, dtype=dtype)
    return AttentionTrace(
        patterns=P,
        input_ids=torch.tensor([[5, 6, 7, 8], [0, 5, 6, 9]]),
        attention_mask=torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]]),
        query_positions=torch.tensor([[0, 1, 2, 3], [-1, 1, 2, 3]]),
        tokens=[["a", "b", "c", "d"], ["a", "b", "e"]],
        prompt_lengths=[3, 2],
        layers=list(range(layers)),
        heads="mean",
        spans=[list(SPANS0), list(SPANS1)],
        model_info={"num_layers": num_layers or layers},
    )


def rows_of(table):
    d = table.to_pydict()
    src = "source_span" if "source_span" in d else "source_token"
    return [(e, t, s, round(sc, 6), r) for e, t, s, sc, r in zip(d["example"], d["target"], d[src], d["score"], d["rank"])]


def test_schema():
    t = af.attribute(tiny_trace(), method="raw", shares=False)
    assert t.schema.names == ["example", "method", "target", "source_span", "score", "rank"]
    assert [str(f.type) for f in t.schema] == ["int32", "string", "int32", "int32", "float", "int32"]
    assert set(t["method"].to_pylist()) == {"raw"}
    tok = af.attribute(tiny_trace(), method="raw", sources="tokens", shares=False)
    assert tok.schema.names[3] == "source_token"


def test_raw_spans_hand_computed_with_a_tie():
    # completion token 3 of example 0 is produced by row 2 = [.2, .3, .5, 0]: doc A .5, doc B .5 (tie -> span order), q 0
    # completion token 2 of example 1 is produced by row 1 = [.6, .4, 0]: doc A .6, doc B .4
    got = rows_of(af.attribute(tiny_trace(), method="raw"))
    assert got == [(0, -1, 0, 0.5, 1), (0, -1, 1, 0.5, 2), (0, -1, 2, 0.0, 3), (1, -1, 0, 0.6, 1), (1, -1, 1, 0.4, 2)]


def test_rollout_spans_hand_computed():
    # one layer: row 2 of rownorm(.5 A + .5 I) = [.1, .15, .75, 0]; example 1 row 1 = [.3, .7, 0]
    got = rows_of(af.attribute(tiny_trace(), method="rollout", alpha=0.5))
    assert got == [(0, -1, 0, 0.25, 2), (0, -1, 1, 0.75, 1), (0, -1, 2, 0.0, 3), (1, -1, 0, 0.3, 2), (1, -1, 1, 0.7, 1)]
    # flow (A + I, rows 2) gives the same shares as rollout 0.5
    assert rows_of(af.attribute(tiny_trace(), method="flow")) == got


def test_exclude_bos_hand_computed():
    # example 0 row 2 without key 0: [0, .375, .625, 0]; with the residual: [0, .1875, .8125, 0]
    # example 1 row 1 without its first real key: [0, 1, 0] -> [0, 1, 0]
    got = rows_of(af.attribute(tiny_trace(), method="rollout", exclude_keys=(0,)))
    assert got == [(0, -1, 0, 0.1875, 2), (0, -1, 1, 0.8125, 1), (0, -1, 2, 0.0, 3), (1, -1, 0, 0.0, 2), (1, -1, 1, 1.0, 1)]


def test_two_layers_hand_computed():
    # the same matrix in both layers: raw takes the last; rollout composes M·M with M = rownorm(.5 A + .5 I)
    # example 1: M = [[1,0,0],[.3,.7,0],[.15,.15,.7]]; (M·M)[1] = [.3 + .7*.3, .49, 0] = [.51, .49, 0]
    got = rows_of(af.attribute(tiny_trace(layers=2), method="rollout"))
    assert got[3:] == [(1, -1, 0, 0.51, 1), (1, -1, 1, 0.49, 2)]


def test_tokens_targets_alignment_and_reduce():
    tr = tiny_trace()
    # targets are produced-token positions: token 2 <- row 1, token 3 <- row 2 (example 1 has rows 1, 2 too)
    got = rows_of(af.attribute(tr, method="raw", sources="tokens", targets=[2, 3], reduce=None))
    ex0 = [r for r in got if r[0] == 0]
    assert ex0 == [
        (0, 2, 0, 0.5, 1), (0, 2, 1, 0.5, 2), (0, 2, 2, 0.0, 3), (0, 2, 3, 0.0, 4),
        (0, 3, 0, 0.2, 3), (0, 3, 1, 0.3, 2), (0, 3, 2, 0.5, 1), (0, 3, 3, 0.0, 4),
    ]
    ex1 = [r for r in got if r[0] == 1]
    assert ex1 == [  # token 3 <- row 2 = [.3, .3, .4]: the tie between keys 0 and 1 goes to key 0
        (1, 2, 0, 0.6, 1), (1, 2, 1, 0.4, 2), (1, 2, 2, 0.0, 3),
        (1, 3, 0, 0.3, 2), (1, 3, 1, 0.3, 3), (1, 3, 2, 0.4, 1),
    ]
    mean = rows_of(af.attribute(tr, method="raw", sources="tokens", targets=[2, 3], reduce="mean"))
    assert mean[:4] == [(0, -1, 0, 0.35, 2), (0, -1, 1, 0.4, 1), (0, -1, 2, 0.25, 3), (0, -1, 3, 0.0, 4)]
    total = rows_of(af.attribute(tr, method="raw", sources="tokens", targets=[2, 3], reduce="sum"))
    assert total[:4] == [(0, -1, 0, 0.7, 2), (0, -1, 1, 0.8, 1), (0, -1, 2, 0.5, 3), (0, -1, 3, 0.0, 4)]
    # negative targets count from the end: -1 is each example's last token
    assert rows_of(af.attribute(tr, method="raw", targets=[-1], reduce=None)) == rows_of(
        af.attribute(tr, method="raw", targets="completion", reduce=None)
    )


def test_last_target_is_the_next_token():
    got = rows_of(af.attribute(tiny_trace(), method="raw", targets="last", reduce=None))
    # example 0: row 3 = [.1, .2, .3, .4] explains token 4; example 1: row 2 = [.3, .3, .4] explains token 3
    assert got == [(0, 4, 0, 0.3, 2), (0, 4, 1, 0.3, 3), (0, 4, 2, 0.4, 1), (1, 3, 0, 0.3, 1), (1, 3, 1, 0.3, 2)]


def test_span_kind_filter_keeps_span_ids():
    got = rows_of(af.attribute(tiny_trace(), method="raw", targets="last", span_kind="question"))
    assert got == [(0, -1, 2, 0.4, 1)]  # span 2 of example 0; example 1 has no question span
    with pytest.raises(BadArgumentError, match="no spans of kind 'answer'"):
        af.attribute(tiny_trace(), span_kind="answer")


def test_alignment_helpers():
    assert at.producing_row(5) == 4 and at.produced_position(4) == 5
    torch.testing.assert_close(at.produced_position(at.producing_row(torch.tensor([1, 7]))), torch.tensor([1, 7]))
    tr = tiny_trace()
    assert at.target_positions(tr, "completion") == [[3], [2]]
    assert at.target_positions(tr, "last") == [[4], [3]]
    assert at.target_positions(tr, [1, -1]) == [[1, 3], [1, 2]]


def test_helpers():
    spans = [Span("a", "document", 0, 2), Span("b", "question", 1, 5)]
    torch.testing.assert_close(at.span_matrix(spans, 3), torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]))
    torch.testing.assert_close(at.span_scores(torch.tensor([[0.5, 0.3, 0.2]]), spans), torch.tensor([[0.8, 0.5]]))
    assert at.rank_scores(torch.tensor([0.2, 0.5, 0.2, 0.1])).tolist() == [2, 1, 3, 4]
    assert at.rank_scores(torch.tensor([[1.0, 1.0, 1.0], [0.0, 2.0, 1.0]])).tolist() == [[1, 2, 3], [3, 1, 2]]


def test_matches_composing_each_example_alone():
    g = torch.Generator().manual_seed(0)
    tr = tiny_trace(layers=3)
    A = torch.rand(2, 3, 2, 4, 4, generator=g, dtype=torch.float64).tril() * tr.attention_mask[:, None, None, None, :]
    A = A * tr.attention_mask[:, None, None, :, None]
    A = A / A.sum(-1, keepdim=True).clamp(min=1e-30)
    tr.patterns, tr.heads = A, "all"
    table = af.attribute(tr, method="rollout", sources="tokens", targets="completion", reduce=None, alpha=0.7)
    d = table.to_pydict()
    for b in range(2):
        one = tr.item(b)
        R = af.flow.rollout(one.patterns, alpha=0.7)[0]  # unpadded
        row = R[tr.prompt_lengths[b] - 1]
        got = [s for e, s in zip(d["example"], d["score"]) if e == b]
        torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), row / row.sum(), rtol=1e-6, atol=1e-7)


def test_flow_rows_for_exporters():
    tr = tiny_trace(layers=2)
    R = at.flow_rows(tr, "rollout", exclude_keys=(0,))
    assert R.shape == (2, 4, 4)
    torch.testing.assert_close(R, af.flow.rollout(tr.patterns, exclude_keys=(0,), key_mask=tr.attention_mask))
    assert not R[1, 0].any() and not R[1, :, 0].any()  # the pad row and key of example 1


def test_rows_subset_trace_allows_only_raw():
    full = tiny_trace()
    last = tiny_trace()
    last.patterns = full.patterns[:, :, :, -1:, :].clone()
    last.query_positions = torch.tensor([[3], [3]])
    for method in ("flow", "rollout", "flow_normalized", "sum"):
        with pytest.raises(BadArgumentError, match="record with rows=None"):
            af.attribute(last, method=method, targets="last")
        with pytest.raises(BadArgumentError, match="record with rows=None"):
            at.flow_rows(last, method)
    assert rows_of(af.attribute(last, method="raw", targets="last")) == rows_of(
        af.attribute(full, method="raw", targets="last")
    )
    with pytest.raises(BadArgumentError, match="query row 2 of example 0 was not recorded"):
        af.attribute(last, method="raw", targets="completion")


def test_layer_subset_trace_allows_only_raw():
    tr = tiny_trace(layers=1, num_layers=4)
    tr.layers = [3]
    with pytest.raises(BadArgumentError, match=r"layers \[3\] of 4.*layers=None"):
        af.attribute(tr, method="flow")
    assert len(af.attribute(tr, method="raw")) == 5


def test_bad_arguments():
    tr = tiny_trace()
    with pytest.raises(BadArgumentError, match="method='attn'"):
        af.attribute(tr, method="attn")
    with pytest.raises(BadArgumentError, match="sources='docs'"):
        af.attribute(tr, sources="docs")
    with pytest.raises(BadArgumentError, match="reduce='max'"):
        af.attribute(tr, reduce="max")
    with pytest.raises(BadArgumentError, match="targets='first'"):
        af.attribute(tr, targets="first")
    with pytest.raises(BadArgumentError, match="target position 0"):
        af.attribute(tr, targets=[0])
    with pytest.raises(BadArgumentError, match="span_kind='page'"):
        af.attribute(tr, span_kind="page")
    no_completion = tiny_trace()
    no_completion.prompt_lengths = [4, 2]
    with pytest.raises(BadArgumentError, match="example 0 has no completion"):
        af.attribute(no_completion)
    no_spans = tiny_trace()
    no_spans.spans = [[], []]
    with pytest.raises(BadArgumentError, match="sources='tokens'"):
        af.attribute(no_spans)
