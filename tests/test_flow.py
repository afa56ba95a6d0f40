"""attnflow.flow against plain float64 references written here, with explicit loops.

The references work on each example's *unpadded* matrices (numpy, float64, a loop
over examples and layers) and place the result into padded coordinates, so they
share no padding, masking or batching logic with the library.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from attnflow import flow as F
from attnflow.errors import BadArgumentError, NonFiniteError, ShapeError

LENGTHS = (7, 4, 7, 1, 5)  # left-padded to 7; a one-token example and two full ones
L, H = 3, 4


# ------------------------------------------------------------------------------------
# data: random causal (or not) row-stochastic patterns, left-padded, built with loops
# ------------------------------------------------------------------------------------
def make_patterns(lengths=LENGTHS, layers=L, heads=H, causal=True, seed=0):
    """numpy float64 [batch, layer, head, S, S]: pad rows and pad keys zero."""
    rng = np.random.default_rng(seed)
    B, S = len(lengths), max(lengths)
    A = np.zeros((B, layers, heads, S, S))
    for b, n in enumerate(lengths):
        pad = S - n
        for l in range(layers):
            for h in range(heads):
                for q in range(n):
                    width = q + 1 if causal else n
                    logits = rng.normal(size=width) * 2.5
                    w = np.exp(logits - logits.max())
                    A[b, l, h, pad + q, pad : pad + width] = w / w.sum()
    return A


# ------------------------------------------------------------------------------------
# the references: one unpadded example at a time
# ------------------------------------------------------------------------------------
def ref_reduce(A_l, heads):
    """A_l [head, n, n] -> [n, n]."""
    if isinstance(heads, str) and heads == "mean":
        return A_l.mean(0)
    if isinstance(heads, str) and heads == "max":
        return A_l.max(0)
    w = np.asarray(heads, dtype=np.float64)
    w = w / w.sum()
    out = np.zeros(A_l.shape[1:])
    for h in range(A_l.shape[0]):
        out += w[h] * A_l[h]
    return out


def rownorm(M):
    out = M.copy()
    for i in range(M.shape[0]):
        s = M[i].sum()
        out[i] = M[i] / s if s != 0 else 0.0
    return out


def ref_exclude(Abar, exclude):
    if not exclude:
        return Abar
    n = Abar.shape[0]
    out = Abar.copy()
    for k in exclude:
        out[:, k % n] = 0.0
    return rownorm(out)


def ref_example(A_b, method, heads="mean", alpha=0.5, exclude=(), layer=-1):
    """A_b [layer, head, n, n] (unpadded) -> [n, n]."""
    n = A_b.shape[-1]
    I = np.eye(n)
    bars = [ref_exclude(ref_reduce(A_b[l], heads if isinstance(heads, str) else heads[l]), exclude) for l in range(A_b.shape[0])]
    if method == "raw":
        return bars[layer]
    if method == "sum":
        S = np.zeros((n, n))
        for B_l in bars:
            S = S + B_l
        return rownorm(S)
    X = I.copy()
    for B_l in bars:
        if method == "rollout":
            X = rownorm(alpha * B_l + (1 - alpha) * I) @ X
        elif method == "flow":
            X = B_l @ X + X
        elif method == "flow_normalized":
            X = rownorm(B_l @ X + X)
    return X


def reference(A, lengths, method, rows=None, **kw):
    """Padded [batch, S or len(rows), S] from the per-example references."""
    B, S = A.shape[0], A.shape[-1]
    out = np.zeros((B, S, S))
    for b, n in enumerate(lengths):
        pad = S - n
        out[b, pad:, pad:] = ref_example(A[b, :, :, pad:, pad:], method, **kw)
    if rows is None:
        return out
    rows = np.asarray(rows)
    picked = []
    for b in range(B):
        r = rows if rows.ndim == 1 else rows[b]
        picked.append(out[b, [int(i) % S for i in r]])
    return np.stack(picked)


def call(A, method, **kw):
    if method == "rollout":
        return F.rollout(A, **kw)
    if method in ("flow", "flow_normalized"):
        return F.residual_flow(A, normalize=method == "flow_normalized", **kw)
    if method == "sum":
        return F.total_attention(A, **kw)
    return F.raw(A, **kw)


def check(got, ref, dtype):
    got = got.double().numpy()
    if dtype == torch.float64:
        assert np.abs(got - ref).max() <= 1e-6
    else:
        assert np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-12) <= 1e-4


WEIGHTS = np.random.default_rng(7).uniform(0.1, 2.0, size=(L, H))
HEADS = ["mean", "max", "weights"]
OPTIONS = [  # (method, extra kwargs)
    ("rollout", {"alpha": 0.5}),
    ("rollout", {"alpha": 0.0}),
    ("rollout", {"alpha": 0.3}),
    ("rollout", {"alpha": 0.9}),
    ("rollout", {"alpha": 1.0}),
    ("flow", {}),
    ("flow_normalized", {}),
    ("sum", {}),
    ("raw", {"layer": -1}),
    ("raw", {"layer": 0}),
    ("raw", {"layer": 1}),
]
ROWS = [None, [6], [-1, 3, 0, -2], "per-example"]
EXCLUDES = [(), (0,), (0, -1)]


def per_example_rows(lengths):
    S = max(lengths)
    return np.array([[S - 1, S - min(n, 3)] for n in lengths])  # last row and a row 3 from the end


@pytest.fixture(scope="module")
def patterns():
    return make_patterns()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("method,opts", OPTIONS, ids=lambda x: str(x))
def test_every_method_and_option_matches_reference(patterns, method, opts, dtype):
    A = torch.tensor(patterns, dtype=dtype)
    for heads, rows, exclude in itertools.product(HEADS, ROWS, EXCLUDES):
        ref_heads = WEIGHTS if heads == "weights" else heads
        lib_heads = torch.tensor(WEIGHTS) if heads == "weights" else heads
        rows_arg = per_example_rows(LENGTHS) if isinstance(rows, str) else rows
        lib_rows = torch.tensor(rows_arg) if isinstance(rows, str) else rows
        ref = reference(patterns, LENGTHS, method, rows=rows_arg, heads=ref_heads, exclude=exclude, **opts)
        got = call(A, method, heads=lib_heads, rows=lib_rows, exclude_keys=exclude, **opts)
        assert got.dtype == dtype
        assert got.shape == ref.shape, (heads, rows, exclude)
        check(got, ref, dtype)


@pytest.mark.parametrize("method", ["rollout", "flow", "flow_normalized", "sum", "raw"])
def test_compose_dispatches(patterns, method):
    A = torch.tensor(patterns)
    ref = reference(patterns, LENGTHS, method, rows=[-1], alpha=0.3, layer=0)
    check(F.compose(A, method, rows=[-1], alpha=0.3, layer=0), ref, torch.float64)


def test_key_mask_gives_the_same_as_derived_realness(patterns):
    A = torch.tensor(patterns)
    S = max(LENGTHS)
    mask = torch.tensor([[0] * (S - n) + [1] * n for n in LENGTHS])
    for method in ("rollout", "flow", "sum"):
        for ex in [(), (0,)]:
            ref = reference(patterns, LENGTHS, method, exclude=ex)
            check(F.compose(A, method, key_mask=mask, exclude_keys=ex), ref, torch.float64)


def test_key_mask_zeroes_pad_rows_that_hold_junk(patterns):
    # e.g. eager HF attention on left padding: pad query rows attend somewhere; the mask removes them
    A = torch.tensor(patterns)
    junk = A.clone()
    S = max(LENGTHS)
    mask = torch.tensor([[0] * (S - n) + [1] * n for n in LENGTHS])
    for b, n in enumerate(LENGTHS):
        junk[b, :, :, : S - n, 0] = 1.0  # pad rows attend to key 0 (a pad key)
    ref = reference(patterns, LENGTHS, "rollout")
    check(F.rollout(junk, key_mask=mask), ref, torch.float64)


def test_non_causal_patterns_are_accepted():
    lengths = (5, 3)
    A_np = make_patterns(lengths, causal=False, seed=3)
    A = torch.tensor(A_np)
    for method in ("rollout", "flow", "flow_normalized", "sum"):
        check(F.compose(A, method), reference(A_np, lengths, method), torch.float64)
        check(F.compose(A, method, rows=[-1, 2]), reference(A_np, lengths, method, rows=[-1, 2]), torch.float64)


def test_leading_batch_dims():
    A_np = make_patterns((6, 6, 6, 6, 6, 6), seed=4)
    A = torch.tensor(A_np)
    flat = F.rollout(A, rows=[-1, 2])
    nested = F.rollout(A.reshape(2, 3, *A.shape[1:]), rows=[-1, 2])
    assert nested.shape == (2, 3, 2, 6)
    torch.testing.assert_close(nested.reshape(6, 2, 6), flat)
    unbatched = F.rollout(A[0])  # no batch dim at all
    assert unbatched.shape == (6, 6)
    torch.testing.assert_close(unbatched, F.rollout(A)[0])
    per_ex = torch.tensor([[[5], [4], [3]], [[2], [1], [0]]])  # [2, 3, rows=1]
    got = F.rollout(A.reshape(2, 3, *A.shape[1:]), rows=per_ex)
    full = F.rollout(A)
    for i, r in enumerate(per_ex.reshape(-1).tolist()):
        torch.testing.assert_close(got.reshape(6, 6)[i], full[i, r])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_compute_dtype(patterns, dtype):
    A = torch.tensor(patterns).to(dtype)
    out = F.rollout(A, rows=[-1])
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # compose in float32 from the rounded float16 inputs: compare with the float64 reference of those inputs
    ref = reference(A.double().numpy(), LENGTHS, "rollout", rows=[-1])
    assert np.abs(out.double().numpy() - ref).max() <= 1e-5


def test_head_dim_one_is_already_reduced(patterns):
    A = torch.tensor(patterns)
    reduced = F.reduce_heads(A, "mean")
    assert reduced.shape == (len(LENGTHS), L, 1, 7, 7)
    torch.testing.assert_close(F.rollout(reduced), F.rollout(A))
    torch.testing.assert_close(F.reduce_heads(A, "max")[:, :, 0], A.amax(2))


def test_flow_normalized_equals_rollout_half(patterns):
    A = torch.tensor(patterns)
    for heads in ("mean", "max"):
        torch.testing.assert_close(F.residual_flow(A, normalize=True, heads=heads), F.rollout(A, 0.5, heads=heads))


# ------------------------------------------------------------------------------------
# the streaming accumulator
# ------------------------------------------------------------------------------------
def test_accumulator_bottom_up_and_top_down(patterns):
    A = torch.tensor(patterns)
    w = torch.tensor(WEIGHTS)
    for method in ("rollout", "flow", "flow_normalized", "sum"):
        acc = F.FlowAccumulator(method, alpha=0.3, heads=w, exclude_keys=(0,))
        for l in range(L):
            acc.add(A[:, l])
        ref = reference(patterns, LENGTHS, method, heads=WEIGHTS, alpha=0.3, exclude=(0,))
        check(acc.result(), ref, torch.float64)

        bottom_rows = F.FlowAccumulator(method, alpha=0.3, heads=w, rows=[-1, -2])
        for l in range(L):
            bottom_rows.add(A[:, l])
        ref = reference(patterns, LENGTHS, method, heads=WEIGHTS, alpha=0.3, rows=[-1, -2])
        check(bottom_rows.result(), ref, torch.float64)

        top = F.FlowAccumulator(method, alpha=0.3, heads=w, rows=[-1, -2], top_down=True)
        for l in reversed(range(L)):
            top.add(A[:, l], layer=l)
        ref = reference(patterns, LENGTHS, method, heads=WEIGHTS, alpha=0.3, rows=[-1, -2])
        check(top.result(), ref, torch.float64)


def test_accumulator_errors(patterns):
    A = torch.tensor(patterns)
    top = F.FlowAccumulator("rollout", heads=torch.ones(L, H), rows=[-1], top_down=True)
    with pytest.raises(BadArgumentError, match="layer=l"):
        top.add(A[:, 2])
    with pytest.raises(BadArgumentError, match="no layer was added"):
        F.FlowAccumulator().result()
    with pytest.raises(BadArgumentError, match="rows"):
        F.FlowAccumulator("flow", top_down=True)
    with pytest.raises(BadArgumentError, match="cannot be accumulated"):
        F.FlowAccumulator("raw")


# ------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("method", ["rollout", "flow", "flow_normalized", "sum", "raw"])
def test_non_finite_names_the_layer(patterns, bad, method):
    A = torch.tensor(patterns, dtype=torch.float32)
    layer = 2 if method == "raw" else 1  # raw reads only its layer (the last)
    A[3, layer, 2, 6, 6] = bad  # a single value, in the one-token example
    with pytest.raises(NonFiniteError, match=f"layer {layer}"):
        F.compose(A, method)
    with pytest.raises(NonFiniteError, match=f"layer {layer}"):
        F.compose(A, method, rows=[-1])
    A[3, layer, 2, 6, 6] = 1.0
    A[0, layer, 0, 2, 5] = bad  # a value above the diagonal (where a causal matmul might skip it)
    with pytest.raises(NonFiniteError, match=f"layer {layer}"):
        F.compose(A, method, rows=[0])


def test_shape_errors(patterns):
    A = torch.tensor(patterns)
    with pytest.raises(ShapeError, match=r"expected \(\*batch, layer, head, query, key\)"):
        F.rollout(A[0, 0, 0])
    with pytest.raises(ShapeError, match=r"\(\*batch, layer, head, 7, 7\).*rows=None"):
        F.rollout(A[..., -2:, :])
    with pytest.raises(ShapeError, match=r"expected \(5, 7\)"):
        F.rollout(A, key_mask=torch.ones(5, 6))
    with pytest.raises(ShapeError, match=r"expected \(layer=3, head=4\)"):
        F.rollout(A, heads=torch.ones(3, 5))
    with pytest.raises(ShapeError, match=r"rows has shape \(4, 1\)"):
        F.rollout(A, rows=torch.zeros(4, 1, dtype=torch.long))


def test_bad_arguments(patterns):
    A = torch.tensor(patterns)
    with pytest.raises(BadArgumentError, match="heads='median'"):
        F.rollout(A, heads="median")
    with pytest.raises(BadArgumentError, match="alpha=1.5"):
        F.rollout(A, alpha=1.5)
    with pytest.raises(BadArgumentError, match="method='attention'"):
        F.compose(A, "attention")
    with pytest.raises(BadArgumentError, match=r"rows must lie in \[-7, 7\)"):
        F.rollout(A, rows=[7])
    with pytest.raises(BadArgumentError, match="layer=3"):
        F.raw(A, layer=3)
    with pytest.raises(BadArgumentError, match="positive sum"):
        F.rollout(A, heads=torch.zeros(L, H))
    with pytest.raises(BadArgumentError, match="floating-point"):
        F.rollout(A.long())


def test_raw_accepts_a_subset_of_query_rows(patterns):
    A = torch.tensor(patterns)[..., -2:, :]  # like a trace recorded with rows=[-2, -1]
    full = reference(patterns, LENGTHS, "raw", exclude=(0,))
    check(F.raw(A, exclude_keys=(0,)), full[:, -2:], torch.float64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(patterns):
    A = torch.tensor(patterns, dtype=torch.float32)
    for method in ("rollout", "flow", "sum", "raw"):
        for rows in (None, [-1, 2]):
            gpu = F.compose(A.cuda(), method, rows=rows, exclude_keys=(0,))
            assert gpu.device.type == "cuda"
            torch.testing.assert_close(gpu.cpu(), F.compose(A, method, rows=rows, exclude_keys=(0,)), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_layer_loop_never_synchronises(patterns):
    A = torch.tensor(patterns, dtype=torch.float16, device="cuda")
    for method, top_down in (("rollout", True), ("flow", False), ("sum", False)):
        acc = F.FlowAccumulator(method, rows=[-1, 2] if top_down else None, exclude_keys=(0,), top_down=top_down)
        order = list(reversed(range(L))) if top_down else list(range(L))
        acc.add(A[:, order[0]], layer=order[0])  # the first layer sets up masks and row indices
        torch.cuda.set_sync_debug_mode("error")
        try:
            for l in order[1:]:
                acc.add(A[:, l], layer=l)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert acc.result().dtype == torch.float32
