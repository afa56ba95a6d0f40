"""The flow graph: where one output token's rollout mass travels, layer by layer, pruned to what can be drawn.

Levels run from 0 (the token embeddings) to L (after the last layer); layer l
connects level l+1 (above) to level l (below).  The top level holds one node, the
query row q that produces the chosen output token.  Going down, the mass on each
node is split by that layer's rollout step

    M_l = rownorm(alpha·Ā_l' + (1-alpha)·I)        Ā_l' = Ā_l with excluded keys zeroed, rows renormalised
    s_L = e_q,    s_l = s_{l+1} · M_l              (the composed row, top-down as flow.rollout(rows=[q]))

so the edge j -> i of layer l carries `s_{l+1}[j] · M_l[j, i]`.  The edges of a
layer sum to 1 (rollout rows are stochastic), hence keeping edges of weight >= tau
leaves at most 1/tau per layer whatever the prompt length; `top_k` keeps the k
heaviest instead.  The bottom level `s_0` is exactly `flow.rollout(A, rows=[q])[0]`.

    >>> A = torch.tensor([[[1., 0.], [.5, .5]]] * 2)           # layer query key: 2 layers, 2 tokens
    >>> g = flow_graph(A, target_row=1, tau=0.1, exclude_keys=())
    >>> g["bottom"]                                             # = rollout(A[None, :, None], rows=[1])
    [0.4375, 0.5625]
    >>> [e[:2] for e in g["edges"][0]]                          # layer 0: (source at level 1, destination at level 0)
    [[1, 1], [0, 0], [1, 0]]

Token columns that no drawn edge touches fold into gaps (`columns` lists
`{"pos": i}` and `{"gap": [start, end]}` entries), so the page never lays out
thousands of empty columns.  With exclusion on (the default, key 0: the BOS
sink), `sink_share` is the share of the target's unexcluded rollout row the
excluded keys would have taken.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from attnflow.errors import BadArgumentError, ShapeError

__all__ = ["flow_graph", "layer_steps", "fold_columns"]

DIGITS = 5  # edge weights and node masses are drawn, not computed with: 1e-5 keeps /graph small


def layer_steps(
    A: Float[Tensor, "layer query key"], alpha: float = 0.5, exclude_keys: Sequence[int] = (0,)
) -> Float[Tensor, "layer query key"]:
    """The rollout step matrix `M_l` of every layer (float32; float64 for float64 input), rows summing to 1.

    Same gains as `flow.FlowAccumulator` on one unpadded example: a row whose whole
    mass sits on excluded keys keeps only its identity part.
    """
    A = A.double() if A.dtype == torch.float64 else A.float()
    L, N, _ = A.shape
    keep = torch.ones(N, dtype=A.dtype, device=A.device)
    for k in exclude_keys:
        if not -N <= int(k) < N:
            raise BadArgumentError(f"exclude key {k} is out of range for {N} tokens")
        keep[int(k)] = 0.0
    P = A * keep  # [layer, query, key]
    kept = P.sum(-1)  # [layer, query]
    a = torch.where(kept != 0, 1 / kept, torch.zeros_like(kept)) if exclude_keys else torch.ones_like(kept)
    d = alpha * a * kept + (1 - alpha)
    inv = torch.where(d != 0, 1 / d.clamp(min=torch.finfo(d.dtype).tiny), torch.zeros_like(d))  # alpha 1, all excluded: row 0
    g, h = alpha * a * inv, (1 - alpha) * inv  # [layer, query]
    return g[..., None] * P + torch.diag_embed(h)


def composed_levels(M: Float[Tensor, "layer query key"], target_row: int) -> Float[Tensor, "level key"]:
    """`s_l` for l = 0..L (row l = level l); s_L is the one-hot target row."""
    L, N, _ = M.shape
    s = torch.zeros(N, dtype=M.dtype, device=M.device)
    s[target_row] = 1.0
    levels = [s]
    for l in reversed(range(L)):
        s = s @ M[l]  # [key]
        levels.append(s)
    return torch.stack(levels[::-1])  # [level, key]


def _layer_edges(s_up: Tensor, M_l: Tensor, tau: float | None, top_k: int | None) -> list[list]:
    """[[source, destination, weight], ...] of one layer, heaviest first."""
    if top_k is not None:
        E = s_up[:, None] * M_l  # [query, key]
        w, flat = E.flatten().topk(min(top_k, E.numel()))
        keep = w > 0
        w, flat = w[keep], flat[keep]
        src, dst = flat // E.shape[1], flat % E.shape[1]
    else:
        rows = torch.nonzero(s_up >= tau).squeeze(1)  # an edge >= tau needs a source >= tau: M rows sum to 1
        E = s_up[rows, None] * M_l[rows]  # [source, key]
        r, dst = torch.nonzero(E >= tau, as_tuple=True)
        w, src = E[r, dst], rows[r]
        order = torch.argsort(w, descending=True)
        w, src, dst = w[order], src[order], dst[order]
    return [[int(a), int(b), round(c, DIGITS)] for a, b, c in zip(src.tolist(), dst.tolist(), w.tolist())]


def fold_columns(drawn: set[int], n: int) -> list[dict]:
    """Columns of the drawn positions, runs of the others folded into gaps.

        >>> fold_columns({0, 5, 6}, 9)
        [{'pos': 0}, {'gap': [1, 5]}, {'pos': 5}, {'pos': 6}, {'gap': [7, 9]}]
    """
    out, start = [], None
    for i in range(n):
        if i in drawn:
            if start is not None:
                out.append({"gap": [start, i]})
                start = None
            out.append({"pos": i})
        elif start is None:
            start = i
    if start is not None:
        out.append({"gap": [start, n]})
    return out


def flow_graph(
    A: Float[Tensor, "layer query key"],
    target_row: int,
    tau: float | None = 0.01,
    top_k: int | None = None,
    alpha: float = 0.5,
    exclude_keys: Sequence[int] = (0,),
) -> dict:
    """The pruned flow graph of query row `target_row` over head-mean patterns `A` of one unpadded example.

    Returns a JSON-ready dict: `edges` (one list per layer l of [source at level l+1,
    destination at level l, weight]), `nodes` (one list per level of [position, mass]
    for drawn positions), `bottom` (s_0 over every key), `columns`, `sink_share`,
    `edge_counts`, and the settings.  Edge weights and node masses are rounded to
    DIGITS decimals; `bottom` is exact.
    """
    if A.ndim != 3 or A.shape[-1] != A.shape[-2]:
        raise ShapeError(f"patterns have shape {tuple(A.shape)}, expected (layer, query, key) with query == key")
    L, N, _ = A.shape
    if not -N <= target_row < N:
        raise BadArgumentError(f"target row {target_row} is out of range for {N} tokens")
    target_row %= N
    if top_k is None and (tau is None or not 0 < tau <= 1):
        raise BadArgumentError(f"tau={tau!r}; use a threshold in (0, 1] (e.g. 0.01) or give top_k")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise BadArgumentError(f"top_k={top_k!r}; use a positive integer")
    if not 0.0 <= alpha <= 1.0:
        raise BadArgumentError(f"alpha={alpha}; use a value in [0, 1]")
    exclude = tuple(sorted({int(k) % N for k in exclude_keys}))
    M = layer_steps(A, alpha, exclude)
    s = composed_levels(M, target_row)  # [level, key]
    edges = [_layer_edges(s[l + 1], M[l], tau, top_k) for l in range(L)]
    drawn_at: list[set[int]] = [set() for _ in range(L + 1)]
    drawn_at[L].add(target_row)
    for l, layer_edges in enumerate(edges):
        for src, dst, _ in layer_edges:
            drawn_at[l + 1].add(src)
            drawn_at[l].add(dst)
    drawn = set().union(*drawn_at)
    sink_share = 0.0
    if exclude:
        plain = composed_levels(layer_steps(A, alpha, ()), target_row)[0]
        sink_share = float(plain[list(exclude)].sum())
    return {
        "layers": L,
        "length": N,
        "target_row": target_row,
        "tau": None if top_k is not None else tau,
        "top_k": top_k,
        "alpha": alpha,
        "exclude_keys": list(exclude),
        "sink_share": sink_share,
        "edges": edges,
        "edge_counts": [len(e) for e in edges],
        "nodes": [[[i, round(float(s[l, i]), DIGITS)] for i in sorted(drawn_at[l])] for l in range(L + 1)],
        "columns": fold_columns(drawn, N),
        "bottom": s[0].tolist(),
    }
