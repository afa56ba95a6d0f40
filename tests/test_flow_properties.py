"""Hypothesis properties of attnflow.flow on random causal row-stochastic patterns with padding."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnflow import flow as F

SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def padded_patterns(draw, max_len=6, max_layers=4, max_heads=3):
    """(A [batch, layer, head, S, S] float64, lengths): left-padded, pad rows/keys zero."""
    lengths = draw(st.lists(st.integers(1, max_len), min_size=1, max_size=4))
    L = draw(st.integers(1, max_layers))
    H = draw(st.integers(1, max_heads))
    peak = draw(st.floats(0.0, 6.0))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    B, S = len(lengths), max(lengths)
    logits = torch.randn(B, L, H, S, S, generator=g, dtype=torch.float64) * peak
    real = torch.tensor([[p >= S - n for p in range(S)] for n in lengths])  # [batch, S]
    allowed = real[:, None, :] & real[:, :, None] & torch.ones(S, S, dtype=torch.bool).tril()
    A = logits.masked_fill(~allowed[:, None, None], float("-inf")).softmax(-1).nan_to_num(0.0)
    return A, lengths


def _ones_on_real_rows(lengths, S, value):
    return torch.tensor([[value if p >= S - n else 0.0 for p in range(S)] for n in lengths], dtype=torch.float64)


@SETTINGS
@given(padded_patterns(), st.floats(0.0, 1.0), st.sampled_from(["mean", "max"]), st.sampled_from([(), (0,), (-1,)]))
def test_rollout_rows_sum_to_one(data, alpha, heads, exclude):
    A, lengths = data
    R = F.rollout(A, alpha=alpha, heads=heads, exclude_keys=exclude)
    sums = R.sum(-1)
    expected = _ones_on_real_rows(lengths, A.shape[-1], 1.0)
    if alpha == 1.0 and exclude:  # a row whose only key was excluded has no mass left to carry
        expected = torch.where(sums == 0, 0.0, expected)
    torch.testing.assert_close(sums, expected)


@SETTINGS
@given(padded_patterns())
def test_unnormalised_flow_rows_sum_to_two_to_the_L(data):
    A, lengths = data
    X = F.residual_flow(A)
    expected = _ones_on_real_rows(lengths, A.shape[-1], 2.0 ** A.shape[1])
    torch.testing.assert_close(X.sum(-1), expected)


@SETTINGS
@given(
    padded_patterns(),
    st.sampled_from(["rollout", "flow", "flow_normalized", "sum", "raw"]),
    st.sampled_from([(), (0,)]),
    st.data(),
)
def test_target_rows_equal_rows_of_the_full_result(data, method, exclude, pick):
    A, _ = data
    S = A.shape[-1]
    rows = pick.draw(st.lists(st.integers(-S, S - 1), min_size=1, max_size=S))
    full = F.compose(A, method, exclude_keys=exclude)
    part = F.compose(A, method, rows=rows, exclude_keys=exclude)
    torch.testing.assert_close(part, full[:, [r % S for r in rows]])


@SETTINGS
@given(
    padded_patterns(),
    st.sampled_from(["rollout", "flow", "flow_normalized", "sum", "raw"]),
    st.sampled_from([(), (0,), (0, -1)]),
    st.sampled_from(["mean", "max"]),
)
def test_an_example_alone_equals_it_inside_a_padded_batch(data, method, exclude, heads):
    A, lengths = data
    S = A.shape[-1]
    batch = F.compose(A, method, exclude_keys=exclude, heads=heads)
    last = F.compose(A, method, exclude_keys=exclude, heads=heads, rows=[-1])
    for b, n in enumerate(lengths):
        pad = S - n
        alone_A = A[b : b + 1, :, :, pad:, pad:]
        alone = F.compose(alone_A, method, exclude_keys=exclude, heads=heads)
        torch.testing.assert_close(batch[b, pad:, pad:], alone[0])
        assert not batch[b, :pad].any() and not batch[b, :, :pad].any()  # pad rows and keys stay zero
        torch.testing.assert_close(last[b, 0, pad:], alone[0, -1])


@pytest.mark.parametrize("method", ["rollout", "flow"])
def test_rows_mode_does_less_work(method):
    """Top-down rows never build an N x N product: the accumulator state is [*batch, rows, key]."""
    A = torch.rand(2, 3, 1, 50, 50).tril()
    A = A / A.sum(-1, keepdim=True)
    acc = F.FlowAccumulator(method, rows=[-1], top_down=True)
    for l in reversed(range(3)):
        acc.add(A[:, l], layer=l)
        assert acc.state.shape == (2, 1, 50)
