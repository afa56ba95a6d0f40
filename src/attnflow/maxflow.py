"""Attention flow as Abnar & Zuidema (2020) define it: exact maximum flow through the layered attention graph.

Not to be confused with `attnflow.flow.residual_flow` ("flow"), the residual
recurrence `X_l = Ā_l X_{l-1} + X_{l-1}` (2^L x rollout on stochastic rows).
Here the graph has a node `(l, p)` for every layer boundary `l = 0..L` and real
position `p`; attention layer `l` adds an edge `(l-1, j) -> (l, i)` of capacity
`Â_l[i, j]`, where `Â_l = rownorm(alpha·Ā_l + (1-alpha)·I)` is rollout's layer
(`(Ā_l + I)/2` at alpha 0.5; heads reduced first, excluded keys zeroed and rows
renormalised before the graph is built, exactly as in `attnflow.flow.rollout`).
The value for target row `t` and source key `s` is the maximum flow from the
input node `(0, s)` to the output node `(L, t)`:

    >>> A = torch.rand(2, 3, 4, 6, 6).tril()                # batch layer head query key
    >>> A = A / A.sum(-1, keepdim=True)
    >>> R = max_flow(A, rows=[-1])                           # [batch, 1, key]: shares, rows sum to 1
    >>> R.shape, R.sum(-1)
    (torch.Size([2, 1, 6]), tensor([[1.0000], [1.0000]]))
    >>> torch.allclose(max_flow(A[:, :1], normalize=False), af.flow.rollout(A[:, :1]))   # one layer: the capacity
    True

Shares.  The paper's code (`compute_flows` in its attention_graph_util.py)
divides each output node's flow values by their sum, so with `normalize=True`
(the default) a row is `f(t, s) / Σ_s f(t, s)` and sums to 1 like the other
methods' rows; `normalize=False` returns the flow values themselves (each at
most 1, the capacity into `(L, t)`; their sum is usually well above 1, since the
flows of different sources share edges).

Exactness.  scipy's compiled `maximum_flow` (Dinic; `method="edmonds_karp"` gives
the same integers, ~80x slower on SmolLM2 patterns at n = 128) needs integer capacities, so
capacities are scaled by `2**bits` (30 by default, the most that keeps every
residual capacity inside scipy's int32) and rounded down.  Rounding down only
lowers a flow, and by at most what the rounding took off the edges of the cut
the solver's flow saturates: `f' <= f <= f' + Σ_{e in cut} (c_e - c'_e)`, each
term below `2**-30` = 9.3e-10, i.e. at most 1e-6 while that cut has < 1074
edges.  `return_error=True` finds that cut (the nodes the source reaches in the
residual graph) and returns the exact gap per entry, in the result's units (for
shares: `max(e_s, share_s·Σe) / Σf`); on SmolLM2 at n = 256 it is <= 1.3e-7 per
flow value, 8e-10 per share.  `threshold` is the optional approximation:
capacities below it are dropped before solving (fewer edges), and the same
bound, also capped by the cuts around source and sink, reports what it cost.

Speed.  All sources of a target `t` share one graph, its causal cone (positions
`<= t`), built once with numpy: numbered with positions descending, the graph of
source `s` (positions `s..t`, all that a flow from `s` can reach) is a prefix of
the target's CSR arrays plus one source row.  The sources differ only in the
capacities of their edges into layer 1, but each (t, s) is still its own max-flow
problem: the graph is directed, so Gomory–Hu trees (n - 1 flows for all pairs)
do not apply; parametric max flow (Gallo–Grigoriadis–Tarjan) needs capacities
monotone in one parameter, which these per-source vectors are not; and reusing
one source's residual graph for the next needs a warm-started solver, which
scipy does not expose.  So: one compiled flow per source, on its cone.  scipy
holds the GIL, so threads do not help (two were 2.6x slower).  On SmolLM2-135M
patterns (30 layers) one output token (the last row, every source) takes 0.34,
0.66, 4.4 and 35 CPU seconds at n = 64, 128, 256, 512 (bench/maxflow.py), about
half of it inside scipy's two per-call transposes that add the reverse edges;
the cost grows like n^3 edges summed over the sources, so use `rows=` for the
rows you need (a row asked for twice is solved once), or `threshold` to trade
certified error for time.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from attnflow import _checks
from attnflow import flow as _flow
from attnflow.errors import BadArgumentError, NonFiniteError, ShapeError

__all__ = ["max_flow", "layer_capacities"]

_METHODS = ("dinic", "edmonds_karp")
Rows = Sequence[int] | Int[Tensor, "*batch rows"] | None


def layer_capacities(
    A: Float[Tensor, "*batch layer head query key"],
    alpha: float = 0.5,
    heads: _flow.Heads = "mean",
    exclude_keys: Sequence[int] = (),
    key_mask: Int[Tensor, "*batch key"] | None = None,
    validate: bool = True,
) -> Float[Tensor, "*batch layer query key"]:
    """Each layer's edge capacities `Â_l = rownorm(alpha·Ā_l·keep + (1-alpha)·I)`: rollout of that layer alone.

        >>> A = torch.tensor([[[[[1., 0.], [.5, .5]]]]])          # batch layer head query key
        >>> layer_capacities(A)                                    # (Ā + I) / 2
        tensor([[[[1.0000, 0.0000],
                  [0.2500, 0.7500]]]])
    """
    alpha = _flow.check_alpha(alpha)
    if _checks.flag("validate", validate):
        _flow.check_attention(A)  # rows of A sum to 1 or 0; the reduced P need not ("max")
    P = _flow.reduce_heads(A, heads)  # [*batch, layer, 1, query, key]; validates A and heads
    finite = torch.isfinite(P).flatten(-3).all(-1).reshape(-1, P.shape[-4]).all(0)  # [layer]
    if not bool(finite.all()):
        bad = int((~finite).nonzero()[0, 0])
        raise NonFiniteError(f"patterns hold NaN or inf in layer {bad} (index into the layer dim); re-record them in float32")
    if key_mask is not None:
        expected = (*P.shape[:-4], P.shape[-1])
        if tuple(key_mask.shape) != expected:
            raise ShapeError(f"key_mask has shape {tuple(key_mask.shape)}, expected {expected} (*batch, key)")
        key_mask = key_mask[..., None, :].expand(*P.shape[:-3], P.shape[-1])  # [*batch, layer, key]
    # each layer as a one-layer rollout (layer moved into the batch dims): the same identity,
    # exclusion and renormalisation conventions as every composed method
    return _flow.rollout(P.unsqueeze(-4), alpha=alpha, exclude_keys=exclude_keys, key_mask=key_mask, validate=False)


def max_flow(
    A: Float[Tensor, "*batch layer head query key"],
    rows: Rows = None,
    heads: _flow.Heads = "mean",
    alpha: float = 0.5,
    exclude_keys: Sequence[int] = (),
    key_mask: Int[Tensor, "*batch key"] | None = None,
    threshold: float = 0.0,
    normalize: bool = True,
    method: str = "dinic",
    bits: int = 30,
    return_error: bool = False,
    validate: bool = True,
) -> Float[Tensor, "*batch query key"] | tuple[Tensor, Tensor]:
    """Attention flow (Abnar & Zuidema 2020): max flow from input `(0, s)` to output `(L, t)` for every row t, key s.

    Returns `[*batch, query, key]` (or `[*batch, len(rows), key]`), float32 (float64
    for float64 input), on A's device; pad rows and keys after `t` are 0.  With
    `return_error=True` also a bound of the same shape: the exact values lie within
    it of the result (rounding to `bits` bits, and `threshold`, only ever lower a
    flow value).  `validate` checks the patterns as `attnflow.flow` does (rows sum to 1 or 0).

        >>> A = torch.tensor([[[[[1., 0.], [.5, .5]]], [[[1., 0.], [.5, .5]]]]])   # 2 layers
        >>> max_flow(A, normalize=False)  # Â = [[1, 0], [.25, .75]]; t=1, s=0: .25 via (1, 0) + .25 via (1, 1)
        tensor([[[1.0000, 0.0000],
                 [0.5000, 0.7500]]])
        >>> max_flow(A)                   # shares: rows divided by their sums
        tensor([[[1.0000, 0.0000],
                 [0.4000, 0.6000]]])
        >>> max_flow(A, rows=[1], exclude_keys=(0,), normalize=False)   # BOS column zeroed first
        tensor([[[0., 1.]]])
    """
    if method not in _METHODS:
        raise BadArgumentError(f"method={method!r}; use one of {', '.join(_METHODS)}")
    if not _checks.is_int(bits) or not 1 <= bits <= 30:
        raise BadArgumentError(f"bits={bits!r}; use an integer in 1..30 (scipy's max flow works in int32)")
    threshold = _checks.number("threshold", threshold, 0.0, 1.0, hint="a capacity below 1; 0 solves exactly")
    if threshold >= 1.0:
        raise BadArgumentError(f"threshold={threshold}; use a capacity in [0, 1) (0 solves exactly)")
    normalize, return_error = _checks.flag("normalize", normalize), _checks.flag("return_error", return_error)
    C = layer_capacities(A, alpha=alpha, heads=heads, exclude_keys=exclude_keys, key_mask=key_mask, validate=validate)
    batch, (L, Q, N) = C.shape[:-3], C.shape[-3:]
    if Q != N:
        raise ShapeError(f"max_flow needs square patterns (*batch, layer, head, {N}, {N}); got query={Q}: record every query row")
    idx = _row_index(rows, batch, N)  # [B, T] numpy
    Cn = C.detach().to("cpu", torch.float64).reshape(-1, L, N, N).numpy()
    B = Cn.shape[0]
    idx = np.broadcast_to(idx, (B, idx.shape[-1]))
    out = np.zeros((B, idx.shape[1], N))
    err = np.zeros_like(out)
    solver = _Solver(method, int(bits), float(threshold), return_error)
    for b in range(B):
        real = np.flatnonzero(Cn[b, 0].sum(-1) != 0)  # pad rows of Â are zero
        for t in np.unique(idx[b]):  # a row asked for twice (e.g. repeated to pad) is solved once
            k = int(np.searchsorted(real, t))
            if k == len(real) or real[k] != t:
                continue  # a pad row: zeros
            cone = real[: k + 1]  # the real positions <= t
            f, e = solver.row(Cn[b][:, cone][:, :, cone])
            hit = np.flatnonzero(idx[b] == t)
            out[b, hit[:, None], cone], err[b, hit[:, None], cone] = f, e
    if normalize:
        out, err = _normalise(out, err)
    dtype = torch.float64 if A.dtype == torch.float64 else torch.float32
    shape = (*batch, idx.shape[1], N)
    res = torch.from_numpy(out).to(dtype).reshape(shape).to(A.device)
    if return_error:
        return res, torch.from_numpy(err).to(dtype).reshape(shape).to(A.device)
    return res


# ------------------------------------------------------------------------------------
# one target row
# ------------------------------------------------------------------------------------
class _Solver:
    """Max flows from every source to one target, on the target's causal cone."""

    def __init__(self, method: str, bits: int, threshold: float, certify: bool):
        self.method, self.scale, self.threshold, self.certify = method, float(2**bits), threshold, certify

    def row(self, C: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Flows `[t+1]` from every source into the last position of `C [layer, t+1, t+1]`, and their error bounds."""
        L, n = C.shape[0], C.shape[-1]
        t = n - 1
        if L == 1:  # source -> sink directly: the flow is the capacity
            f = np.where(C[0, t] >= self.threshold, C[0, t], 0.0)
            return f, C[0, t] - f
        Ci = np.floor(np.where(C >= self.threshold, C, 0.0) * self.scale).astype(np.int32)
        g = _ConeGraph(Ci, C if self.certify else None)
        f, e = np.array([self._solve(g, s) for s in range(n)]).T  # one max flow per source
        return f / self.scale, e / self.scale

    def _solve(self, g: "_ConeGraph", s: int) -> tuple[float, float]:
        from scipy.sparse import csr_array
        from scipy.sparse.csgraph import maximum_flow

        indptr, indices, data, source = g.graph(s)
        if indptr[-1] == indptr[-2]:  # no capacity left out of the source: what `threshold` dropped there bounds the loss
            return 0.0, (g.C[0, s:, s].sum() * self.scale if self.certify else 0.0)
        M = csr_array((data, indices, indptr), shape=(source + 1, source + 1))
        M.has_sorted_indices = True
        res = maximum_flow(M, source, 0, method=self.method)
        value = float(res.flow_value)
        if not self.certify:
            return value, 0.0
        return value, g.cut_gap(s, M, res.flow, value / self.scale, self.scale)


class _ConeGraph:
    """The layered graph of one target `t` (the last position), as CSR arrays, nodes numbered for prefix slicing.

    Node 0 is the sink `(L, t)`; node `1 + (t - p)·(L-1) + (l-1)` is `(l, p)` for
    l = 1..L-1 and p = t..0.  An edge goes from position j to a position i >= j,
    i.e. to a node numbered at most as high as the block of j, so the rows of
    positions `s..t` (a prefix) only point inside the prefix: the graph of source
    `s` is that prefix plus one row for `(0, s)`, appended as the last node.
    """

    def __init__(self, Ci: np.ndarray, C: np.ndarray | None):
        L, n = Ci.shape[0], Ci.shape[-1]
        t, D = n - 1, L - 1  # D: nodes per position block (layers 1..L-1)
        self.L, self.n, self.D, self.C = L, n, D, C
        pp, ii = np.tril_indices(n)  # block p' = t - p, and i' = t - i <= p' (edges go up in position)
        size = (L - 2) * (np.arange(n) + 1) + 1  # entries per block: L-2 rows of p'+1 edges, one sink edge
        start = np.concatenate([[0], np.cumsum(size)[:-1]])
        lay = np.arange(1, L - 1)[:, None]  # node layer l of the edge's tail, [L-2, 1]
        # CSR order (block p', then layer l, then i' ascending = column ascending) computed, not sorted
        pos = start[pp] + (lay - 1) * (pp + 1) + ii  # [L-2, T]
        total = int(size.sum())
        caps = np.empty(total, dtype=np.int32)
        cols = np.empty(total, dtype=np.int32)
        caps[pos] = Ci[1 : L - 1][:, t - ii, t - pp]  # edge (l, p) -> (l+1, i): Â_{l+1}[i, p], 0-based layer l
        cols[pos] = 1 + ii * D + lay  # node (l+1, i)
        sink_pos = start + (L - 2) * (np.arange(n) + 1)
        caps[sink_pos] = Ci[L - 1, t, t - np.arange(n)]  # edge (L-1, p) -> sink: Â_L[t, p]
        cols[sink_pos] = 0
        row_len = np.concatenate([np.broadcast_to(np.arange(n)[:, None] + 1, (n, L - 2)), np.ones((n, 1), np.int64)], 1)
        keep = caps > 0  # zero capacities (rounded away, thresholded, excluded keys) are no edges
        kept_per_row = np.add.reduceat(keep, np.concatenate([[0], np.cumsum(row_len.ravel())[:-1]]))  # every row is non-empty
        self.indices, self.data = cols[keep], caps[keep]
        self.indptr = np.zeros(1 + n * D + 1, dtype=np.int32)  # row 0, the sink, is empty
        np.cumsum(kept_per_row, out=self.indptr[2:])
        self.src_caps = Ci[0]  # [i, s]: Â_1[i, s]

    def graph(self, s: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """CSR (indptr, indices, data) of source s's graph and the source node's index."""
        t, D = self.n - 1, self.D
        source = 1 + (t - s + 1) * D  # first node after the prefix of positions s..t
        nnz = int(self.indptr[source])
        caps = self.src_caps[t - np.arange(t - s + 1), s]  # (1, i) for i = t..s: columns ascending
        cols = 1 + np.arange(t - s + 1, dtype=np.int32) * D
        keep = caps > 0
        indptr = np.append(self.indptr[: source + 1], nnz + int(keep.sum())).astype(np.int32)
        indices = np.concatenate([self.indices[:nnz], cols[keep]])
        data = np.concatenate([self.data[:nnz], caps[keep].astype(np.int32)])
        return indptr, indices, data, source

    def cut_gap(self, s: int, M, flow, value: float, scale: float) -> float:
        """`cap(S, T) - value` with the exact capacities, S = the nodes the source reaches in the residual graph.

        `value` (the rounded graph's max flow) is a lower bound of the exact flow and
        `cap(S, T)`, the exact capacity of a cut, an upper bound; their gap bounds the error.
        """
        from scipy.sparse.csgraph import breadth_first_order

        residual = M - flow  # forward: c' - f, reverse: +f (flow is antisymmetric)
        residual.data[residual.data < 0] = 0
        residual.eliminate_zeros()
        source = residual.shape[0] - 1
        inS = np.zeros(residual.shape[0], dtype=bool)
        inS[breadth_first_order(residual, source, directed=True, return_predecessors=False)] = True
        t, D, m = self.n - 1, self.D, self.n - s  # positions s..t as p' = t - p = 0..m-1
        S = np.zeros((self.L + 1, m), dtype=np.float64)  # [node layer 0..L, p']
        S[0, m - 1] = 1.0  # the source (0, s)
        S[1 : self.L] = inS[1 : 1 + m * D].reshape(m, D).T  # intermediate nodes (l, p)
        S[self.L] = 1.0  # layer L has one node, the sink: only it may count on the head side
        S[self.L, 0] = float(inS[0])  # (the sink is never in S when the flow is maximal)
        Cs = self.C[:, t - np.arange(m)][:, :, t - np.arange(m)]  # [layer, i', j'] exact capacities on the cone
        cut = np.einsum("li,lij,lj->", 1.0 - S[1:], Cs, S[:-1])  # edges (l-1, j) in S -> (l, i) not in S
        # the cuts around the source and the sink bound the flow too (tighter when `threshold` dropped many edges)
        cut = min(float(cut), Cs[0, :, m - 1].sum(), Cs[-1, 0].sum())
        return max(cut - value, 0.0) * scale  # in the solver's integer units, like the flow


def _row_index(rows: Rows, batch: torch.Size, N: int) -> np.ndarray:
    """Target rows as non-negative indices, `[1, T]` (shared) or `[B, T]` (per example, batch flattened)."""
    if rows is None:
        return np.arange(N)[None, :]
    idx = _flow._rows_form(rows).cpu().numpy()  # integers only: rows=[0.5] is not row 0
    if idx.ndim == 0 or (idx.ndim > 1 and tuple(idx.shape[:-1]) != tuple(batch)):
        raise ShapeError(f"rows has shape {tuple(idx.shape)}, expected (rows,) or {(*batch, 'rows')}")
    if idx.size and ((idx < -N) | (idx >= N)).any():
        raise BadArgumentError(f"rows must lie in [-{N}, {N}) for {N} query rows")
    return (idx % N).reshape(-1, idx.shape[-1])


def _normalise(f: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows divided by their sums; the bound of share s is max(e_s, share_s·Σe) / Σf (f_s <= f*_s <= f_s + e_s)."""
    total = f.sum(-1, keepdims=True)
    inv = np.divide(1.0, total, out=np.zeros_like(total), where=total > 0)
    share = f * inv
    return share, np.maximum(e, share * e.sum(-1, keepdims=True)) * inv
