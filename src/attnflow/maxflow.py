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
capacities below it between layers 1..L-1 are dropped before solving (fewer
edges; the edges out of the source and into the target, at most 2n, are always
kept: dropping them saves nothing and, SmolLM2's answer rows attending
diffusely, cost most of the error), and the same bound, also capped by the cuts
around source and sink, reports what it cost.  It is tight in practice: on
SmolLM2 spans at n = 512 the bound equalled the measured loss (bench/maxflow.py).

Spans.  `span_max_flow` is the flow from a span of keys (a document, a sentence)
as a whole: a super-source joined to every `(0, s)` of the span with infinite
capacity, which is the span's input nodes merged into one source whose edge to
`(1, i)` has capacity `Σ_s Â_1[i, s]`; one max flow per (target, span) on the
same cone graph.  It is at most the sum of the span's tokens' flows (their paths
share edges) and at least the largest.

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

__all__ = ["max_flow", "span_max_flow", "layer_capacities"]

_METHODS = ("dinic", "edmonds_karp")
Rows = Sequence[int] | Int[Tensor, "*batch rows"] | None
Spans = Sequence[tuple[int, int]] | Int[Tensor, "*batch span 2"]


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
    normalize = _checks.flag("normalize", normalize)
    Cn, batch, idx, solver = _setup(A, rows, heads, alpha, exclude_keys, key_mask, threshold, method, bits, return_error, validate)
    B, N = Cn.shape[0], Cn.shape[-1]
    out = np.zeros((B, idx.shape[1], N))
    err = np.zeros_like(out)
    for b in range(B):
        for t, cone, hit in _targets(Cn[b], idx[b]):
            f, e = solver.row(_cone(Cn[b], cone))
            out[b, hit[:, None], cone], err[b, hit[:, None], cone] = f, e
    if normalize:
        out, err = _normalise(out, err)
    return _result(out, err, A, (*batch, idx.shape[1], N), return_error)


def span_max_flow(
    A: Float[Tensor, "*batch layer head query key"],
    spans: Spans,
    rows: Rows = None,
    heads: _flow.Heads = "mean",
    alpha: float = 0.5,
    exclude_keys: Sequence[int] = (),
    key_mask: Int[Tensor, "*batch key"] | None = None,
    threshold: float = 0.0,
    method: str = "dinic",
    bits: int = 30,
    return_error: bool = False,
    validate: bool = True,
) -> Float[Tensor, "*batch rows span"] | tuple[Tensor, Tensor]:
    """Attention flow from a span of keys as a whole: max flow from a super-source joined to every `(0, s)`,
    s in `[start, end)`, with infinite capacity, to the output `(L, t)` of every target row t.

    `spans` are `(start, end)` pairs of key positions (padded coordinates, like
    `rows`; pad keys and keys after `t` send nothing), shared by the batch, or an
    integer tensor `[*batch, span, 2]`.  Returns the flow values `[*batch, rows,
    span]` (float32; float64 for float64 input; not shares: each is at most 1, the
    capacity into `(L, t)`), and with `return_error=True` a bound of the same shape,
    as in `max_flow`.  Same graph, conventions and arguments as `max_flow`.

    A span's flow is not the sum of its tokens' flows: the tokens' paths share
    edges, so it is at most that sum and at least the largest of them (a flow of one
    token is a flow of the span).  One max flow per (row, span) instead of one per
    (row, key): for documents and sentences of a long prompt, a few dozen solves per
    row instead of n.

        >>> A = torch.tensor([[[[[1., 0.], [.5, .5]]], [[[1., 0.], [.5, .5]]]]])   # 2 layers
        >>> span_max_flow(A, [(0, 1), (1, 2), (0, 2)], rows=[1])   # tokens 0 and 1: .5 and .75; together 1 (< 1.25)
        tensor([[[0.5000, 0.7500, 1.0000]]])
    """
    Cn, batch, idx, solver = _setup(A, rows, heads, alpha, exclude_keys, key_mask, threshold, method, bits, return_error, validate)
    B = Cn.shape[0]
    bounds = _span_bounds(spans, batch, B, Cn.shape[-1])  # [B, S, 2]
    out = np.zeros((B, idx.shape[1], bounds.shape[1]))
    err = np.zeros_like(out)
    for b in range(B):
        for t, cone, hit in _targets(Cn[b], idx[b]):
            first = np.searchsorted(cone, bounds[b, :, 0])  # cone index of each span's first real key
            stop = np.searchsorted(cone, bounds[b, :, 1])  # one past its last real key <= t
            f, e = solver.spans(_cone(Cn[b], cone), first, stop)
            out[b, hit], err[b, hit] = f, e
    return _result(out, err, A, (*batch, idx.shape[1], bounds.shape[1]), return_error)


