"""attnflow.maxflow.max_flow against networkx's max flow on the paper's full layered graph, plus closed forms."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
import torch

from attnflow import flow as F
from attnflow.errors import BadArgumentError, ShapeError
from attnflow.maxflow import layer_capacities, max_flow


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


def networkx_flows(C: np.ndarray, t: int, flow_func=None) -> np.ndarray:
    """Max flow from (0, s) to (L, t) for every s on the full layered graph (no cone), float capacities."""
    L, N = C.shape[0], C.shape[-1]
    G = nx.DiGraph()
    for l in range(1, L + 1):
        for i in range(N):
            for j in range(N):
                if C[l - 1, i, j] > 0:
                    G.add_edge((l - 1, j), (l, i), capacity=float(C[l - 1, i, j]))
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
