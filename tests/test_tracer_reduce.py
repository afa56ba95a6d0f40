"""reduce.attention_pattern against transformers' own eager attention functions, variant by variant."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward as gemma2_eager
from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward as gpt_oss_eager
from transformers.models.llama.modeling_llama import eager_attention_forward as llama_eager

from attnflow.tracers.reduce import attention_pattern, interface_pattern, one_query_pattern, reduce_heads

B, HQ, HKV, Q, D = 2, 4, 2, 6, 8
LOW = torch.finfo(torch.float32).min


@pytest.fixture
def qkv():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, HQ, Q, D, generator=g) * 3
    k = torch.randn(B, HKV, Q, D, generator=g) * 3
    v = torch.randn(B, HKV, Q, D, generator=g)
    return q, k, v


def module(**kw):
    return SimpleNamespace(num_key_value_groups=HQ // HKV, head_dim=D, training=False, **kw)


def causal_bool(pad=(0, 2), window=None):
    """[batch, 1, q, k] True = attend: causal, left padding `pad[b]`, optional sliding window."""
    i = torch.arange(Q)
    m = i.view(Q, 1) >= i.view(1, Q)
    if window is not None:
        m &= i.view(Q, 1) - i.view(1, Q) < window
    m = m.expand(B, 1, Q, Q).clone()
    for b, p in enumerate(pad):
        m[b, :, :, :p] = False
    return m


def additive(mask):
    return torch.zeros(mask.shape).masked_fill(~mask, LOW)


def test_gqa_bool_and_additive_masks_match_eager(qkv):
    q, k, v = qkv
    mask = causal_bool()
    _, ref = llama_eager(module(), q, k, v, additive(mask), scaling=D**-0.5)
    for m in (mask, additive(mask)):
        P = attention_pattern(q, k, m, D**-0.5)
        assert P.dtype == torch.float32 and torch.isfinite(P).all()
        assert (P - ref).abs().max() < 1e-6
    # a fully masked (pad) row is finite: uniform, as in eager, never NaN; -1 rows are zero
    P = attention_pattern(q, k, mask, D**-0.5, row_index=torch.tensor([[0, 1], [-1, 0]]))
    assert torch.isfinite(P).all() and torch.allclose(P[1, :, 1], torch.full((HQ, Q), 1 / Q))
    assert (P[1, :, 0] == 0).all()
    inf_mask = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    assert torch.isfinite(attention_pattern(q, k, inf_mask, D**-0.5)).all()


def test_no_mask_is_causal_and_not_causal(qkv):
    q, k, v = qkv
    _, ref = llama_eager(module(), q, k, v, additive(causal_bool(pad=(0, 0))), scaling=0.3)
    assert (attention_pattern(q, k, None, 0.3, is_causal=True) - ref).abs().max() < 1e-6
    _, full = llama_eager(module(), q, k, v, None, scaling=0.3)
    assert (attention_pattern(q, k, None, 0.3, is_causal=False) - full).abs().max() < 1e-6
    assert (attention_pattern(q, k, None, None) - attention_pattern(q, k, None, D**-0.5)).abs().max() == 0


def test_flash_style_padding_mask(qkv):
    q, k, v = qkv
    mask = causal_bool(pad=(0, 2))
    padding = torch.tensor([[1] * Q, [0, 0] + [1] * (Q - 2)])  # [batch, key], as flash attention gets it
    want = attention_pattern(q, k, mask, D**-0.5)[:, :, 2:]
    rows = torch.arange(2, Q).expand(B, Q - 2)  # the real rows of both examples
    assert (attention_pattern(q, k, padding, D**-0.5, is_causal=True, row_index=rows) - want).abs().max() < 1e-6


def test_sliding_window_without_mask_equals_window_mask(qkv):
    q, k, v = qkv
    mask = causal_bool(pad=(0, 0), window=3)
    _, ref = llama_eager(module(), q, k, v, additive(mask), scaling=D**-0.5)
    P = attention_pattern(q, k, None, D**-0.5, is_causal=True, sliding_window=3)
    assert (P - ref).abs().max() < 1e-6
    assert (P[..., 5, :3] == 0).all() and (P[..., 5, 3:] > 0).all()
    # with a mask that already holds the window, applying it again changes nothing
    assert (attention_pattern(q, k, mask, D**-0.5, sliding_window=3) - ref).abs().max() < 1e-6


def test_softcap_matches_gemma2_eager(qkv):
    q, k, v = qkv
    mask = causal_bool()
    _, ref = gemma2_eager(module(), q, k, v, additive(mask), scaling=0.5, softcap=2.0)
    P = attention_pattern(q, k, mask, 0.5, softcap=2.0)
    assert (P - ref).abs().max() < 1e-6
    assert (attention_pattern(q, k, mask, 0.5) - P).abs().max() > 0.05  # the cap matters here


def test_sinks_match_gpt_oss_eager(qkv):
    q, k, v = qkv
    sinks = torch.tensor([0.0, 2.0, -1.0, 5.0])
    mask = causal_bool(pad=(0, 0))
    _, ref = gpt_oss_eager(module(sinks=sinks), q, k, v, additive(mask), scaling=D**-0.5)
    P = attention_pattern(q, k, mask, D**-0.5, sinks=sinks)
    assert (P - ref).abs().max() < 1e-6
    assert (P.sum(-1) <= 1 + 1e-6).all() and (P.sum(-1) < 0.9).any()  # the sink takes mass


def test_row_index_gathers_rows_and_zeroes_missing(qkv):
    q, k, _ = qkv
    mask = causal_bool()
    full = attention_pattern(q, k, mask, D**-0.5)
    rows = torch.tensor([[-1, 0, 5], [3, 4, 5]])
    P = attention_pattern(q, k, mask, D**-0.5, row_index=rows)
    assert P.shape == (B, HQ, 3, Q)
    assert (P[0, :, 0] == 0).all()
    assert torch.allclose(P[0, :, 1:], full[0, :, [0, 5]], atol=1e-6)
    assert torch.allclose(P[1], full[1, :, 3:], atol=1e-6)


def test_position_bias_and_per_head_mask(qkv):
    q, k, v = qkv
    bias = torch.randn(1, HQ, Q, Q)
    mask = causal_bool(pad=(0, 0))
    _, ref = llama_eager(module(), q, k, v, additive(mask) + bias, scaling=D**-0.5)
    assert (attention_pattern(q, k, mask, D**-0.5, position_bias=bias) - ref).abs().max() < 1e-6
    per_head = additive(mask).expand(B, HQ, Q, Q) + bias
    assert (attention_pattern(q, k, per_head, D**-0.5) - ref).abs().max() < 1e-6


def test_interface_pattern_reads_call_arguments(qkv):
    q, k, v = qkv
    mask = causal_bool(pad=(0, 0))
    args = (module(), q, k, v, mask)
    got = interface_pattern(
        args, {"scaling": 0.5, "softcap": 2.0, "dropout": 0.0}, row_index=torch.tensor([[5], [5]]),
        heads="mean", dtype=torch.float16, is_causal=True,
    )
    want = attention_pattern(q, k, mask, 0.5, softcap=2.0)[:, :, 5:].mean(1, keepdim=True)
    assert got.dtype == torch.float16 and got.shape == (B, 1, 1, Q)
    assert (got.float() - want).abs().max() < 1e-3
    # is_causal=False as a kwarg overrides the module flag
    nc = interface_pattern(args[:4] + (None,), {"is_causal": False}, row_index=torch.tensor([[0], [0]]),
                           heads="all", dtype=torch.float32, is_causal=True)
    assert (nc[..., 0, 1:] > 0).all()


def test_reduce_heads():
    P = torch.rand(2, 4, 3, 5)
    assert torch.equal(reduce_heads(P, "all"), P)
    assert torch.allclose(reduce_heads(P, "mean")[:, 0], P.mean(1))
    assert torch.equal(reduce_heads(P, "max")[:, 0], P.amax(1))
    w = torch.tensor([0.5, 0.5, 0.0, 0.0])
    assert torch.allclose(reduce_heads(P, w)[:, 0], (P[:, 0] + P[:, 1]) / 2)
    with pytest.raises(ValueError):
        reduce_heads(P, "median")


def test_shape_mismatch_names_shapes():
    with pytest.raises(ValueError, match=r"\(1, 3, 2, 8\)"):
        attention_pattern(torch.zeros(1, 3, 2, 8), torch.zeros(1, 2, 2, 8), None)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["none", "per head", "per key"])
def test_head_sum_equals_a_float64_loop(dtype, kind):
    """reduce.head_sum (the eval's and flow's head reduction) against an explicit float64 loop over heads."""
    from attnflow.tracers.reduce import head_sum

    g = torch.Generator().manual_seed(7)
    P = torch.rand(2, 5, 6, 7, generator=g).to(dtype)  # batch head query key
    weights = {"none": None, "per head": torch.rand(5, generator=g), "per key": torch.rand(2, 5, 7, generator=g)}[kind]
    want = torch.zeros(2, 6, 7, dtype=torch.float64)
    for b in range(2):
        for h in range(5):
            w = 1.0 if weights is None else weights[h].double() if kind == "per head" else weights[b, h].double()[None, :]
            want[b] += P[b, h].double() * w
    got = head_sum(P, weights)  # float32 for a float16 input: never summed in half precision
    assert got.dtype == (torch.float32 if dtype == torch.float16 else dtype) and got.shape == (2, 6, 7)
    assert (got.double() - want).abs().max() < (1e-12 if dtype == torch.float64 else 1e-5)
    assert P.dtype == dtype and P.shape == (2, 5, 6, 7)  # the input is left as it was


@pytest.mark.parametrize("kind", ["none", "bool", "additive"])
@pytest.mark.parametrize("heads", ["all", "mean", "max", "norm", "weights"])
def test_one_query_call_matches_eager(qkv, kind, heads, monkeypatch):
    """A decode step's call (one query over the cached keys) takes `one_query_pattern`: equal to eager, every head mode."""
    import attnflow.tracers.reduce as reduce

    q, k, v = qkv
    q1 = q[:, :, -1:]  # the newest token's query; the keys are the cache's
    pad = torch.ones(B, 1, 1, Q, dtype=torch.bool)
    pad[1, ..., :2] = False  # example 1 is left-padded
    mask = {"none": None, "bool": pad, "additive": additive(pad)}[kind]
    _, ref = llama_eager(module(), q1, k, v, None if mask is None else additive(pad), scaling=0.4)  # [b, head, 1, key]
    norms = torch.rand(B, HQ, Q) + 0.5
    weights = torch.tensor([0.1, 0.2, 0.3, 0.4])
    mode = weights if heads == "weights" else heads
    calls = []
    monkeypatch.setattr(reduce, "one_query_pattern", lambda *a: calls.append(1) or one_query_pattern(*a))
    got = interface_pattern((module(), q1, k, v, mask), {"scaling": 0.4}, row_index=torch.zeros(B, 1, dtype=torch.long),
                            heads=mode, dtype=None, is_causal=True, value_norms=norms)
    assert calls == [1]  # the fast path ran
    want = reduce_heads(ref.double(), weights.double() if heads == "weights" else heads, norms.double())
    assert got.shape == want.shape and (got.double() - want).abs().max() < 1e-6
    if mask is not None:
        assert got[1, ..., :2].abs().max() == 0  # padding keys get nothing


def test_one_query_call_with_window_or_sinks_takes_the_general_path(qkv, monkeypatch):
    import attnflow.tracers.reduce as reduce

    q, k, v = qkv
    monkeypatch.setattr(reduce, "one_query_pattern", lambda *a: pytest.fail("fast path taken"))
    row = torch.zeros(B, 1, dtype=torch.long)
    for kw in ({"sliding_window": 3}, {"s_aux": torch.zeros(HQ)}, {"softcap": 5.0}):
        got = interface_pattern((module(), q[:, :, -1:], k, v, None), kw, row_index=row, heads="all", dtype=None,
                                is_causal=True)
        want = attention_pattern(q[:, :, -1:], k, None, None, sliding_window=kw.get("sliding_window"),
                                 sinks=kw.get("s_aux"), softcap=kw.get("softcap"))
        assert (got - want).abs().max() < 1e-6