# ------------------------------------------------------------------------------------
# shared set-up
# ------------------------------------------------------------------------------------
def _setup(A, rows, heads, alpha, exclude_keys, key_mask, threshold, method, bits, certify, validate):
    """Validated arguments: capacities `[B, L, N, N]` (numpy, float32 or float64), batch dims, rows `[B, T]`, a solver."""
    if method not in _METHODS:
        raise BadArgumentError(f"method={method!r}; use one of {', '.join(_METHODS)}")
    if not _checks.is_int(bits) or not 1 <= bits <= 30:
        raise BadArgumentError(f"bits={bits!r}; use an integer in 1..30 (scipy's max flow works in int32)")
    threshold = _checks.number("threshold", threshold, 0.0, 1.0, hint="a capacity below 1; 0 solves exactly")
    if threshold >= 1.0:
        raise BadArgumentError(f"threshold={threshold}; use a capacity in [0, 1) (0 solves exactly)")
    certify = _checks.flag("return_error", certify)
    C = layer_capacities(A, alpha=alpha, heads=heads, exclude_keys=exclude_keys, key_mask=key_mask, validate=validate)
    batch, (L, Q, N) = C.shape[:-3], C.shape[-3:]
    if Q != N:
        raise ShapeError(f"max_flow needs square patterns (*batch, layer, head, {N}, {N}); got query={Q}: record every query row")
    idx = _row_index(rows, batch, N)  # [B, T] numpy
    # float32 capacities stay float32 (the solver scales them in float64, so nothing is lost): half the memory
    Cn = C.detach().cpu().reshape(-1, L, N, N).numpy()
    idx = np.broadcast_to(idx, (Cn.shape[0], idx.shape[-1]))
    return Cn, batch, idx, _Solver(method, int(bits), float(threshold), certify)


def _targets(C: np.ndarray, idx: np.ndarray):
    """(t, cone, hit) for every distinct real target row of one example: its cone (the real positions <= t, ascending)
    and where it sits in `idx` (a row asked for twice, e.g. repeated to pad, is solved once; pad rows give zeros)."""
    real = np.flatnonzero(C[0].sum(-1) != 0)  # pad rows of Â are zero
    for t in np.unique(idx):
        k = int(np.searchsorted(real, t))
        if k < len(real) and real[k] == t:
            yield t, real[: k + 1], np.flatnonzero(idx == t)


def _cone(C: np.ndarray, cone: np.ndarray) -> np.ndarray:
    """C `[L, N, N]` restricted to the positions `cone`: a view when they are contiguous (no padding inside), else a copy."""
    if cone[-1] - cone[0] + 1 == len(cone):
        return C[:, cone[0] : cone[-1] + 1, cone[0] : cone[-1] + 1]
    return C[:, cone][:, :, cone]


