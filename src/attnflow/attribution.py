"""Attribute output tokens to source spans (documents, sentences) or tokens, from composed flow rows.

    >>> tr.prompt_lengths, tr.lengths, [s.name for s in tr.spans[0]]   # a traced prompt, one generated token
    ([26], [27], ['doc1', 'doc2'])
    >>> af.attribute(tr, method="rollout", sources="spans", targets="completion", shares=False).to_pandas()
       example   method  target  source_span     score  rank
    0        0  rollout      -1            0  0.305     1
    1        0  rollout      -1            1  0.118     2

Alignment: the token at position `t + 1` is produced by query row `t`
(`producing_row(t + 1) == t`), so the scores for an output token at `t + 1` come
from row `t` of the composed matrix.  `target` in the table is the unpadded
position of the produced token; `targets="last"` explains the token after the
trace (position `n`, produced by the last row `n - 1`).

A score is a source's *share* of the target row: each composed row is divided by
its total over the example's keys (a rollout row already sums to 1, an
unnormalised flow row sums to 2^L, so "flow" and "flow_normalized" give the same
shares on row-stochastic patterns), then summed over a span's tokens and, with
`reduce`, averaged (or summed) over the target rows.  Ranks are 1 for the highest
score within an (example, target) group, ties broken by span (or token) order.

Sinks.  `exclude_keys` takes positions (`(0,)`: each example's first token), span
kinds (`"question"`: every key of the example's question spans), `"sinks"`, or a
mix (`("sinks", "question")`).  `"sinks"` is position 0, every token whose id the
tokenizer calls special (`trace.model_info["special_token_ids"]`, recorded by the
tracer: BOS, the chat template's `<|im_start|>` ...), and the keys `sink_keys`
detects in the example's own attention: keys that take more than `SINK_SHARE` of
the (layer- and head-mean) attention in most of the rows after them.  Excluded
keys' columns are zeroed and rows renormalised before composing (`attnflow.flow`).

Nothing is hidden: next to `score` (the share among the kept keys, used for the
ranks) the table reports per target `share` (the source's share of the whole
row), `excluded_share` (what the same method *without* the exclusion puts on the
excluded keys), `completion_share` (the completion's own tokens) and
`other_share` (prompt tokens outside every scored source), with
`share = score · (1 - excluded_share)`, so that over non-overlapping sources
`Σ share + excluded_share + completion_share + other_share = 1`; `excluded_keys`
lists the excluded positions of the example.  Document attribution
(`span_kind="document"`) is sink-aware by default (`exclude_keys="auto"`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch
from einops import einsum
from jaxtyping import Bool, Float, Int
from torch import Tensor

from attnflow import _checks
from attnflow import flow as F
from attnflow.errors import BadArgumentError
from attnflow.attention_trace import SPAN_KINDS, AttentionTrace, Span
from attnflow.codec import SHARE_COLUMNS, SOURCE_COLUMNS, attribution_schema

__all__ = [
    "SINK_SHARE",
    "attribute",
    "excluded_positions",
    "exclusion_mask",
    "flow_rows",
    "producing_row",
    "produced_position",
    "rank_scores",
    "reduce_targets",
    "sink_keys",
    "span_matrix",
    "span_scores",
    "target_flow",
    "target_positions",
    "text_spans",
    "validate_trace",
    "token_ranges",
]

SINK_SHARE = 0.3  # a detected sink takes more than this share of the attention ...
SINK_MIN_ROWS = 4  # ... in most of the (at least this many) rows after it
Exclude = str | Sequence[int | str] | Tensor


# ------------------------------------------------------------------------------------
# spans from character ranges (the tokenizer's offset mapping, never re-tokenised fragments)
# ------------------------------------------------------------------------------------
def token_ranges(text: str, offsets: np.ndarray, ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Token range [start, end) of each character range: the tokens whose first non-space char falls in it.

    `offsets` is the tokenizer's offset mapping `[token, 2]` for `text`.  Special
    tokens (empty offsets) belong to no range.  An empty character range gets the
    empty token range at the first token after it.

    >>> token_ranges("ab cd", np.array([[0, 0], [0, 2], [2, 5]]), [(0, 2), (3, 5)])
    [(1, 2), (2, 3)]
    """
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    not_space = np.array([not c.isspace() for c in text] + [True])
    # next_char[i]: first non-space position >= i (len(text) if none)
    idx = np.where(not_space, np.arange(len(text) + 1), len(text))
    next_char = np.minimum.accumulate(idx[::-1])[::-1]
    start, end = offsets[:, 0], offsets[:, 1]
    first = next_char[np.clip(start, 0, len(text))]
    anchor = np.where(first < end, first, start)  # a BPE token's leading space belongs to the word after it
    anchor = np.where(end > start, anchor, -1)  # special tokens: in no range
    # tokens are in text order, so "anchor >= c" is a prefix-closed test; searchsorted needs sorted anchors
    order_key = np.maximum.accumulate(np.where(anchor < 0, -1, anchor))
    out = []
    for cs, ce in ranges:
        a = int(np.searchsorted(order_key, cs, side="left"))
        b = int(np.searchsorted(order_key, ce, side="left"))
        out.append((a, max(a, b)))
    return out


