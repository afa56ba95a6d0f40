"""attnflow.maxflow.max_flow against networkx's max flow on the paper's full layered graph, plus closed forms."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
import torch

from attnflow import flow as F
from attnflow.errors import BadArgumentError, ShapeError
from attnflow.maxflow import layer_capacities, max_flow, span_max_flow


def patterns(B: int, L: int, H: int, N: int, seed: int, sparsity: float = 0.0) -> torch.Tensor:
    """Random causal row-stochastic float64 patterns; `sparsity` zeroes that share of the off-diagonal weights."""
    g = torch.Generator().manual_seed(seed)
    A = torch.rand(B, L, H, N, N, generator=g, dtype=torch.float64) ** 3  # peaky, like softmax rows
    if sparsity:
        drop = torch.rand(B, L, H, N, N, generator=g, dtype=torch.float64) < sparsity
        A = A.masked_fill(drop & ~torch.eye(N, dtype=torch.bool), 0.0)
    A = A.tril()
    return A / A.sum(-1, keepdim=True)


def reference_capacities(A: torch.Tensor, alpha: float, exclude: tuple[int, ...]) -> np.ndarray:
    """Â_l from scratch (one unpadded example, heads averaged): zero excluded columns, renormalise, mix, renormalise."""
    P = A.mean(1).numpy().copy()  # [layer, query, key]
    N = P.shape[-1]
    for k in exclude:
        P[:, :, k % N] = 0.0
    s = P.sum(-1, keepdims=True)
    P = np.divide(P, s, out=np.zeros_like(P), where=s > 0)
    M = alpha * P + (1 - alpha) * np.eye(N)
    return M / M.sum(-1, keepdims=True)


def layered_graph(C: np.ndarray):
    """The paper's layered attention graph: an edge (l-1, j) -> (l, i) of capacity C[l-1, i, j] for each positive one."""
    L, N = C.shape[0], C.shape[-1]
    G = nx.DiGraph()
    for l in range(1, L + 1):
        for i in range(N):
            for j in range(N):
                if C[l - 1, i, j] > 0:
                    G.add_edge((l - 1, j), (l, i), capacity=float(C[l - 1, i, j]))
    return G


def networkx_flows(C: np.ndarray, t: int, flow_func=None) -> np.ndarray:
    """Max flow from (0, s) to (L, t) for every s on the full layered graph (no cone), float capacities."""
    L, N = C.shape[0], C.shape[-1]
    G = layered_graph(C)
    out = np.zeros(N)
    for s in range(N):
        if (0, s) in G and (L, t) in G:
            out[s] = nx.maximum_flow_value(G, (0, s), (L, t), flow_func=flow_func)
    return out


CASES = [  # (batch, layer, head, n, exclude, alpha, seed)
    (2, 3, 4, 9, (), 0.5, 0),
    (3, 4, 2, 7, (0,), 0.5, 1),
    (2, 2, 3, 12, (0, -1), 0.3, 2),
    (2, 5, 2, 6, (), 0.8, 3),
]


@pytest.mark.parametrize("B,L,H,N,exclude,alpha,seed", CASES)
def test_matches_networkx(B, L, H, N, exclude, alpha, seed):
    A = patterns(B, L, H, N, seed, sparsity=0.3)
    got = max_flow(A, heads="mean", alpha=alpha, exclude_keys=exclude, normalize=False).numpy()
    assert got.shape == (B, N, N)
    for b in range(B):
        C = reference_capacities(A[b], alpha, exclude)
        for t in range(N):
            ref = networkx_flows(C, t)
            assert np.abs(got[b, t] - ref).max() <= 1e-6, (b, t)


def test_matches_networkx_n32_and_normalised_rows():
    A = patterns(2, 3, 2, 32, seed=5)
    rows = [31, 20]
    got = max_flow(A, rows=rows, exclude_keys=(0,))
    for b in range(2):
        C = reference_capacities(A[b], 0.5, (0,))
        for r, t in enumerate(rows):
            ref = networkx_flows(C, t, flow_func=nx.algorithms.flow.edmonds_karp)  # the paper's solver
            assert np.abs(got[b, r].numpy() - ref / ref.sum()).max() <= 1e-6
            assert abs(float(got[b, r].sum()) - 1.0) <= 1e-6


