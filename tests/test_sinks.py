"""Sinks honestly accounted: exclude_keys as positions, span kinds and "sinks"; shares that add up to 1.

References: hand-built patterns with a planted sink, the flow functions composing each example alone
with plain positions, and the plain method's own rows for the excluded share.
"""

from __future__ import annotations

import pytest
import torch

import attnflow as af
from attnflow import attribution as at
from attnflow.attention_trace import AttentionTrace, Span
from attnflow.errors import BadArgumentError

SHARES = ("excluded_share", "completion_share", "other_share")


def planted_trace(layers=2, seed=0):
    """Two left-padded examples (8 and 6 tokens, prompts 6 and 5) whose key 2 (resp. 1) takes 60% of every later row."""
    g = torch.Generator().manual_seed(seed)
    B, S = 2, 8
    lengths, prompts, sinks = [8, 6], [6, 5], [2, 1]
    P = torch.zeros(B, layers, 2, S, S, dtype=torch.float64)
    for b, (n, k) in enumerate(zip(lengths, sinks)):
        pad = S - n
        A = torch.rand(layers, 2, n, n, generator=g, dtype=torch.float64).tril()
        A = A / A.sum(-1, keepdim=True)
        rows = torch.arange(n) > k
        A[..., rows, :] *= 0.4
        A[..., rows, k] += 0.6
        P[b, :, :, pad:, pad:] = A
    mask = torch.tensor([[1] * 8, [0, 0] + [1] * 6])
    qpos = torch.where(mask != 0, torch.arange(S), -1)
    spans = [
        [Span("d0", "document", 1, 3), Span("d1", "document", 3, 5), Span("q", "question", 5, 6)],
        [Span("d0", "document", 1, 2), Span("d1", "document", 2, 4), Span("q", "question", 4, 5)],
    ]
    return AttentionTrace(
        patterns=P,
        input_ids=torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11], [0, 0, 1, 5, 9, 1, 7, 8]]),
        attention_mask=mask,
        query_positions=qpos,
        tokens=[["t"] * 8, ["t"] * 6],
        prompt_lengths=prompts,
        layers=list(range(layers)),
        heads="all",
        spans=spans,
        model_info={"num_layers": layers, "special_token_ids": [1]},
    )


def test_sink_detection_finds_the_planted_keys():
    tr = planted_trace()
    assert at.sink_keys(tr) == [[2], [1]]
    assert at.sink_keys(tr, share=0.7) == [[], []]
    assert at.special_positions(tr) == [[0], [0, 3]]  # id 1 at unpadded 0 (both) and 3 (example 1)
    assert at.excluded_positions(tr, "sinks") == [[0, 2], [0, 1, 3]]
    assert at.excluded_positions(tr, ("question", -1)) == [[5, 7], [4, 5]]
    assert at.excluded_positions(tr, (0, 7)) == [[0, 7], [0]]  # past a shorter example's end: nothing there
    with pytest.raises(BadArgumentError, match=r"exclude_keys \[9\] are out of range"):  # past every example's end
        at.excluded_positions(tr, (0, 9))
    mask = at.exclusion_mask(tr, "sinks")
    assert mask.tolist() == [[True, False, True] + [False] * 5, [False, False, True, True, False, True, False, False]]
    no_record = planted_trace()
    no_record.model_info = {"num_layers": 2}
    assert at.excluded_positions(no_record, "sinks") == [[0, 2], [0, 1]]  # position 0 and the detected sinks
    with pytest.raises(BadArgumentError, match="exclude_keys names 'page'"):
        at.excluded_positions(tr, "page")