def text_spans(
    tokenizer, text: str, ranges: Sequence[tuple[str, int, int]], kind: str = "document", add_special_tokens: bool = True
) -> list[Span]:
    """One Span per `(name, char_start, char_end)` of `text`, in positions of `tokenizer(text)`.

        >>> prompt, docs = af.demo.task.render_prompt(example)      # docs: [(title, char_start, char_end)]
        >>> spans = text_spans(tokenizer, prompt, docs)              # kind="document"
        >>> tr = af.trace(model, [prompt], max_new_tokens=2, spans=[spans])
    """
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    tok = token_ranges(text, np.asarray(enc["offset_mapping"]), [(a, b) for _, a, b in ranges])
    return [Span(name, kind, s, e, a, b) for (name, a, b), (s, e) in zip(ranges, tok)]


# ------------------------------------------------------------------------------------
# alignment
# ------------------------------------------------------------------------------------
def producing_row(position: int | Tensor) -> int | Tensor:
    """The query row whose output is the token at `position`: `position - 1`.

        >>> producing_row(5)
        4
    """
    return position - 1


def produced_position(row: int | Tensor) -> int | Tensor:
    """The position of the token query row `row` produces: `row + 1`.

        >>> produced_position(torch.tensor([3, 4]))
        tensor([4, 5])
    """
    return row + 1


def target_positions(trace: AttentionTrace, targets: str | Sequence[int] = "completion") -> list[list[int]]:
    """Unpadded positions of the produced tokens to explain, per example.

    `"completion"`: the completion's tokens `prompt_length .. n-1` (the first is
    produced by the prompt's last row); `"last"`: the token after the trace, `n`;
    a list of positions in `1 .. n` (negative ones count from the end: -1 is the
    trace's last token), the same for every example.

        >>> target_positions(tr, "completion")        # a prompt of 26 tokens, 1 generated
        [[26]]
        >>> target_positions(tr, "last")
        [[27]]
        >>> target_positions(tr, [-1, 5])
        [[26, 5]]
    """
    if isinstance(targets, Tensor):
        targets = targets.tolist()
    if not isinstance(targets, str) and not (isinstance(targets, (list, tuple, range)) and all(_checks.is_int(t) for t in targets)):
        raise BadArgumentError(f"targets={targets!r}; use 'completion', 'last' or a list of integer token positions")
    out = []
    for b, n in enumerate(trace.lengths):
        if isinstance(targets, str):
            if targets == "last":
                out.append([n])
            elif targets == "completion":
                p = trace.prompt_lengths[b]
                if p >= n:
                    raise BadArgumentError(
                        f"example {b} has no completion tokens (prompt length {p}, {n} tokens); use targets='last' or record with max_new_tokens"
                    )
                out.append(list(range(max(p, 1), n)))
            else:
                raise BadArgumentError(f"targets={targets!r}; use 'completion', 'last' or a list of token positions")
        else:
            pos = []
            for t in targets:
                t = int(t)
                u = n + t if t < 0 else t
                if not 1 <= u <= n:
                    raise BadArgumentError(
                        f"target position {t} is out of range for example {b} ({n} tokens); use 1..{n} (position 0 is produced by no row)"
                    )
                pos.append(u)
            out.append(pos)
    return out


# ------------------------------------------------------------------------------------
# scores
# ------------------------------------------------------------------------------------
def span_matrix(spans: Sequence[Span], n_keys: int, device=None) -> Float[Tensor, "key span"]:
    """Membership `[key, span]`: 1 where key lies in `[span.start, span.end)` (clipped to `n_keys`).

        >>> span_matrix([Span("a", "document", 0, 2), Span("b", "question", 1, 3)], 3)
        tensor([[1., 0.],
                [1., 1.],
                [0., 1.]])
    """
    keys = torch.arange(n_keys, device=device).view(-1, 1)
    starts = torch.tensor([s.start for s in spans], device=device, dtype=torch.long).view(1, -1)
    ends = torch.tensor([s.end for s in spans], device=device, dtype=torch.long).view(1, -1)
    return ((keys >= starts) & (keys < ends)).float()


