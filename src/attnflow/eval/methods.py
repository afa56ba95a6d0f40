"""The attribution methods an evaluation compares, and their span scores.

Each method turns a batch of recorded patterns into one score per key position
from the rows that produce the answer tokens (the token at t+1 comes from query
row t), composed by `attribution.target_flow` and averaged over those rows; a
span's score is the sum over its tokens.

    name                         flow.py call                                  excluded keys
    random                       expected metrics of a uniformly random ranking  -
    raw, raw/nosink, raw/sinks   raw(A, layer=-1)  (last layer)                none / BOS / sinks
    sum, ...                     total_attention(A)
    rollout, ...                 rollout(A, alpha=0.5)
    flow, ...                    residual_flow(A)              (unnormalised)
    flow_normalized, ...         residual_flow(A, normalize=True)   (= rollout alpha 0.5 by construction)
    maxflow, maxflow/sinks       maxflow.max_flow(A)   (Abnar & Zuidema's attention flow; prompts of at
                                 most MAXFLOW_MAX_TOKENS tokens, else NaN scores and `skip_reason`)
    at2                          learned [layer, head] weights x answer-row attention (`eval.at2`; held-out
                                 folds, paragraph level, fit when the report is written)
    loo                          leave-one-out log-prob drops (`eval.loo`): the reference, not attention

The eval records every head (heads="all", float16); `key_scores` reduces the heads
once per reduction (`REDUCTION`: method family -> reduction, "mean" for every
family so far) before composing, so each method keeps its heads="mean" meaning.

"/nosink" methods pass `exclude_keys=(0,)`: the first real token's column is
zeroed and rows renormalised before composing (flow.py).  "/sinks" methods
exclude `attribution.excluded_positions(trace, "sinks")`: position 0, special
tokens and the keys detected as sinks in the example's own attention.

    >>> rows, mask = answer_rows(prompt_lengths=[4], answer_lengths=[2], pad_offsets=[1])
    >>> rows, mask                     # rows 3, 4 unpadded -> 4, 5 padded
    (tensor([[4, 5]]), tensor([[True, True]]))
    >>> tr.lengths, [(s.name, s.start, s.end) for s in tr.spans[0]]   # 26 prompt tokens + the generated one
    ([27], [('doc1', 3, 8), ('doc2', 10, 15)])
    >>> answer_rows(prompt_lengths=[26], answer_lengths=[1], pad_offsets=[0])[0]
    tensor([[25]])
    >>> s = key_scores(tr, [[25]])                                     # {method: [batch, key]}, unpadded rows
    >>> s["rollout"].shape, len(s)                                     # every attention method
    (torch.Size([1, 27]), 17)
    >>> starts, ends = torch.tensor([[3, 10]]), torch.tensor([[8, 15]])  # [batch, span]: doc1, doc2
    >>> span_sums(s["rollout"], starts, ends)                          # the answer, paris, is in doc1
    tensor([[0.30, 0.12]], dtype=torch.float64)
    >>> span_sums(s["raw"], starts, ends)                              # the last layer alone looks at doc2
    tensor([[0.14, 0.24]], dtype=torch.float64)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from einops import einsum
from jaxtyping import Bool, Float, Int
from torch import Tensor

from attnflow.attribution import exclusion_mask, target_flow
from attnflow.errors import BadArgumentError

SUFFIX = {(): "", (0,): "/nosink", "sinks": "/sinks"}
# (name, flow method, exclude_keys); "random" has no flow method
METHODS: tuple[tuple[str, str | None, tuple | str], ...] = (
    (("random", None, ()),)
    + tuple(
        (m + SUFFIX[ex], m, ex)
        for m in ("raw", "sum", "rollout", "flow", "flow_normalized")
        for ex in ((), (0,), "sinks")
    )
    + (("maxflow", "maxflow", ()), ("maxflow/sinks", "maxflow", "sinks"))
)
ATTENTION_NAMES = tuple(name for name, _, _ in METHODS)  # scored from one batch's trace (`key_scores`)
REFERENCE_NAMES = ("at2", "loo")  # at2: fit over the run's examples (report time); loo: ablation forwards
METHOD_NAMES = ATTENTION_NAMES + REFERENCE_NAMES
# how a flow method's family reduces the recorded heads before composing; a family without an entry uses "mean"
REDUCTION: dict[str, str] = {}
MAXFLOW_MAX_TOKENS = 160  # exact max flow costs ~n^3 per target row (maxflow.py): 30 layers, n=512 is 35 s a row


def skip_reason(name: str, n_tokens: int) -> str | None:
    """Why method `name` has no scores (NaN) for an example of `n_tokens` tokens, or None when it has them."""
    if name.startswith("maxflow") and n_tokens > MAXFLOW_MAX_TOKENS:
        return f"maxflow skipped: {n_tokens} tokens > {MAXFLOW_MAX_TOKENS} (exact max flow is too slow)"
    return None


def answer_rows(
    prompt_lengths: list[int], answer_lengths: list[int], pad_offsets: list[int]
) -> tuple[Int[Tensor, "batch rows"], Bool[Tensor, "batch rows"]]:
    """Padded query rows producing each example's answer tokens, right-padded by repeating the last row.

    An answer of m >= 1 tokens starting at unpadded position P is produced by rows
    P-1 .. P+m-2; an empty answer uses row P-1 (the row that chose to stop).
    """
    m = torch.tensor([max(a, 1) for a in answer_lengths])
    first = torch.tensor(prompt_lengths) - 1 + torch.tensor(pad_offsets)  # [batch]
    R = int(m.max())
    offset = torch.arange(R)
    mask = offset[None, :] < m[:, None]
    rows = first[:, None] + torch.minimum(offset[None, :], (m - 1)[:, None])
    return rows, mask


def key_scores(trace, rows: Sequence[Sequence[int]]) -> dict[str, Float[Tensor, "batch key"]]:
    """Every flow method's composed rows `rows[b]` (unpadded, at least one) averaged per example: {method: [batch, key]}.

    The rows are averaged as composed (not as shares, unlike `attribute`), so an
    unnormalised flow row keeps its scale; keys are the trace's padded positions.
    """
    counts = torch.tensor([len(r) for r in rows])
    T = int(counts.max())
    weights = (torch.arange(T)[None, :] < counts[:, None]).float() / counts[:, None].float()  # [batch, target]
    out = {}
    reduced = {}  # reduction -> (reduced trace, its sink mask)
    for name, method, ex in METHODS:
        if method is None:
            continue
        how = REDUCTION.get(method, "mean")
        if how not in reduced:
            tr = reduce_heads(trace, how)
            reduced[how] = tr, exclusion_mask(tr, "sinks").to(tr.patterns.device)  # [batch, key]: once per batch
        tr, sinks = reduced[how]
        excl = sinks if ex == "sinks" else ex
        if method == "maxflow":
            R = _maxflow_rows(tr, rows, excl)
        else:
            R = target_flow(tr, rows, method, exclude_keys=excl)  # [batch, target, key]
        out[name] = einsum(R.float(), weights.to(R.device), "batch target key, batch target -> batch key")
    return out


def reduce_heads(trace, how: str = "mean"):
    """The trace with its heads reduced once (float32 `[batch, layer, 1, query, key]`); a reduced trace as is.

    "mean" is the only reduction so far; a norm-weighted family adds its own here.

        >>> tr.patterns.shape, reduce_heads(tr).patterns.shape          # 8 heads -> their mean
        (torch.Size([1, 4, 8, 27, 27]), torch.Size([1, 4, 1, 27, 27]))
    """
    from dataclasses import replace

    if how != "mean":
        raise BadArgumentError(f"head reduction {how!r}; the eval knows 'mean'")
    if trace.patterns.shape[2] == 1:
        return trace
    P = torch.mean(trace.patterns, dim=2, keepdim=True, dtype=torch.float32)  # [batch, layer, 1, query, key]
    return replace(trace, patterns=P, heads="mean")


def _maxflow_rows(trace, rows: Sequence[Sequence[int]], excl) -> Float[Tensor, "batch target key"]:
    """max_flow shares of each example's rows (padded like `target_flow`); NaN rows for examples it skips."""
    from attnflow.maxflow import max_flow

    T = max(len(r) for r in rows)
    out = torch.zeros(trace.batch_size, T, trace.input_ids.shape[1])
    for b, (n, pad) in enumerate(zip(trace.lengths, trace.pad_offsets)):
        if skip_reason("maxflow", n) is not None:
            out[b] = float("nan")
            continue
        one = trace.patterns[b : b + 1, :, :, pad:, pad:]
        ex_b = excl[b : b + 1, pad:] if isinstance(excl, Tensor) else excl
        idx = [rows[b][min(j, len(rows[b]) - 1)] for j in range(T)]
        out[b, :, pad:] = max_flow(one, rows=idx, exclude_keys=ex_b)[0].float().cpu()
    return out


def span_sums(
    scores: Float[Tensor, "batch key"], starts: Int[Tensor, "batch span"], ends: Int[Tensor, "batch span"]
) -> Float[Tensor, "batch span"]:
    """Σ scores[b, starts[b, s]:ends[b, s]] for every span, in padded coordinates (an empty span sums to 0)."""
    cum = torch.nn.functional.pad(scores.double().cumsum(-1), (1, 0))  # [batch, key + 1]
    return cum.gather(-1, ends) - cum.gather(-1, starts)


def random_scores(n: int) -> np.ndarray:
    """The scores stored for the random baseline: uniform 1/n (its metrics are exact expectations,
    `metrics.random_expectation`, so no draw and no seed is involved)."""
    return np.full(n, 1.0 / n) if n else np.zeros(0)
