"""heads="norm" (Kobayashi et al. 2020): α^h_ij·‖W_O^h v^h_j‖, heads summed, rows renormalised.

The reference takes a tiny float64 llama (GQA: 4 query heads over 2 kv heads), recomputes each
head's values from the layer's input and the weights, multiplies by the output projection's column
block, and builds the reduced pattern in a plain per-head loop.  A hook on the attention module
checks that those pieces reassemble the module's own output.
"""

from __future__ import annotations

import pytest
import torch

import attnflow.flow as F
from attnflow.errors import BadArgumentError, ShapeError
from tiny_models import eager_copy, eager_run, prompts_ids, tiny_model


def transformed_values(model, ids):
    """Per layer: eager patterns [head, q, k], the value vectors f_h(x_j) = W_O^h v^h_j [head, key, hidden], attn output."""
    cfg = model.config
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = cfg.hidden_size // H
    res, outs = eager_run(model, ids)
    layers = []
    for l, layer in enumerate(model.model.layers):
        with torch.no_grad():
            x = layer.input_layernorm(res.hidden_states[l][0])  # [key, hidden]: the attention's input
            v = layer.self_attn.v_proj(x).view(len(ids), Hkv, d)  # [key, kv_head, d]
        W_O = layer.self_attn.o_proj.weight.detach()  # [hidden, H·d]
        f = torch.stack([v[:, h // (H // Hkv)] @ W_O[:, h * d : (h + 1) * d].T for h in range(H)])  # [head, key, hidden]
        layers.append((res.attentions[l][0], f, outs[l]))
    return layers


@pytest.fixture(scope="module")
def tiny():
    model = eager_copy(tiny_model("llama", seed=3)).double()
    ids = prompts_ids((9,), seed=5)[0]
    return model, ids, transformed_values(model, ids)


def test_transformed_values_reassemble_the_attention_output(tiny):
    # Σ_h Σ_j α^h_ij f_h(x_j) is the module's output (o_proj has no bias): the reference pieces are the model's
    for A, f, out in tiny[2]:
        torch.testing.assert_close(torch.einsum("hqk,hkd->qd", A, f), out, rtol=1e-10, atol=1e-12)


def test_norm_reduction_matches_a_per_head_loop(tiny):
    _, ids, layers = tiny
    A = torch.stack([a for a, _, _ in layers])[None]  # [1, layer, head, q, k]
    norms = torch.stack([f.norm(dim=-1) for _, f, _ in layers])[None]  # [1, layer, head, key]
    N = len(ids)
    ref = torch.zeros(len(layers), N, N, dtype=torch.float64)
    for l, (a, f, _) in enumerate(layers):
        for i in range(N):
            row = [sum(float(a[h, i, j]) * float(f[h, j].norm()) for h in range(a.shape[0])) for j in range(N)]
            total = sum(row)
            ref[l, i] = torch.tensor([r / total for r in row], dtype=torch.float64)
    got = F.reduce_heads(A, "norm", value_norms=norms)[0, :, 0]
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
    # the weighting moves mass: not the plain head mean
    assert (got - F.reduce_heads(A, "mean")[0, :, 0]).abs().max() > 1e-3
    # every composed method reduces the same way: rollout of the reduced patterns
    torch.testing.assert_close(
        F.rollout(A, heads="norm", value_norms=norms), F.rollout(ref[None, :, None]), rtol=1e-12, atol=1e-14
    )
    torch.testing.assert_close(
        F.rollout(A, heads="norm", value_norms=norms, rows=[-1]), F.rollout(ref[None, :, None])[:, -1:], rtol=1e-12, atol=1e-14
    )
    torch.testing.assert_close(
        F.compose(A, "raw", heads="norm", value_norms=norms), ref[None, -1], rtol=1e-12, atol=1e-14
    )


def test_uniform_norms_are_the_head_mean_and_padding_is_neutral():
    g = torch.Generator().manual_seed(0)
    A = torch.rand(1, 3, 4, 6, 6, generator=g, dtype=torch.float64).tril()
    A = A / A.sum(-1, keepdim=True)
    ones = torch.ones(1, 3, 4, 6, dtype=torch.float64)
    torch.testing.assert_close(F.reduce_heads(A, "norm", value_norms=ones), F.reduce_heads(A, "mean"))
    norms = torch.rand(1, 3, 4, 6, generator=g, dtype=torch.float64) + 0.1
    # the same example left-padded by 2 inside a batch gives the same rows
    P = torch.zeros(2, 3, 4, 8, 8, dtype=torch.float64)
    P[0, :, :, 2:, 2:] = A[0]
    P[1, :, :, 2:, 2:] = A[0]
    n = torch.zeros(2, 3, 4, 8, dtype=torch.float64)
    n[:, :, :, 2:] = norms[0]
    mask = torch.tensor([[0, 0] + [1] * 6] * 2)
    alone = F.total_attention(A, heads="norm", value_norms=norms)
    padded = F.total_attention(P, heads="norm", value_norms=n, key_mask=mask)
    torch.testing.assert_close(padded[0, 2:, 2:], alone[0])
    assert not padded[:, :2].any() and not padded[:, :, :2].any()


def test_norm_errors():
    A = torch.rand(1, 2, 4, 5, 5).tril()
    with pytest.raises(BadArgumentError, match="needs value_norms"):
        F.rollout(A, heads="norm")
    with pytest.raises(BadArgumentError, match="only with heads='norm'"):
        F.rollout(A, value_norms=torch.ones(1, 2, 4, 5))
    with pytest.raises(ShapeError, match="value_norms have shape"):
        F.rollout(A, heads="norm", value_norms=torch.ones(1, 2, 5))