def span_scores(rows: Float[Tensor, "*batch target key"], spans: Sequence[Span]) -> Float[Tensor, "*batch target span"]:
    """Sum each target row over each span's tokens (keys are unpadded positions).

        >>> span_scores(torch.tensor([[0.5, 0.3, 0.2]]), [Span("a", "document", 0, 2), Span("b", "question", 2, 3)])
        tensor([[0.8000, 0.2000]])
    """
    M = span_matrix(spans, rows.shape[-1], rows.device).to(rows.dtype)
    return einsum(rows, M, "... target key, key span -> ... target span")


def reduce_targets(scores: Float[Tensor, "*batch target source"], reduce: str | None = "mean") -> Float[Tensor, "*batch target source"]:
    """Mean or sum over the target dim (kept, of size 1), or the scores as they are for `None`.

        >>> reduce_targets(torch.tensor([[1., 0.], [0., 1.]]), "mean")
        tensor([[0.5000, 0.5000]])
    """
    if reduce is None:
        return scores
    if reduce == "mean":
        return scores.mean(-2, keepdim=True)
    if reduce == "sum":
        return scores.sum(-2, keepdim=True)
    raise BadArgumentError(f"reduce={reduce!r}; use 'mean', 'sum' or None")


def rank_scores(scores: Float[Tensor, "*batch source"]) -> Int[Tensor, "*batch source"]:
    """Rank along the last dim: 1 = highest; ties keep source order (a stable sort).

        >>> rank_scores(torch.tensor([0.2, 0.5, 0.2, 0.1]))     # the tie at 0.2: index 0 first
        tensor([2, 1, 3, 4])
    """
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    positions = torch.arange(1, scores.shape[-1] + 1, device=scores.device).expand_as(order)
    return ranks.scatter_(-1, order, positions)


# ------------------------------------------------------------------------------------
# excluded keys: positions, span kinds, sinks
# ------------------------------------------------------------------------------------
def sink_keys(
    trace: AttentionTrace, share: float = SINK_SHARE, min_rows: int = SINK_MIN_ROWS, exclude: Sequence[Sequence[int]] | None = None,
    rounds: int = 3,
) -> list[list[int]]:
    """Keys that take more than `share` of the attention in most rows after them: unpadded positions per example.

    The attention is the trace's patterns averaged over layers and heads; a key j
    is a sink when more than half of the recorded real rows i > j (at least
    `min_rows` of them) give it more than `share`.  A sink hides the next one (with
    position 0 out, SmolLM2's rows move to the template's "system" token), so the
    test is repeated up to `rounds` times on the rows renormalised without the keys
    found so far (and without `exclude`, per example, e.g. position 0 and special tokens).

    On SmolLM2 and a 1,117-token HotPotQA chat prompt, `sink_keys` finds [[0]] (<|im_start|>),
    and [[]] with `exclude=[[0]]`: no other key takes > 30% of the rest in most rows.  The demo
    model has no sink; with a lower `share` its prompt's answer word ("paris", position 6) is one:

        >>> sink_keys(tr)
        [[]]
        >>> sink_keys(tr, share=0.1)
        [[6]]
    """
    if not 0.0 < share < 1.0:
        raise BadArgumentError(f"share={share}; use a share of the row in (0, 1)")
    P = trace.patterns
    mean = torch.zeros(P.shape[0], P.shape[3], P.shape[4], dtype=torch.float32, device=P.device)
    for l in range(P.shape[1]):  # one layer at a time: no float32 copy of the whole trace
        mean += F.reduce_heads(P[:, l : l + 1])[:, 0, 0].float()
    mean /= P.shape[1]  # [batch, query, key]
    qpos = trace.query_positions.to(P.device)  # [batch, query], padded, -1 = no row
    keys = torch.arange(P.shape[-1], device=P.device)
    after = (qpos[..., None] > keys) & (qpos[..., None] >= 0)  # [batch, query, key]: real rows after the key
    seen = after.sum(1)  # [batch, key]
    real = trace.attention_mask.to(P.device) != 0
    dropped = torch.zeros_like(real)
    for b, (ks, pad) in enumerate(zip(exclude or [], trace.pad_offsets)):
        dropped[b, [pad + k for k in ks]] = True
    found = torch.zeros_like(real)
    for _ in range(rounds):
        kept = mean * ~(dropped | found)[:, None, :]
        kept = kept / kept.sum(-1, keepdim=True).clamp_min(1e-30)
        hits = ((kept > share) & after).sum(1)
        new = (seen >= min_rows) & (2 * hits > seen) & real & ~(dropped | found)
        if not bool(new.any()):
            break
        found |= new
    return [[int(k) - pad for k in found[b].nonzero()[:, 0].tolist()] for b, pad in enumerate(trace.pad_offsets)]


