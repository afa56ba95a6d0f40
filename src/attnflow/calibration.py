"""Content-free-query calibration: score each document by what it gets beyond what it would get anyway.

Attention-based document scores follow position as much as content (on SmolLM2, rollout
ranks the first document first in 10 of 10 HotPotQA questions).  In-Context Reranking
(Chen et al., 2024) removes that prior with a second pass: the same documents, in the
same order, under a content-free question ("N/A"), with the same completion; a
document's calibrated score is its real score minus (or divided by) its content-free one.

`attribute(trace, ..., calibrate=...)` does this for every method:

* `calibrate=<AttentionTrace>`: a content-free trace you recorded (same examples in the
  same order, the same completions); spans are matched by name and kind.
* `calibrate="content-free"` with `model=`: the content-free prompt is built from the
  trace itself (`content_free_prompts`): the tokens of each example's question span
  (kind "question", recorded by `attnflow.prompting.build_prompt` and the evaluation's
  prompts) are replaced by those of `content_free` ("N/A"); every other token is kept, so
  the documents' tokens are the same and their spans shift by the length difference.  It
  is recorded with the trace's own settings and its completion tokens (`completions=`).

    >>> text, docs = af.demo.task.render_prompt(example)     # 5 documents; the answer, madrid, is in doc2
    >>> q = text.index("question : ") + len("question : ")
    >>> spans = text_spans(tok, text, docs) + text_spans(tok, text, [("question", q, text.index("\\nanswer"))], kind="question")
    >>> t = af.trace(model, [text], spans=[spans], completions=[" madrid"], progress=False)
    >>> cal = af.attribute(t, "rollout", span_kind="document", calibrate="content-free", model=model).to_pydict()
    >>> cal["plain_score"], cal["content_free_score"]       # plain rollout ranks doc3 first; so does "N/A" (rounded)
    ([0.114, 0.141, 0.182, 0.037, 0.053], [0.179, 0.088, 0.164, 0.075, 0.087])
    >>> cal["score"], cal["rank"]                           # calibrated: doc2 first
    ([-0.065, 0.054, 0.018, -0.039, -0.034], [5, 1, 2, 4, 3])

`score` is the calibrated score (ranks follow it); `plain_score` and `content_free_score`
are the two passes' shares (`attribute`'s `score` of each), so nothing is hidden; the
accounting columns (`share`, `excluded_share`, ...) are the real pass's.  With
`calibrate_by="divide"` the score is `plain / content_free` (a content-free share of 0
counts as 1e-12).  Targets must be counted from the end ("completion", "last", negative
positions), which is where the two passes' tokens coincide.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pyarrow as pa
import torch

from attnflow.attention_trace import AttentionTrace, Span
from attnflow.attribution import text_spans  # noqa: F401  (the docstring's example)
from attnflow.errors import BadArgumentError

__all__ = ["CALIBRATE_BY", "CONTENT_FREE", "calibrated_attribution", "content_free_prompts", "content_free_trace"]

CONTENT_FREE = "N/A"  # In-Context Reranking's content-free query
CALIBRATE_BY = ("subtract", "divide")
DIVIDE_FLOOR = 1e-12
CALIBRATION_COLUMNS = ("plain_score", "content_free_score")


def question_span(trace: AttentionTrace, b: int) -> Span:
    """Example b's one span of kind "question"; BadArgumentError saying how to get one otherwise."""
    found = [s for s in trace.spans[b] if s.kind == "question"]
    if len(found) != 1:
        raise BadArgumentError(
            f"example {b} has {len(found)} question spans (kind 'question'), calibrate='content-free' needs exactly one; "
            "build the prompt with attnflow.prompting.build_prompt (it records one), or record a content-free trace "
            "yourself and pass it as calibrate="
        )
    return found[0]