def test_one_layer_is_the_capacity_and_two_layers_the_sum_of_minima():
    A = patterns(2, 2, 3, 8, seed=7)
    one = max_flow(A[:, :1], normalize=False)
    assert torch.allclose(one, F.rollout(A[:, :1]), atol=1e-12)
    C = layer_capacities(A).numpy()  # [batch, layer, query, key]
    two = max_flow(A, normalize=False).numpy()
    # paths (0, s) -> (1, i) -> (2, t) share no edge: the flow is the sum over i of the path's bottleneck
    ref = np.minimum(C[:, 0, None, :, :], C[:, 1, :, :, None]).sum(-2)  # [batch, t, s]
    assert np.abs(two - ref).max() <= 1e-6


def test_rows_subset_equals_full_and_per_example_rows():
    A = patterns(3, 3, 2, 10, seed=8)
    full = max_flow(A)
    assert torch.equal(max_flow(A, rows=[-1, 4]), full[:, [9, 4]])
    per = torch.tensor([[1, 9], [2, 3], [9, 9]])
    assert torch.equal(max_flow(A, rows=per), torch.gather(full, 1, per[..., None].expand(3, 2, 10)))


def test_causal_and_bounded_by_the_cuts_at_both_ends():
    A = patterns(2, 4, 2, 9, seed=9)
    f = max_flow(A, normalize=False)
    C = layer_capacities(A)
    assert torch.all(f.triu(1) == 0)  # a source after the target sends nothing
    out_of_source = C[:, 0].sum(-2)[:, None, :]  # Σ_i Â_1[i, s]: the cut around (0, s)
    assert torch.all(f <= out_of_source + 1e-9) and torch.all(f <= 1 + 1e-9)
    assert torch.all(f >= torch.diagonal(C, dim1=-2, dim2=-1).amin(1)[:, None, :] * torch.eye(9) - 1e-9)  # diagonal path


def test_left_padding_and_key_mask_give_the_same_rows():
    A = patterns(1, 3, 2, 6, seed=10)
    padded = torch.zeros(1, 3, 2, 8, 8, dtype=A.dtype)
    padded[..., 2:, 2:] = A
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]])
    for kw in ({}, {"key_mask": mask}):
        got = max_flow(padded, exclude_keys=(0,), **kw)
        assert torch.all(got[:, :2] == 0) and torch.all(got[..., :2] == 0)
        assert torch.allclose(got[:, 2:, 2:], max_flow(A, exclude_keys=(0,)), atol=1e-12)


def test_sink_exclusion_takes_the_key_out():
    A = patterns(2, 3, 2, 8, seed=11)
    f = max_flow(A, exclude_keys=(0,), normalize=False)
    assert torch.all(f[:, 1:, 0] == 0)  # only the diagonal path leaves an excluded key
    assert torch.any(max_flow(A, normalize=False)[:, 1:, 0] > 0.1)


def test_threshold_is_monotone_and_its_error_bound_holds():
    A = patterns(2, 3, 2, 10, seed=12)
    exact, exact_err = max_flow(A, normalize=False, return_error=True)
    assert float(exact_err.max()) <= 1e-6  # rounding to 30 bits, certified by the saturated cut
    prev = exact
    for thr in (1e-3, 1e-2, 5e-2, 0.2):
        f, err = max_flow(A, normalize=False, threshold=thr, return_error=True)
        assert torch.all(f <= prev + 1e-12)  # dropping more edges never adds flow
        assert torch.all(f <= exact + 1e-12) and torch.all(exact <= f + err + 1e-9)  # the bound holds
        prev = f
    assert float((exact - prev).max()) > 1e-3  # the largest threshold did cost something, and the bound saw it
    assert float(err.max()) >= float((exact - prev).max()) - 1e-9


def test_normalised_error_bound_holds():
    A = patterns(1, 3, 2, 10, seed=13)
    exact = max_flow(A)
    f, err = max_flow(A, threshold=0.05, return_error=True)
    assert torch.all((f - exact).abs() <= err + 1e-9)


def test_edmonds_karp_and_dinic_agree_and_few_bits_lose_more():
    A = patterns(1, 3, 2, 8, seed=14)
    dinic = max_flow(A, normalize=False)
    assert torch.equal(max_flow(A, normalize=False, method="edmonds_karp"), dinic)
    coarse, err = max_flow(A, normalize=False, bits=8, return_error=True)
    assert float((dinic - coarse).max()) > 1e-4 and torch.all(dinic <= coarse + err + 1e-9)