def special_positions(trace: AttentionTrace) -> list[list[int]] | None:
    """Unpadded positions of the tokens whose id is special (`model_info["special_token_ids"]`); None when unrecorded."""
    ids = trace.model_info.get("special_token_ids")
    if ids is None:
        return None
    special = torch.isin(trace.input_ids.cpu(), torch.tensor(sorted(int(i) for i in ids), dtype=torch.long))
    special &= trace.attention_mask.cpu() != 0
    return [[int(k) - pad for k in special[b].nonzero()[:, 0].tolist()] for b, pad in enumerate(trace.pad_offsets)]


def excluded_positions(trace: AttentionTrace, exclude_keys: Exclude = "sinks") -> list[list[int]]:
    """The unpadded key positions `exclude_keys` names in each example, sorted.

    Ints are positions among the example's keys (negative ones from the end; past a
    shorter example's end they name nothing there, past every example's end they are a
    BadArgumentError); strings are span kinds (`SPAN_KINDS`) or
    `"sinks"`: position 0, special tokens and `sink_keys`.

    On a SmolLM2 chat prompt, `"sinks"` gives [[0, 19, 21, 1111, 1113]]: <|im_start|> <|im_end|>
    <|im_start|> ... <|im_end|> <|im_start|>.  On the demo trace it is position 0 (`<s>`) alone:

        >>> excluded_positions(tr, "sinks")
        [[0]]
        >>> excluded_positions(tr, (0, "document"))   # position 0 and the two documents' tokens
        [[0, 3, 4, 5, 6, 7, 10, 11, 12, 13, 14]]
    """
    items = _exclude_items(exclude_keys)
    out: list[set[int]] = [set() for _ in range(trace.batch_size)]
    lengths = trace.lengths
    _check_key_range([k for k in items if not isinstance(k, str)], max(lengths))
    for item in items:
        if isinstance(item, str):
            if item == "sinks":
                known = [[0, *sp] for sp in special_positions(trace) or [[] for _ in lengths]]
                for b, (kn, sk) in enumerate(zip(known, sink_keys(trace, exclude=known))):
                    out[b] |= {*kn, *sk}
            elif item in SPAN_KINDS:
                for b, spans in enumerate(trace.spans):
                    out[b] |= {k for sp in spans if sp.kind == item for k in range(sp.start, min(sp.end, lengths[b]))}
            else:
                raise BadArgumentError(f"exclude_keys names {item!r}; use positions, 'sinks' or a span kind ({', '.join(SPAN_KINDS)})")
        else:
            k = int(item)
            for b, n in enumerate(lengths):
                u = n + k if k < 0 else k
                if 0 <= u < n:
                    out[b].add(u)
    return [sorted(x) for x in out]


def _exclude_items(exclude_keys: Exclude) -> list[int | str]:
    """`exclude_keys` as a list of integer positions and names, else BadArgumentError."""
    items = [exclude_keys] if isinstance(exclude_keys, str) else exclude_keys
    if isinstance(items, (list, tuple, range)) and all(isinstance(k, str) or _checks.is_int(k) for k in items):
        return list(items)
    raise BadArgumentError(
        f"exclude_keys={exclude_keys!r}; use integer key positions, 'sinks', span kinds ({', '.join(SPAN_KINDS)}) "
        "or a bool key mask [batch, key]"
    )


def _check_key_range(keys: list[int], n: int) -> None:
    """A position no example has (of the longest, `n` keys) names nothing: a BadArgumentError, not a silent no-op."""
    bad = [k for k in keys if not -n <= k < n]
    if bad:
        raise BadArgumentError(f"exclude_keys {bad} are out of range: the longest example has {n} keys; use {-n}..{n - 1}")


def exclusion_mask(trace: AttentionTrace, exclude_keys: Exclude = "sinks") -> Bool[Tensor, "batch key"]:
    """`excluded_positions` as a key mask `[batch, key]` in the trace's padded coordinates (True = excluded).

    It is what `attnflow.flow` takes as `exclude_keys` to leave different keys out of each example.
    """
    mask = torch.zeros(trace.input_ids.shape, dtype=torch.bool)
    for b, (keys, pad) in enumerate(zip(excluded_positions(trace, exclude_keys), trace.pad_offsets)):
        mask[b, [pad + k for k in keys]] = True
    return mask