def _span_bounds(spans: Spans, batch: torch.Size, B: int, N: int) -> np.ndarray:
    """Spans as `[B, S, 2]` (start, end) key positions, validated."""
    if isinstance(spans, Tensor):
        s = spans.detach().cpu().long().numpy()
        if s.ndim < 2 or s.shape[-1] != 2 or (s.ndim > 2 and tuple(s.shape[:-2]) != tuple(batch)):
            raise ShapeError(f"spans has shape {tuple(s.shape)}, expected (span, 2) or {(*batch, 'span', 2)}")
    else:
        pairs = [tuple(p) for p in spans]
        if any(len(p) != 2 for p in pairs):
            raise ShapeError("spans must be (start, end) pairs of key positions")
        s = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    if ((s < 0) | (s > N)).any() or (s[..., 0] > s[..., 1]).any():
        raise BadArgumentError(f"spans must satisfy 0 <= start <= end <= {N} (key positions, padded coordinates)")
    return np.broadcast_to(s.reshape(-1, *s.shape[-2:]), (B, *s.shape[-2:]))


def _result(out: np.ndarray, err: np.ndarray, A: Tensor, shape: tuple, return_error: bool):
    dtype = torch.float64 if A.dtype == torch.float64 else torch.float32
    res = torch.from_numpy(out).to(dtype).reshape(shape).to(A.device)
    if return_error:
        return res, torch.from_numpy(err).to(dtype).reshape(shape).to(A.device)
    return res