def test_float32_head_weights_and_devices():
    A = patterns(1, 2, 3, 6, seed=15)
    w = torch.tensor([[1.0, 2.0, 1.0], [0.0, 1.0, 3.0]])
    got = max_flow(A.float(), heads=w)
    assert got.dtype == torch.float32
    ref = max_flow(F.reduce_heads(A, w))  # heads reduced first, then the same graph
    assert torch.allclose(got.double(), ref, atol=1e-6)


def test_bad_input_raises():
    A = patterns(1, 2, 1, 5, seed=16)
    with pytest.raises(BadArgumentError):
        max_flow(A, method="push_relabel")
    with pytest.raises(BadArgumentError):
        max_flow(A, bits=31)
    with pytest.raises(BadArgumentError):
        max_flow(A, rows=[5])
    with pytest.raises(ShapeError):
        max_flow(A[..., :3, :])


def test_threshold_that_empties_a_source_still_bounds_its_loss():
    A = patterns(1, 3, 1, 6, seed=17)
    exact = max_flow(A, normalize=False)
    f, err = max_flow(A, normalize=False, threshold=0.9, return_error=True)  # every attention edge goes
    assert torch.all(exact <= f + err + 1e-9) and float(err.max()) > 0.1


# ------------------------------------------------------------------------------------
# span_max_flow: a super-source on a span of keys
# ------------------------------------------------------------------------------------
def networkx_span_flows(C: np.ndarray, t: int, spans) -> np.ndarray:
    """Max flow from a super-source joined to (0, s), s in each span, by edges without a capacity (infinite)."""
    L, N = C.shape[0], C.shape[-1]
    G = layered_graph(C)
    out = np.zeros(len(spans))
    for k, (a, z) in enumerate(spans):
        H = G.copy()
        H.add_edges_from(("S", (0, s)) for s in range(a, z) if (0, s) in G)  # no capacity attribute: infinite
        if "S" in H and (L, t) in H and nx.has_path(H, "S", (L, t)):
            out[k] = nx.maximum_flow_value(H, "S", (L, t))
    return out


SPAN_CASES = [  # (batch, layer, head, n, exclude, alpha, seed, spans)
    (2, 3, 4, 12, (), 0.5, 20, [(0, 4), (4, 9), (2, 3), (0, 12), (9, 12), (5, 5)]),
    (2, 4, 2, 16, (0,), 0.5, 21, [(0, 6), (6, 11), (3, 16), (0, 1)]),
    (1, 5, 3, 32, (0, -1), 0.3, 22, [(0, 10), (10, 20), (20, 31), (12, 14)]),
]