def _flow_exclusion(trace: AttentionTrace, exclude_keys: Exclude) -> tuple[int, ...] | Tensor:
    """What `attnflow.flow` takes: plain positions pass through, anything naming kinds or sinks becomes a mask."""
    if isinstance(exclude_keys, Tensor):
        return exclude_keys
    items = _exclude_items(exclude_keys)
    if all(not isinstance(k, str) for k in items):
        _check_key_range(items, max(trace.lengths))
        return tuple(int(k) for k in items)
    return exclusion_mask(trace, items).to(trace.patterns.device)


# ------------------------------------------------------------------------------------
# composing a trace
# ------------------------------------------------------------------------------------
def flow_rows(
    trace: AttentionTrace,
    method: str = "flow",
    *,
    alpha: float = 0.5,
    exclude_keys: Exclude = (),
    heads: F.Heads = "mean",
    validate: bool = True,
) -> Float[Tensor, "batch query key"]:
    """The composed matrix of every recorded query row, in the trace's padded coordinates.

    Rows line up with `trace.query_positions` and keys with `trace.input_ids`, so
    the result goes straight to the exporters:

        >>> R = flow_rows(tr, "rollout", exclude_keys=(0,))          # [batch, query, key]
        >>> R.shape
        torch.Size([1, 27, 27])
        >>> af.exporters.to_parquet(tr, "run/", flow={"rollout": R})
        PosixPath('run')

    Composed methods need a trace recorded with every query row and every layer;
    `method="raw"` (the last recorded layer) works on any trace.  `exclude_keys`
    takes positions, span kinds or `"sinks"` (see the module docstring).  `validate` checks the
    patterns as `attnflow.flow` does (`validate_trace` says when it applies).
    """
    _check_method(method)
    _check_trace(trace)
    _check_composable(trace, method)
    return F.compose(trace.patterns, method, **_flow_kwargs(trace, alpha, exclude_keys, heads, validate, method))


def target_flow(
    trace: AttentionTrace,
    rows: Sequence[Sequence[int]],
    method: str = "flow",
    *,
    alpha: float = 0.5,
    exclude_keys: Exclude = (),
    heads: F.Heads = "mean",
    validate: bool = True,
) -> Float[Tensor, "batch target key"]:
    """Composed rows `rows[b]` (unpadded query rows) of each example: `[batch, max |rows|, key]`.

    Only those rows are computed (top-down, `O(L·|T|·N²)`).  Keys are padded
    positions; example b's rows beyond `len(rows[b])` repeat its last row (ignore them).
    """
    _check_method(method)
    _check_trace(trace)
    _check_composable(trace, method)
    B = trace.batch_size
    T = max((len(r) for r in rows), default=0)
    if T == 0:
        raise BadArgumentError("no target rows to compose; every example needs at least one target")
    pads = trace.pad_offsets
    idx = torch.tensor([[pads[b] + r[min(j, len(r) - 1)] for j in range(T)] if r else [0] * T for b, r in enumerate(rows)])
    if method == "raw":
        idx = _query_index(trace, idx)
    kw = _flow_kwargs(trace, alpha, exclude_keys, heads, validate, method)
    return F.compose(trace.patterns, method, rows=idx.to(trace.patterns.device), **kw)


def _measured_norms(trace: AttentionTrace) -> dict[str, Tensor]:
    """`attn_norms` / `residual_norms` for rollout_measured, from `trace.norms` (padded query positions)."""
    what = "method='rollout_measured'"
    return {"attn_norms": _recorded_norms(trace, "attn", what), "residual_norms": _recorded_norms(trace, "residual", what)}


def _recorded_norms(trace: AttentionTrace, key: str, what: str) -> Tensor:
    if trace.norms is None:
        raise BadArgumentError(f"{what} needs the norms recorded with af.trace(..., norms=True); record the trace with them")
    return trace.norms[key].to(trace.patterns.device)


def _query_index(trace: AttentionTrace, padded_rows: Int[Tensor, "batch target"]) -> Int[Tensor, "batch target"]:
    """Index in the trace's query dim of each padded row position; error if a row was not recorded."""
    qpos = trace.query_positions.cpu()
    hit = qpos.unsqueeze(1) == padded_rows.unsqueeze(-1)  # [batch, target, query]
    missing = ~hit.any(-1)
    if missing.any():
        b, j = (int(v) for v in missing.nonzero()[0])
        row = int(padded_rows[b, j]) - trace.pad_offsets[b]
        raise BadArgumentError(f"query row {row} of example {b} was not recorded; record it (e.g. rows=None) or pick recorded targets")
    return hit.long().argmax(-1)