# ------------------------------------------------------------------------------------
# one target row
# ------------------------------------------------------------------------------------
class _Solver:
    """Max flows from every source (a key, or a span of keys) to one target, on the target's causal cone."""

    def __init__(self, method: str, bits: int, threshold: float, certify: bool):
        self.method, self.scale, self.threshold, self.certify = method, float(2**bits), threshold, certify

    def row(self, C: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Flows `[t+1]` from every key into the last position of `C [layer, t+1, t+1]`, and their error bounds."""
        n = C.shape[-1]
        first = np.arange(n)
        return self.spans(C, first, first + 1)

    def spans(self, C: np.ndarray, first: np.ndarray, stop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Flows from the spans of cone positions `[first, stop)` (clipped to the cone) into its last position."""
        L, n = C.shape[0], C.shape[-1]
        t = n - 1
        out = np.zeros((2, len(first)))
        todo = np.flatnonzero(stop > first)
        if not len(todo):
            return out[0], out[1]
        # exact capacities out of each span's merged source into (1, i), i = t..first (the ∞ edges merge the span's
        # input nodes into one: they have no other in-edges)
        src = [C[0, ::-1, a:z].sum(-1, dtype=np.float64)[: n - a] for a, z in zip(first[todo], stop[todo])]
        if L == 1:  # source -> sink directly: the flow is the capacity
            out[0, todo] = [v[0] for v in src]
            return out[0], out[1]
        g = _ConeGraph(C, self.scale, self.threshold, self.certify)
        out[:, todo] = np.array([self._solve(g, int(a), v) for a, v in zip(first[todo], src)]).T
        return out[0] / self.scale, out[1] / self.scale

    def _solve(self, g: "_ConeGraph", first: int, src: np.ndarray) -> tuple[float, float]:
        from scipy.sparse import csr_array
        from scipy.sparse.csgraph import maximum_flow

        caps = np.floor(src * self.scale).astype(np.int32)  # the source's edges are never thresholded (few)
        indptr, indices, data, source = g.graph(first, caps)
        if indptr[-1] == indptr[-2]:  # no capacity left out of the source (rounded away): that bounds the loss
            return 0.0, (src.sum() * self.scale if self.certify else 0.0)
        M = csr_array((data, indices, indptr), shape=(source + 1, source + 1))
        M.has_sorted_indices = True
        res = maximum_flow(M, source, 0, method=self.method)
        value = float(res.flow_value)
        if not self.certify:
            return value, 0.0
        return value, g.cut_gap(first, src, M, res.flow, value / self.scale, self.scale)


class _ConeGraph:
    """The layered graph of one target `t` (the last position), as CSR arrays, nodes numbered for prefix slicing.

    Node 0 is the sink `(L, t)`; node `1 + (t - p)·(L-1) + (l-1)` is `(l, p)` for
    l = 1..L-1 and p = t..0.  An edge goes from position j to a position i >= j,
    i.e. to a node numbered at most as high as the block of j, so the rows of
    positions `s..t` (a prefix) only point inside the prefix: the graph of a source
    whose first key is `s` is that prefix plus one row for the source, appended as
    the last node.  Built from the capacities that survive `threshold` and the
    rounding (one pass over each layer, then a sort of the kept edges only), so a
    threshold saves memory and time here too.
    """

    def __init__(self, C: np.ndarray, scale: float, threshold: float, certify: bool):
        L, n = C.shape[0], C.shape[-1]
        t, D = n - 1, L - 1  # D: nodes per position block (layers 1..L-1)
        self.L, self.n, self.D, self.C = L, n, D, (C if certify else None)
        rows, cols, caps = [], [], []
        for l in range(1, L):  # capacities Â_{l+1} (0-based l): edges (l, p) -> (l+1, i); into the sink for l = L-1
            Cl = C[l] if l < L - 1 else C[l, t:]  # the sink layer: only the target's row, never thresholded (n edges)
            low = max(threshold if l < L - 1 else 0.0, 1.0 / scale)  # below 1/scale a capacity rounds to 0: no edge
            i, p = np.nonzero(Cl >= low)  # one contiguous pass over the layer; the kept edges are few
            if l < L - 1:
                causal = i >= p  # edges go up in position (prefix slicing relies on it)
                i, p = i[causal], p[causal]
                cols.append((1 + (t - i) * D + l).astype(np.int32))
            else:
                cols.append(np.zeros(len(p), dtype=np.int32))
            caps.append(np.floor(Cl[i, p].astype(np.float64) * scale).astype(np.int32))  # exact: scale is 2**bits
            rows.append((t - p) * D + (l - 1))  # node (l, p), less the sink's row 0
        row, col, cap = np.concatenate(rows), np.concatenate(cols), np.concatenate(caps)
        order = np.argsort(row * (n * D + 1) + col)  # CSR order: rows, then columns ascending
        self.indices, self.data = col[order], cap[order]
        self.indptr = np.zeros(1 + n * D + 1, dtype=np.int32)  # row 0, the sink, is empty
        np.cumsum(np.bincount(row, minlength=n * D), out=self.indptr[2:])

    def graph(self, first: int, caps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """CSR (indptr, indices, data) of the graph of positions `first..t` plus a source with edges of capacity
        `caps` into (1, i), i = t..first, and the source node's index."""
        t, D = self.n - 1, self.D
        source = 1 + (t - first + 1) * D  # first node after the prefix of positions first..t
        nnz = int(self.indptr[source])
        cols = 1 + np.arange(t - first + 1, dtype=np.int32) * D
        keep = caps > 0
        indptr = np.append(self.indptr[: source + 1], nnz + int(keep.sum())).astype(np.int32)
        indices = np.concatenate([self.indices[:nnz], cols[keep]])
        data = np.concatenate([self.data[:nnz], caps[keep]])
        return indptr, indices, data, source

    def cut_gap(self, first: int, src: np.ndarray, M, flow, value: float, scale: float) -> float:
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
        L, D, m = self.L, self.D, self.n - first  # positions first..t as p' = t - p = 0..m-1
        S = np.zeros((L + 1, m), dtype=np.float64)  # [node layer 0..L, p']
        S[1:L] = inS[1 : 1 + m * D].reshape(m, D).T  # intermediate nodes (l, p)
        S[L] = 1.0  # layer L has one node, the sink: only it may count on the head side
        S[L, 0] = float(inS[0])  # (the sink is never in S when the flow is maximal)
        cut = float((1.0 - S[1]) @ src)  # source -> (1, i) not in S
        for l in range(1, L):  # edges (l, j) in S -> (l+1, i) not in S, exact capacities on the flipped cone
            Cl = self.C[l, ::-1, ::-1][:m, :m]  # [i', j']
            cut += float((1.0 - S[l + 1]) @ (Cl @ S[l]))
        # the cuts around the source and the sink bound the flow too (tighter when `threshold` dropped many edges)
        cut = min(cut, float(src.sum()), float(self.C[L - 1, -1, ::-1][:m].sum(dtype=np.float64)))
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