@pytest.mark.parametrize("B,L,H,N,exclude,alpha,seed,spans", SPAN_CASES)
def test_span_flow_matches_networkx_super_source(B, L, H, N, exclude, alpha, seed, spans):
    A = patterns(B, L, H, N, seed, sparsity=0.3)
    rows = [N - 1, N // 2]
    got, err = span_max_flow(A, spans, rows=rows, heads="mean", alpha=alpha, exclude_keys=exclude, return_error=True)
    assert got.shape == (B, 2, len(spans)) and float(err.max()) <= 1e-6
    for b in range(B):
        C = reference_capacities(A[b], alpha, exclude)
        for r, t in enumerate(rows):
            ref = networkx_span_flows(C, t, spans)
            assert np.abs(got[b, r].numpy() - ref).max() <= 1e-6, (b, t)


def test_span_of_one_key_is_its_flow_and_spans_lie_between_max_and_sum():
    A = patterns(2, 4, 2, 14, seed=23)
    tokens = max_flow(A, rows=[13, 9], normalize=False)  # [batch, 2, key]
    single = span_max_flow(A, [(s, s + 1) for s in range(14)], rows=[13, 9])
    assert torch.allclose(single, tokens, atol=1e-9)
    spans = [(0, 5), (5, 10), (2, 14)]
    f = span_max_flow(A, spans, rows=[13, 9])
    for k, (a, z) in enumerate(spans):
        assert torch.all(f[..., k] <= tokens[..., a:z].sum(-1) + 1e-9)  # sub-additive: the tokens' paths share edges
        assert torch.all(f[..., k] >= tokens[..., a:z].amax(-1) - 1e-9)  # a flow of one token is a flow of the span
        assert torch.all(f[..., k] <= 1 + 1e-9)
    assert torch.any(f[..., 2] < tokens[..., 2:14].sum(-1) - 0.1)  # and strictly below the sum here


def test_span_threshold_is_monotone_and_its_error_bound_holds():
    A = patterns(2, 4, 3, 20, seed=24)
    spans, rows = [(0, 7), (7, 14), (14, 19), (3, 4)], [19, 15]
    for exclude in ((), (0,)):
        exact = span_max_flow(A, spans, rows=rows, exclude_keys=exclude, return_error=True)[0]
        prev = exact
        for thr in (1e-3, 2e-2, 0.1, 0.3):
            f, err = span_max_flow(A, spans, rows=rows, exclude_keys=exclude, threshold=thr, return_error=True)
            assert torch.all(f <= prev + 1e-12) and torch.all(exact <= f + err + 1e-9)
            prev = f
        assert float((exact - prev).max()) > 1e-2  # the largest threshold cost something; the bound covered it


def test_span_flow_with_padding_key_mask_and_per_example_spans():
    A = patterns(1, 3, 2, 9, seed=25)
    padded = torch.zeros(2, 3, 2, 11, 11, dtype=A.dtype)
    padded[0, ..., 2:, 2:] = A[0]
    padded[1, ..., :9, :9] = A[0]  # right-padded copy: rows after 8 are pad
    padded[1, ..., 9:, 9:] = 0
    ref = span_max_flow(A, [(0, 4), (4, 9)], rows=[8, 5], exclude_keys=(0,))
    spans = torch.tensor([[[0, 6], [6, 11]], [[0, 4], [4, 9]]])  # [batch, span, 2]: example 0 starts after 2 pads
    rows = torch.tensor([[10, 7], [8, 5]])
    for kw in ({}, {"key_mask": (padded[:, 0, 0].sum(-1) > 0).long()}):
        got = span_max_flow(padded, spans, rows=rows, exclude_keys=(0,), **kw)
        assert torch.allclose(got, ref.expand(2, 2, 2), atol=1e-12)
    excluded = span_max_flow(A, [(0, 1)], rows=[8], exclude_keys=(0,))
    assert float(excluded.abs().max()) == 0.0  # an excluded key reaches only itself


def test_span_bad_input_raises():
    A = patterns(1, 2, 1, 5, seed=26)
    with pytest.raises(BadArgumentError):
        span_max_flow(A, [(0, 6)])
    with pytest.raises(BadArgumentError):
        span_max_flow(A, [(3, 2)])
    with pytest.raises(ShapeError):
        span_max_flow(A, [(0, 1, 2)])
    with pytest.raises(ShapeError):
        span_max_flow(A, torch.zeros(3, 2, 2, dtype=torch.long))


def test_eval_span_scores_average_the_rows_and_skip_nothing_short():
    from attnflow.attention_trace import AttentionTrace
    from attnflow.eval.methods import span_scores

    A = patterns(2, 3, 2, 10, seed=27).float()
    A[1, ..., :2, :] = 0  # example 1 is left-padded by two
    A[1, ..., :, :2] = 0
    A[1] = A[1] / A[1].sum(-1, keepdim=True).clamp_min(1e-30)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :2] = 0
    ids = torch.arange(2, 12).repeat(2, 1)
    tr = AttentionTrace(A, ids, mask, torch.arange(10).repeat(2, 1), [["x"] * 10, ["x"] * 8], [9, 7], [0, 1, 2], heads="all")
    starts, ends = torch.tensor([[0, 4], [2, 5]]), torch.tensor([[4, 8], [5, 5]])  # padded; example 1's second is empty
    s = span_scores(tr, [[8, 9], [6]], starts, ends, threshold=0.0)
    assert set(s) == {"maxflow", "maxflow/sinks"}
    ref0 = span_max_flow(A[:1], [(0, 4), (4, 8)], rows=[8, 9]).double().mean(1)[0]
    ref1 = span_max_flow(A[1:, ..., 2:, 2:], [(0, 3), (3, 3)], rows=[6])[0, 0].double()
    assert torch.allclose(s["maxflow"][0], ref0) and torch.allclose(s["maxflow"][1], ref1)
    assert float(s["maxflow"][1, 1]) == 0.0