def content_free_prompts(
    trace: AttentionTrace, tokenizer: Any, content_free: str = CONTENT_FREE
) -> tuple[list[list[int]], list[list[Span]], list[list[int]]]:
    """Per example: the content-free prompt ids, its spans, and the completion ids to force.

    The question span's tokens are replaced by `tokenizer(content_free)` (with the
    whitespace the question's first and last tokens carry, so " Which ... ?" becomes " N/A");
    a span after the question moves by the length difference, one around it stretches.

        >>> p = af.prompting.build_prompt("where does alice live ?", tok, documents=[af.prompting.Document("d", "bob .")])
        >>> [(s.name, s.start, s.end) for s in p.spans]          # <s> Document [1]: d / bob . / Question: where ...
        [('d', 1, 6), ('question', 7, 12)]
        >>> t = af.trace(model, [p.prompt], spans=[p.spans], completions=[" bob"], progress=False)
        >>> ids, spans, completions = content_free_prompts(t, tok, "nothing")
        >>> len(t.input_ids[0]), len(ids[0]), [(s.name, s.start, s.end) for s in spans[0]], completions
        (13, 8, [('d', 1, 6), ('question', 7, 8)], [[23]])
    """
    ids, spans, completions = [], [], []
    for b, (n, pad, P) in enumerate(zip(trace.lengths, trace.pad_offsets, trace.prompt_lengths)):
        row = trace.input_ids[b, pad : pad + n].tolist()
        q = question_span(trace, b)
        shown = trace.display(b)[q.start : q.end]
        lead = shown[0][: len(shown[0]) - len(shown[0].lstrip())] if shown else " "
        trail = shown[-1][len(shown[-1].rstrip()) :] if shown else ""
        new = list(tokenizer(lead + content_free + trail, add_special_tokens=False)["input_ids"])
        delta = len(new) - (q.end - q.start)
        moved = lambda p: p if p <= q.start else (p + delta if p >= q.end else q.start + len(new))  # noqa: E731
        chars = None if q.char_start is None else len(content_free) - (q.char_end - q.char_start)
        out = []
        for s in trace.spans[b]:
            if s == q:
                cs = q.char_start
                out.append(replace(q, end=q.start + len(new), char_end=None if cs is None else cs + len(content_free)))
                continue
            cs, ce = s.char_start, s.char_end
            if chars is not None and cs is not None:
                cs = cs if cs <= q.char_start else cs + chars
                ce = ce if ce is None or ce <= q.char_start else ce + chars
            out.append(replace(s, start=moved(s.start), end=moved(s.end), char_start=cs, char_end=ce))
        ids.append(row[: q.start] + new + row[q.end : P])
        spans.append(out)
        completions.append(row[P:])
    return ids, spans, completions


def content_free_trace(trace: AttentionTrace, model: Any, content_free: str = CONTENT_FREE, tokenizer: Any = None) -> AttentionTrace:
    """Record the content-free pass of `trace` (`content_free_prompts`) with the trace's own settings.

    `tokenizer` defaults to `model.tokenizer` (an `af.load`ed model has one).
    """
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise BadArgumentError("calibrate='content-free' needs the model's tokenizer; load the model with af.load or pass tokenizer=")
    if any(P >= n for P, n in zip(trace.prompt_lengths, trace.lengths)):
        raise BadArgumentError("calibration forces the trace's completion, but an example has none; record with max_new_tokens or completions=")
    from attnflow.tracers import trace as record

    ids, spans, completions = content_free_prompts(trace, tokenizer, content_free)
    s = trace.settings
    heads = torch.tensor(s["head_weights"]) if s.get("head_weights") is not None else s.get("heads", trace.heads)
    rows = s.get("rows")
    return record(
        model, ids, tokenizer=tokenizer, completions=completions, spans=spans, heads=heads, layers=list(trace.layers),
        rows=tuple(rows) if isinstance(rows, list) else rows, dtype=trace.patterns.dtype, remote=s.get("remote", False),
        progress=False,
    )  # fmt: skip