def _flow_kwargs(trace: AttentionTrace, alpha, exclude_keys, heads, validate: bool = True, method: str = "") -> dict:
    """What `F.compose` takes besides the patterns; the norms recorded with trace(norms=True) where the method or
    heads="norm" needs them."""
    extra = {}
    if method == "rollout_measured":  # the mixing weights come from the attention-output and residual norms
        extra |= _measured_norms(trace)
    if isinstance(heads, str) and heads == "norm" and trace.heads == "all":
        extra["value_norms"] = _recorded_norms(trace, "value", "heads='norm'")
    return extra | {
        "heads": _trace_heads(trace, heads),
        "exclude_keys": _flow_exclusion(trace, exclude_keys),
        "key_mask": trace.attention_mask.to(trace.patterns.device),
        "alpha": F.check_alpha(alpha),  # used by rollout only; checked for every method
        "validate": _checks.flag("validate", validate) and validate_trace(trace),
    }


def validate_trace(trace: AttentionTrace) -> bool:
    """Whether a trace's rows should sum to 1 (or 0): not when heads were reduced with "max", nor with attention sinks.

    A model with attention sinks (gpt-oss) gives part of each row to a sink logit that is no key, so
    its recorded rows sum to less than 1; the tracer marks it in `model_info["attention_sinks"]`.

        >>> validate_trace(tr)
        True
    """
    return trace.heads != "max" and not trace.model_info.get("attention_sinks", False)


def _check_trace(trace: AttentionTrace) -> None:
    _checks.instance("trace", trace, AttentionTrace, "an attnflow.AttentionTrace (af.trace or AttentionTrace.load)")


def _trace_heads(trace: AttentionTrace, heads: F.Heads) -> F.Heads:
    if isinstance(heads, str):
        F._head_weights(heads, None, 1, trace.patterns)  # an unknown mode fails here, before anything is composed
        return heads
    if not isinstance(heads, Tensor):
        raise BadArgumentError(f"heads={heads!r}; use 'mean', 'max', 'norm' or a weight tensor [layer, head]")
    if trace.patterns.shape[2] == 1 and trace.heads != "all":
        raise BadArgumentError(f"the trace's heads were reduced when recorded (heads={trace.heads!r}); pass heads='mean'")
    if heads.ndim == 2 and heads.shape[0] != len(trace.layers) and heads.shape[0] > max(trace.layers):
        return heads[list(trace.layers)]  # weights for every model layer: keep the recorded ones
    return heads


def _check_method(method: str) -> None:
    if method not in F.METHODS:
        raise BadArgumentError(f"method={method!r}; use one of {', '.join(F.METHODS)}")


def _check_composable(trace: AttentionTrace, method: str) -> None:
    """Composed methods need every query row and every layer; say how to record them."""
    if method == "raw":
        return
    B, S = trace.input_ids.shape
    all_rows = torch.where(trace.attention_mask.cpu() != 0, torch.arange(S), -1)
    full_rows = trace.patterns.shape[3] == S and torch.equal(trace.query_positions.cpu(), all_rows)
    num_layers = trace.model_info.get("num_layers")
    full_layers = num_layers is None or list(trace.layers) == list(range(int(num_layers)))
    if not (full_rows and full_layers):
        what = "a subset of query rows" if not full_rows else f"layers {list(trace.layers)} of {num_layers}"
        raise BadArgumentError(
            f"method={method!r} composes every layer over every row, but this trace holds {what}; "
            "record with rows=None and layers=None (all layers), or use method='raw'"
        )