def test_a_sink_hidden_behind_another_is_found_in_a_second_round():
    tr = planted_trace(layers=1)
    g = torch.Generator().manual_seed(1)
    for i in range(5, 8):  # example 0, rows after key 4: .6 to key 2, .2 to key 4 (.5 of the rest), .2 spread
        rest = torch.rand(i + 1, generator=g, dtype=torch.float64)
        rest[[2, 4]] = 0
        tr.patterns[0, 0, :, i, : i + 1] = 0.2 * rest / rest.sum()
        tr.patterns[0, 0, :, i, 2] = 0.6
        tr.patterns[0, 0, :, i, 4] = 0.2
    assert at.sink_keys(tr, min_rows=3, rounds=1)[0] == [2]
    assert at.sink_keys(tr, min_rows=3)[0] == [2, 4]
    assert at.sink_keys(tr, min_rows=3, exclude=[[2], []])[0] == [4]
    assert at.sink_keys(tr)[0] == [2]  # key 4 is seen by 3 rows, fewer than SINK_MIN_ROWS


def test_mask_exclusion_equals_composing_each_example_alone():
    tr = planted_trace()
    keys = at.excluded_positions(tr, "sinks")
    for method in ("rollout", "flow", "sum", "raw"):
        R = at.flow_rows(tr, method, exclude_keys="sinks")
        for b in range(2):
            one = tr.item(b)
            alone = af.flow.compose(one.patterns, method, exclude_keys=keys[b])[0]
            pad = tr.pad_offsets[b]
            torch.testing.assert_close(R[b, pad:, pad:], alone, rtol=1e-12, atol=1e-14)


def test_shares_add_up_and_the_excluded_share_is_the_plain_methods():
    tr = planted_trace()
    for method in ("rollout", "flow", "sum", "raw"):
        t = af.attribute(tr, method=method, span_kind="document", reduce=None).to_pandas()
        assert t.columns.tolist()[:6] == ["example", "method", "target", "source_span", "score", "rank"]
        for (b, target), g in t.groupby(["example", "target"]):
            first = g.iloc[0]
            total = g["share"].sum() + sum(first[c] for c in SHARES)
            assert abs(total - 1) < 1e-5, (method, b, target, total)
            torch.testing.assert_close(torch.tensor(g["share"].values), torch.tensor((g["score"] * (1 - first["excluded_share"])).values))
            # the plain method's mass on the excluded keys of this example
            one = tr.item(b)
            plain = af.flow.compose(one.patterns, method)[0][target - 1]
            keys = at.excluded_positions(tr, "sinks")[b]
            assert list(first["excluded_keys"]) == keys
            assert abs(first["excluded_share"] - float(plain[keys].sum() / plain.sum())) < 1e-6
            assert first["excluded_share"] > 0.3  # the planted sink took a real share
            # completion: the target's own earlier completion tokens; other: BOS-free prompt outside documents
            kept = af.flow.compose(one.patterns, method, exclude_keys=keys)[0][target - 1]
            kept = kept / kept.sum() * (1 - first["excluded_share"])
            p = tr.prompt_lengths[b]
            assert abs(first["completion_share"] - float(kept[p:].sum())) < 1e-6
            docs = {k for s in tr.spans[b] if s.kind == "document" for k in range(s.start, s.end)}
            other = [k for k in range(p) if k not in docs]
            assert abs(first["other_share"] - float(kept[other].sum())) < 1e-6


def test_plain_attribution_reports_zero_excluded_and_defaults():
    tr = planted_trace()
    plain = af.attribute(tr, method="rollout", exclude_keys=()).to_pandas()
    assert (plain["excluded_share"] == 0).all() and (plain["share"] == plain["score"]).all()
    assert plain["excluded_keys"].map(len).eq(0).all()
    # document attribution defaults to "sinks"; other spans to no exclusion
    auto = af.attribute(tr, method="rollout", span_kind="document")
    assert auto.equals(af.attribute(tr, method="rollout", span_kind="document", exclude_keys="sinks"))
    assert af.attribute(tr, method="rollout").equals(af.attribute(tr, method="rollout", exclude_keys=()))
    assert af.attribute(tr, span_kind="document", shares=False).column_names[-1] == "rank"
    tok = af.attribute(tr, method="rollout", sources="tokens", exclude_keys="sinks", reduce=None).to_pandas()
    for _, g in tok.groupby(["example", "target"]):
        assert abs(g["share"].sum() + g["excluded_share"].iloc[0] - 1) < 1e-5
        assert g["completion_share"].iloc[0] == 0 and g["other_share"].iloc[0] == 0