def calibrated_attribution(trace: AttentionTrace, calibrate: Any, *, model: Any, content_free: str, by: str, **kwargs) -> pa.Table:
    """`attribute(trace, **kwargs)` calibrated against a content-free pass (the module docstring)."""
    from attnflow.attribution import attribute, rank_scores

    if by not in CALIBRATE_BY:
        raise BadArgumentError(f"calibrate_by={by!r}; use 'subtract' or 'divide'")
    if kwargs["sources"] != "spans":
        raise BadArgumentError("calibration matches documents across two prompts, so it needs sources='spans'")
    targets = kwargs["targets"]
    if not isinstance(targets, str) and any(int(t) >= 0 for t in targets):
        raise BadArgumentError("with calibrate, give targets counted from the end ('completion', 'last' or negative positions)")
    if isinstance(kwargs["exclude_keys"], torch.Tensor):
        raise BadArgumentError("with calibrate, exclude keys by position, span kind or 'sinks' (a mask names one trace's keys)")
    if isinstance(calibrate, AttentionTrace):
        free_trace = calibrate
    elif calibrate == "content-free":
        if model is None:
            raise BadArgumentError("calibrate='content-free' records a second pass: pass model= (the model that recorded the trace)")
        free_trace = content_free_trace(trace, model, content_free)
    else:
        raise BadArgumentError(f"calibrate={calibrate!r}; use 'content-free' (with model=) or a content-free AttentionTrace")
    _check_pair(trace, free_trace)
    plain = attribute(trace, **kwargs).to_pydict()
    free = attribute(free_trace, **kwargs).to_pydict()
    ends = trace.lengths
    free_ends = free_trace.lengths
    lookup = {}  # (example, target from the end, span name, kind) -> content-free score
    for b, t, i, score in zip(free["example"], free["target"], free["source_span"], free["score"]):
        s = free_trace.spans[b][i]
        lookup[(b, t if t < 0 else t - free_ends[b], s.name, s.kind)] = score
    free_col, groups = [], {}
    for r, (b, t, i) in enumerate(zip(plain["example"], plain["target"], plain["source_span"])):
        s = trace.spans[b][i]
        key = (b, t if t < 0 else t - ends[b], s.name, s.kind)
        if key not in lookup:
            raise BadArgumentError(
                f"span {s.name!r} ({s.kind}) of example {b} has no span of that name and kind in the content-free trace; "
                "record the content-free prompt with the same documents (names) as the trace"
            )
        free_col.append(lookup[key])
        groups.setdefault((b, t), []).append(r)
    p = torch.tensor(plain["score"], dtype=torch.float64)
    f = torch.tensor(free_col, dtype=torch.float64)
    score = p - f if by == "subtract" else p / f.clamp_min(DIVIDE_FLOOR)
    rank = torch.zeros(len(p), dtype=torch.long)
    for rows in groups.values():
        rank[rows] = rank_scores(score[rows])
    table = dict(plain) | {"score": score.tolist(), "rank": rank.tolist(), "plain_score": plain["score"], "content_free_score": free_col}
    return pa.table(table, schema=calibrated_schema(kwargs["shares"]))


def calibrated_schema(shares: bool) -> pa.Schema:
    """`codec.attribution_schema("spans", shares)` with plain_score and content_free_score (float32) after rank."""
    from attnflow.codec import attribution_schema

    base = attribution_schema("spans", shares)
    at = base.get_field_index("rank") + 1
    for j, name in enumerate(CALIBRATION_COLUMNS):
        base = base.insert(at + j, pa.field(name, pa.float32()))
    return base


def _check_pair(trace: AttentionTrace, free: AttentionTrace) -> None:
    """BadArgumentError unless `free` has the same examples' completions (the calibration forces the same answer)."""
    if free.batch_size != trace.batch_size:
        raise BadArgumentError(
            f"the content-free trace holds {free.batch_size} examples, the trace {trace.batch_size}; record one per example, in order"
        )
    for b in range(trace.batch_size):
        mine = trace.input_ids[b, trace.pad_offsets[b] + trace.prompt_lengths[b] :].tolist()
        theirs = free.input_ids[b, free.pad_offsets[b] + free.prompt_lengths[b] :].tolist()
        if mine != theirs:
            raise BadArgumentError(
                f"example {b}'s completion differs between the trace and the content-free trace; "
                "record the content-free prompt with completions= the trace's completion tokens"
            )