# ------------------------------------------------------------------------------------
# the table
# ------------------------------------------------------------------------------------
def attribute(
    trace: AttentionTrace,
    method: str = "flow",
    sources: str = "spans",
    targets: str | Sequence[int] = "completion",
    reduce: str | None = "mean",
    alpha: float = 0.5,
    exclude_keys: Exclude = "auto",
    heads: F.Heads = "mean",
    span_kind: str | None = None,
    shares: bool = True,
    validate: bool = True,
    *,
    calibrate: str | AttentionTrace | None = None,
    model=None,
    content_free: str = "N/A",
    calibrate_by: str = "subtract",
) -> pa.Table:
    """Score sources (spans or tokens) for target tokens: a pyarrow Table (`.to_pandas()` for a DataFrame).

    Columns: example int32, method string, target int32 (unpadded position of the
    produced token; -1 when `reduce` merged the targets), `source_span` int32
    (index into `trace.spans[example]`, the spans table's `span_id`) or
    `source_token` int32 (unpadded key position), score float32 (the source's
    share of the target row among the kept keys), rank int32 (1 = best within
    example and target); with `shares` (the default) also share, excluded_share,
    completion_share, other_share float32 and excluded_keys list<int32> (the
    module docstring says what they mean; they add up to 1 over non-overlapping sources).

        >>> tr.spans[0]
        [Span(name='doc1', kind='document', start=3, end=8, char_start=7, char_end=29),
         Span(name='doc2', kind='document', start=10, end=15, char_start=37, char_end=53)]
        >>> af.attribute(tr, method="rollout", span_kind="document", shares=False).to_pydict()   # scores rounded
        {'example': [0, 0], 'method': ['rollout', 'rollout'], 'target': [-1, -1],
         'source_span': [0, 1], 'score': [0.35, 0.13], 'rank': [1, 2]}
        >>> t = af.attribute(tr, method="rollout", span_kind="document", reduce=None).to_pydict()
        >>> t["target"], t["excluded_keys"][0], t["share"], t["excluded_share"][0], t["other_share"][0]
        ([26, 26], [0], [0.302, 0.108], 0.140, 0.450)

    With `reduce=None` there is one group per target token, `target` naming the
    produced token's position; `sources="tokens"` scores every key position.

    Only the target rows are composed (top-down).  `method` is one of rollout,
    flow, flow_normalized, sum, raw; `alpha` applies to rollout; `heads` is passed
    to `attnflow.flow`.  `exclude_keys` takes positions, span kinds or `"sinks"`;
    the default `"auto"` is `"sinks"` for document attribution (`span_kind="document"`)
    and no exclusion otherwise: pass `exclude_keys=()` for the plain method.  `validate` checks
    the patterns once per call, as `attnflow.flow` does (`validate=False` skips it).

    Calibration (`attnflow.calibration`): `calibrate="content-free"` with `model=` records a
    second pass with each example's question span replaced by `content_free` ("N/A"), the same
    documents and the same completion; `calibrate=<AttentionTrace>` takes one you recorded
    (spans matched by name).  `score` is then the real pass's minus the content-free pass's
    (`calibrate_by="divide"`: their ratio), ranks follow it, and `plain_score` and
    `content_free_score` hold the two passes' scores:

        >>> text = "doc1 : alice lives in paris .\\ndoc2 : bob owns a cat .\\nquestion : n/a\\nanswer :"   # no question
        >>> spans = text_spans(tok, text, [("doc1", 7, 29), ("doc2", 37, 53)])         # tr's documents, by name
        >>> free = af.trace(model, [text], spans=[spans], completions=[tr.input_ids[0, -1:].tolist()], progress=False)
        >>> cal = af.attribute(tr, "rollout", span_kind="document", calibrate=free, shares=False)
        >>> t = cal.to_pydict(); t["score"], t["rank"], t["plain_score"], t["content_free_score"]   # rounded
        ([0.068, -0.100], [1, 2], [0.352, 0.125], [0.284, 0.225])
    """
    if calibrate is not None:
        from attnflow.calibration import calibrated_attribution

        kw = dict(method=method, sources=sources, targets=targets, reduce=reduce, alpha=alpha, exclude_keys=exclude_keys,
                  heads=heads, span_kind=span_kind, shares=shares, validate=validate)  # fmt: skip
        return calibrated_attribution(trace, calibrate, model=model, content_free=content_free, by=calibrate_by, **kw)
    _check_method(method)
    _check_trace(trace)
    F.check_alpha(alpha)
    shares = _checks.flag("shares", shares)
    _trace_heads(trace, heads)
    if sources not in SOURCE_COLUMNS:
        raise BadArgumentError(f"sources={sources!r}; use 'spans' or 'tokens'")
    if span_kind is not None and span_kind not in SPAN_KINDS:
        raise BadArgumentError(f"span_kind={span_kind!r}; use one of {', '.join(SPAN_KINDS)} or None")
    reduce_targets(torch.zeros(1, 1), reduce)  # validates `reduce`
    positions = target_positions(trace, targets)
    spans = [[(i, s) for i, s in enumerate(ex) if span_kind is None or s.kind == span_kind] for ex in trace.spans]
    if sources == "spans" and not any(spans):
        kind = f" of kind {span_kind!r}" if span_kind else ""
        raise BadArgumentError(f"the trace has no spans{kind}; use sources='tokens' or give the trace spans")
    if isinstance(exclude_keys, str) and exclude_keys == "auto":
        exclude_keys = "sinks" if span_kind == "document" else ()

    rows = [[producing_row(t) for t in ts] for ts in positions]
    excl = _flow_exclusion(trace, exclude_keys)
    R = target_flow(trace, rows, method, alpha=alpha, exclude_keys=excl, heads=heads, validate=validate).detach().float().cpu()
    drop = _drop_mask(trace, excl)  # [batch, key] padded, or None without exclusion
    plain = None
    if drop is not None and shares:  # what the method gives the excluded keys when it keeps them
        plain = target_flow(trace, rows, method, alpha=alpha, exclude_keys=(), heads=heads, validate=False).detach().float().cpu()
    table = {name: [] for name in attribution_schema(sources, shares).names}
    for b, (n, pad) in enumerate(zip(trace.lengths, trace.pad_offsets)):
        T = len(rows[b])
        keep = torch.ones(n) if drop is None else (~drop[b, pad : pad + n]).float()  # [key]
        X = R[b, :T, pad : pad + n] * keep  # [target, key], unpadded keys, kept ones
        X = X / _nonzero(X.sum(-1, keepdim=True))  # shares of the kept keys
        if sources == "spans":
            ids = [i for i, _ in spans[b]]
            if not ids:
                continue
            scores = span_scores(X, [s for _, s in spans[b]])
        else:
            ids = list(range(n))
            scores = X
        ranks = rank_scores(reduce_targets(scores, reduce))
        target_col = [-1] if reduce is not None else positions[b]
        cols = {"score": reduce_targets(scores, reduce), "rank": ranks}
        if shares:
            cols |= _accounting(X, scores, keep, plain, b, pad, n, trace.prompt_lengths[b], spans[b] if sources == "spans" else None, reduce)
            excluded = torch.nonzero(keep == 0)[:, 0].tolist()
        for j, t in enumerate(target_col):
            table["example"] += [b] * len(ids)
            table["method"] += [method] * len(ids)
            table["target"] += [t] * len(ids)
            table[SOURCE_COLUMNS[sources]] += ids
            table["score"] += cols["score"][j].tolist()
            table["rank"] += cols["rank"][j].tolist()
            if shares:
                table["share"] += cols["share"][j].tolist()
                for c in SHARE_COLUMNS[1:]:
                    table[c] += [float(cols[c][j])] * len(ids)
                table["excluded_keys"] += [excluded] * len(ids)
    return pa.table(table, schema=attribution_schema(sources, shares))