def check_sums(table, tol=1e-5):
    t = table.to_pandas()
    assert len(t)
    for _, g in t.groupby(["example", "method", "target"]):
        total = g["share"].sum() + sum(g[c].iloc[0] for c in SHARES)
        assert abs(total - 1) < tol, total
    return t


def test_tiny_model_shares_add_up():
    from tiny_models import tiny_model, tiny_tokenizer

    from attnflow.tokens import special_mask

    tok = tiny_tokenizer()
    text = "<bos> doc : alice lives in paris . doc : bob lives in london . q : where does alice live ?"
    words = text.split()
    starts = [i for i, w in enumerate(words) if w == "doc"] + [words.index("q")]
    spans = [Span(f"doc {i}", "document", a, b) for i, (a, b) in enumerate(zip(starts[:-1], starts[1:]))]
    spans.append(Span("question", "question", starts[-1], len(words)))
    tr = af.trace(tiny_model("llama"), [text], tokenizer=tok, max_new_tokens=3, spans=[spans], dtype=torch.float32, progress=False)
    ids = [i for i in range(100) if special_mask(tok, [i])[0]]
    tr.model_info["special_token_ids"] = ids  # what the tracer records
    for method in ("rollout", "flow", "sum", "raw"):
        t = check_sums(af.attribute(tr, method=method, span_kind="document", reduce=None))
        assert 0 in t["excluded_keys"].iloc[0]


def test_demo_model_shares_add_up():
    from attnflow.demo import load, task
    from attnflow.demo.run import document_spans

    model = load()
    examples = task.generate(4, seed=99)
    rendered = [task.render_prompt(ex) for ex in examples]
    spans = [document_spans(model.tokenizer, text, c) for text, c in rendered]
    tr = af.trace(model, [t for t, _ in rendered], max_new_tokens=2, spans=spans, dtype=torch.float32, progress=False)
    tr.model_info["special_token_ids"] = list(model.tokenizer.all_special_ids)
    for method in ("rollout", "flow", "sum", "raw"):
        t = check_sums(af.attribute(tr, method=method, span_kind="document", reduce=None))
        assert (t["excluded_share"] > 0).all()  # <s> takes something


DOCS = [
    ("Arthur's Magazine", "Arthur's Magazine (1844-1846) was an American literary periodical published in Philadelphia."),
    ("First for Women", "First for Women is a woman's magazine published by Bauer Media Group in the USA, started in 1989."),
    ("Radio City", "Radio City is India's first private FM radio station and was started on 3 July 2001."),
]


@pytest.mark.real
def test_smollm2_sink_aware_shares_add_up(smollm2):  # noqa: F811
    from attnflow.tokens import special_mask

    tok = smollm2.tok
    body = "".join(f"Title: {t}\n{d}\n\n" for t, d in DOCS) + "Question: Which magazine was started first?"
    text = tok.apply_chat_template([{"role": "user", "content": body}], tokenize=False, add_generation_prompt=True)
    ranges = []
    for t, d in DOCS:
        a = text.index(f"Title: {t}")
        ranges.append((t, a, text.index(d) + len(d)))
    spans = at.text_spans(tok, text, ranges, add_special_tokens=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    tr = af.trace(smollm2.model, [ids], completions=[tok(" Arthur's Magazine", add_special_tokens=False)["input_ids"]],
                  spans=[spans], dtype=torch.float32, progress=False)
    tr.model_info.setdefault("special_token_ids", [i for i in range(len(tok)) if special_mask(tok, [i])[0]])
    for method in ("rollout", "flow", "sum", "raw"):
        t = check_sums(af.attribute(tr, method=method, span_kind="document", reduce=None))
        keys = t["excluded_keys"].iloc[0]
        assert 0 in keys and tr.input_ids[0, keys[0]] == tok.convert_tokens_to_ids("<|im_start|>")
        if method != "raw":
            assert t["excluded_share"].min() > 0.2  # the sinks take a large part of the composed rows (0.29-0.35 for rollout)
