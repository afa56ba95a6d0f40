"""The attribution methods an evaluation compares, and their span scores.

Each method turns a batch of recorded patterns into one score per key position
from the rows that produce the answer tokens (the token at t+1 comes from query
row t), composed by `attribution.target_flow` and averaged over those rows; a
span's score is the sum over its tokens.

    name                    flow.py call                                  BOS sink
    random                  expected metrics of a uniformly random ranking  -
    raw, raw/nosink         raw(A, layer=-1)  (last layer)                kept / excluded
    sum, sum/nosink         total_attention(A)
    rollout, ...            rollout(A, alpha=0.5)
    flow, ...               residual_flow(A)              (unnormalised)
    flow_normalized, ...    residual_flow(A, normalize=True)   (= rollout alpha 0.5 by construction)

"/nosink" methods pass `exclude_keys=(0,)`: the first real token's column is
zeroed and rows renormalised before composing (flow.py).

    >>> rows, mask = answer_rows(prompt_lengths=[4], answer_lengths=[2], pad_offsets=[1])
    >>> rows, mask                     # rows 3, 4 unpadded -> 4, 5 padded
    (tensor([[4, 5]]), tensor([[True, True]]))
    >>> s = key_scores(tr, [[3, 4]])                                   # {method: [batch, key]}, unpadded rows
    >>> span_sums(s["rollout"], starts, ends)                          # [batch, span]
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from einops import einsum
from jaxtyping import Bool, Float, Int
from torch import Tensor

from attnflow.attribution import target_flow

# (name, flow method, exclude the first-token sink); "random" has no flow method
METHODS: tuple[tuple[str, str | None, bool], ...] = (("random", None, False),) + tuple(
    (f"{m}/nosink" if sink else m, m, sink)
    for m in ("raw", "sum", "rollout", "flow", "flow_normalized")
    for sink in (False, True)
)
METHOD_NAMES = tuple(name for name, _, _ in METHODS)


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
    for name, method, sink in METHODS:
        if method is None:
            continue
        R = target_flow(trace, rows, method, exclude_keys=(0,) if sink else ())  # [batch, target, key]
        out[name] = einsum(R.float(), weights.to(R.device), "batch target key, batch target -> batch key")
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
