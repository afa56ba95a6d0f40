"""The attribution methods an evaluation compares, and their span scores.

Each method turns a batch of recorded patterns into one score per key position
from the rows that produce the answer tokens (the token at t+1 comes from query
row t), composed by `attribution.target_flow` and averaged over those rows; a
span's score is the sum over its tokens, except for maxflow: a span's max flow is the
flow from all its tokens at once (`span_scores`), at most the sum of its tokens' flows.

    name                         flow.py call                                  excluded keys
    random                       expected metrics of a uniformly random ranking  -
    raw, raw/nosink, raw/sinks   raw(A, layer=-1)  (last layer)                none / BOS / sinks
    sum, ...                     total_attention(A)
    rollout, ...                 rollout(A, alpha=0.5)
    flow, ...                    residual_flow(A)              (unnormalised)
    flow_normalized, ...         residual_flow(A, normalize=True)   (= rollout alpha 0.5 by construction)
    sum/norm/sinks, rollout/norm/sinks   the same with heads weighted by ‖W_O^h v_j‖ (Kobayashi et al. 2020)
    rollout_measured, .../sinks, rollout_measured/norm/sinks
                                 rollout mixing attention and residual by their measured norms per layer
                                 and token (Kobayashi et al. 2021; trace(norms=True))
    maxflow, maxflow/sinks       maxflow.span_max_flow(A)   (Abnar & Zuidema's attention flow, from each
                                 span as a whole: `span_scores`, not a sum over `key_scores`' tokens)
    at2                          learned [layer, head] weights x answer-row attention (`eval.at2`; held-out
                                 folds, paragraph level, fit when the report is written)
    loo                          leave-one-out log-prob drops (`eval.loo`): the reference, not attention

The eval records every head (heads="all", float16) and the norms; `key_scores` reduces
the heads once per reduction (`reduction(name)`: "norm" for the "/norm" methods, else
"mean") before composing, so each method keeps its heads="mean" meaning.  The sinks are
detected once, on the head mean, and are the same keys for every method.

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
    >>> s["rollout"].shape, len(s)                     # every attention method but maxflow (`span_scores`)
    (torch.Size([1, 27]), 20)
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
    # Kobayashi et al.: heads weighted by ‖W_O^h v_j‖ ("/norm"), and rollout with the measured residual mixing
    + (("sum/norm/sinks", "sum", "sinks"), ("rollout/norm/sinks", "rollout", "sinks"))
    + (("rollout_measured", "rollout_measured", ()), ("rollout_measured/sinks", "rollout_measured", "sinks"))
    + (("rollout_measured/norm/sinks", "rollout_measured", "sinks"),)
)
ATTENTION_NAMES = tuple(name for name, _, _ in METHODS)  # scored from one batch's trace (`key_scores`)
REFERENCE_NAMES = ("at2", "loo")  # at2: fit over the run's examples (report time); loo: ablation forwards
METHOD_NAMES = ATTENTION_NAMES + REFERENCE_NAMES
# span max flow (`span_scores`): one solve per (row, span), capacities below MAXFLOW_THRESHOLD dropped
MAXFLOW_THRESHOLD = 1e-2  # SmolLM2, 2,043 tokens: 16 CPU s per example, flows within 9.5e-2 of exact, same paragraph order (bench/maxflow.py; 1e-3: 51 s, 5.4e-2)
MAXFLOW_SPAN_MAX_TOKENS = 4096  # the capacities alone are 30 layers x n^2 float32: 2 GB at 4,096


def skip_reason(name: str, n_tokens: int) -> str | None:
    """Why method `name` has no span scores (NaN) for an example of `n_tokens` tokens, or None when it has them."""
    if name.startswith("maxflow") and n_tokens > MAXFLOW_SPAN_MAX_TOKENS:
        return f"maxflow skipped: {n_tokens} tokens > {MAXFLOW_SPAN_MAX_TOKENS} (the max-flow graph is too large)"
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


def key_scores(
    trace, rows: Sequence[Sequence[int]], methods=None, reduced: dict | None = None, sinks: Tensor | None = None
) -> dict[str, Float[Tensor, "batch key"]]:
    """Every flow method's composed rows `rows[b]` (unpadded, at least one) averaged per example: {method: [batch, key]}.

    The rows are averaged as composed (not as shares, unlike `attribute`), so an
    unnormalised flow row keeps its scale; keys are the trace's padded positions.
    `reduced` caches the head reductions made (a caller's dict keeps them); `sinks`
    is the "/sinks" key mask `[batch, key]` when the caller has it (else detected here on the head mean).
    """
    counts = torch.tensor([len(r) for r in rows])
    T = int(counts.max())
    weights = (torch.arange(T)[None, :] < counts[:, None]).float() / counts[:, None].float()  # [batch, target]
    out = {}
    reduced = {} if reduced is None else reduced  # reduction -> reduced trace; a caller's dict keeps them
    # sinks [batch, key]: detected once per batch on the head mean, the same keys for every family
    for name, method, ex in METHODS if methods is None else methods:  # (name, flow method, exclude_keys)
        if method is None:
            continue
        how = reduction(name)
        for need in {how, "mean"} if ex == "sinks" else {how}:  # the sinks are detected on the head mean
            if need not in reduced:
                reduced[need] = reduce_heads(trace, need)
        tr = reduced[how]
        if sinks is None and ex == "sinks":
            sinks = exclusion_mask(reduced["mean"], "sinks")
        excl = sinks.to(tr.patterns.device) if ex == "sinks" else ex
        if method == "maxflow":
            continue  # scored per span as a whole (`span_scores`), not per token
        else:
            # validate=False: the tracer has just recorded these patterns; checking them again per method costs ~2x
            R = target_flow(tr, rows, method, exclude_keys=excl, validate=False)  # [batch, target, key]
        out[name] = einsum(R.float(), weights.to(R.device), "batch target key, batch target -> batch key")
    return out


def reduction(name: str) -> str:
    """How method `name` reduces the recorded heads: "norm" for the "/norm" families, else "mean"."""
    return "norm" if "/norm" in name else "mean"


def reduce_heads(trace, how: str = "mean"):
    """The trace with its heads reduced once (float32 `[batch, layer, 1, query, key]`); a reduced trace as is.

    "mean" averages the heads; "norm" weighs each head's pattern by its keys' value
    norms `‖W_O^h v_j‖` (Kobayashi et al. 2020), which needs a trace recorded with
    `norms=True`; both by `flow.reduce_heads` (one layer, one head at a time: the
    float32 copy is never made of every head at once).

        >>> tr.patterns.shape, reduce_heads(tr).patterns.shape          # 8 heads -> their mean
        (torch.Size([1, 4, 8, 27, 27]), torch.Size([1, 4, 1, 27, 27]))
    """
    from dataclasses import replace

    from attnflow import flow as F

    if how not in ("mean", "norm"):
        raise BadArgumentError(f"head reduction {how!r}; the eval knows 'mean' and 'norm'")
    if trace.heads == how or (how == "mean" and trace.patterns.shape[2] == 1):
        return trace
    if trace.heads != "all":
        raise BadArgumentError(f"head reduction {how!r} needs a heads='all' trace, not heads={trace.heads!r}")
    if how == "norm" and trace.norms is None:
        raise BadArgumentError("head reduction 'norm' needs the value norms of af.trace(..., norms=True)")
    A = trace.patterns  # [batch, layer, head, query, key]
    V = trace.norms["value"].to(A.device) if how == "norm" else None  # [batch, layer, head, key]
    P = F.reduce_heads(A, how, value_norms=V).to(torch.float32)  # [batch, layer, 1, query, key]
    return replace(trace, patterns=P, heads=how)


SPAN_METHODS = tuple((name, ex) for name, method, ex in METHODS if method == "maxflow")


def span_scores(
    trace, rows: Sequence[Sequence[int]], starts: Int[Tensor, "batch span"], ends: Int[Tensor, "batch span"],
    threshold: float = MAXFLOW_THRESHOLD, sinks: Tensor | None = None,
) -> dict[str, Float[Tensor, "batch span"]]:
    """The span-level methods (maxflow, maxflow/sinks): {name: [batch, span]} float64, spans in padded coordinates.

    Each span's score is its max flow as a whole (`maxflow.span_max_flow`: a
    super-source on all its tokens) into each of the example's rows `rows[b]`
    (unpadded, at least one), averaged over the rows like `key_scores`' rows; NaN for
    an example `skip_reason` skips.  Per row, not one super-sink over the rows: the
    average keeps each term the paper's quantity (flow from the document to one
    output token, at most 1), so one answer row gives the same value either way and
    answers of different lengths stay on one scale, while a joint sink's value
    (up to the number of rows) mixes in how the rows' paths overlap.  Empty spans
    (start == end) score 0, so a batch's span lists can be right-padded.

        >>> s = span_scores(tr, [[25]], torch.tensor([[3, 10]]), torch.tensor([[8, 15]]))   # doc1, doc2
        >>> s["maxflow"].round(decimals=3)                                  # the answer, paris, is in doc1
        tensor([[0.9510, 0.5880]], dtype=torch.float64)
    """
    from attnflow.maxflow import span_max_flow

    sinks = exclusion_mask(trace, "sinks") if sinks is None else sinks.cpu()  # [batch, key], padded
    out = {name: torch.full(starts.shape, float("nan"), dtype=torch.float64) for name, _ in SPAN_METHODS}
    for b, (n, pad) in enumerate(zip(trace.lengths, trace.pad_offsets)):
        if skip_reason("maxflow", n) is not None:
            continue
        one = trace.patterns[b : b + 1, :, :, pad:, pad:]  # [1, layer, head, n, n]: unpadded
        bounds = (torch.stack([starts[b], ends[b]], -1) - pad).clamp(0, n)  # [span, 2], unpadded
        for name, ex in SPAN_METHODS:
            excl = sinks[b : b + 1, pad:] if ex == "sinks" else ex
            f = span_max_flow(one, bounds, rows=list(rows[b]), exclude_keys=excl, threshold=threshold, validate=False)  # [1, rows, span]
            out[name][b] = f[0].double().mean(0).cpu()
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