def _nonzero(x: Tensor) -> Tensor:
    return torch.where(x != 0, x, torch.ones_like(x))


def _drop_mask(trace: AttentionTrace, excl: tuple[int, ...] | Tensor) -> Bool[Tensor, "batch key"] | None:
    """The excluded keys as a padded mask, or None when nothing is excluded."""
    if isinstance(excl, Tensor):
        return excl.cpu()
    return exclusion_mask(trace, excl) if excl else None


def _accounting(
    X: Float[Tensor, "target key"], scores: Tensor, keep: Tensor, plain: Tensor | None, b: int, pad: int, n: int,
    prompt_length: int, spans: list | None, reduce: str | None,
) -> dict[str, Tensor]:
    """share, excluded_share, completion_share, other_share of each target row (reduced like the scores)."""
    T = X.shape[0]
    excluded = torch.zeros(T)
    if plain is not None:
        P = plain[b, :T, pad : pad + n]  # [target, key]: the method without the exclusion
        excluded = (P * (1 - keep)).sum(-1) / _nonzero(P.sum(-1))
    scale = (1 - excluded)[:, None]  # the kept keys' part of the whole row
    covered = torch.zeros(n, dtype=torch.bool)
    if spans is None:  # tokens: every kept key is a source
        covered[:] = True
    else:
        for _, s in spans:
            covered[s.start : min(s.end, n)] = True
    completion = torch.arange(n) >= prompt_length
    rest = X * ~covered  # kept mass outside every source
    out = {
        "share": scores * scale,
        "excluded_share": excluded[:, None],
        "completion_share": (rest * completion).sum(-1, keepdim=True) * scale,
        "other_share": (rest * ~completion).sum(-1, keepdim=True) * scale,
    }
    return {k: reduce_targets(v, reduce)[..., 0] if k != "share" else reduce_targets(v, reduce) for k, v in out.items()}
