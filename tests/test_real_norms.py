"""The real-model tier for `trace(norms=True)`: SmolLM2-135M-Instruct (GQA: 9 query heads over 3 kv heads).

The reference hooks the model's own `v_proj` and attention modules in a plain forward (sdpa, no
attnflow), multiplies each head's values by its column block of `o_proj` in a per-head loop,
and composes the measured rollout in a float64 loop over the layers.
"""

from __future__ import annotations

import pytest
import torch

import attnflow as af

pytestmark = pytest.mark.real

TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a small brass lamp and a "
    "notebook in which he wrote down the ships that passed, the colour of the sea, and the direction of the wind. "
    "One winter night a storm tore the shutters from the windows, and he stayed awake until dawn, watching a "
    "fishing boat fight its way home through the waves. In the morning the harbour master came to thank him, "
    "and the two men drank tea by the window while the gulls circled the rocks below and the tide went out."
)


def hooked_run(hf, ids):
    """(values [layer, key, kv_head, d], attention outputs [layer, query, hidden], residual inputs [layer, query, hidden])."""
    cfg = hf.config
    d = cfg.hidden_size // cfg.num_attention_heads
    vs, outs = {}, {}
    hooks = []
    for l, layer in enumerate(hf.model.layers):
        hooks.append(layer.self_attn.v_proj.register_forward_hook(lambda m, a, o, l=l: vs.__setitem__(l, o[0])))
        hooks.append(layer.self_attn.register_forward_hook(lambda m, a, o, l=l: outs.__setitem__(l, o[0][0])))
    try:
        with torch.no_grad():
            res = hf(torch.tensor([ids]), output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    L = len(hf.model.layers)
    values = torch.stack([vs[l].view(len(ids), -1, d) for l in range(L)])
    return values, torch.stack([outs[l] for l in range(L)]), torch.stack([res.hidden_states[l][0] for l in range(L)])


def test_value_norms_and_measured_rollout_match_loops(smollm2):
    hf = smollm2.hf
    ids = smollm2.tok(TEXT).input_ids[:100]
    assert len(ids) == 100
    tr = af.trace(smollm2.model, [ids], norms=True, heads="mean", dtype=torch.float32, progress=False)
    values, outs, residual = hooked_run(hf, ids)
    H, Hkv = hf.config.num_attention_heads, hf.config.num_key_value_heads
    d = hf.config.hidden_size // H
    for l, layer in enumerate(hf.model.layers):
        W_O = layer.self_attn.o_proj.weight.detach()  # [hidden, H·d]
        want = torch.stack([(values[l, :, h // (H // Hkv)] @ W_O[:, h * d : (h + 1) * d].T).norm(dim=-1) for h in range(H)])
        torch.testing.assert_close(tr.norms["value"][0, l], want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(tr.norms["attn"][0], outs.norm(dim=-1), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(tr.norms["residual"][0], residual.norm(dim=-1), rtol=1e-4, atol=1e-6)

    # measured rollout of the recorded patterns and norms against a float64 loop over the layers
    A = tr.patterns[0, :, 0].double()  # [layer, query, key], heads already averaged in the trace
    w = tr.norms["attn"][0].double() / (tr.norms["attn"][0].double() + tr.norms["residual"][0].double())  # [layer, query]
    R = torch.eye(len(ids), dtype=torch.float64)
    for l in range(A.shape[0]):
        mixed = w[l, :, None] * A[l] + (1 - w[l, :, None]) * torch.eye(len(ids), dtype=torch.float64)
        R = (mixed / mixed.sum(-1, keepdim=True)) @ R
    got = af.flow.measured_rollout(tr.patterns, tr.norms["attn"], tr.norms["residual"])[0]
    torch.testing.assert_close(got.double(), R, rtol=1e-4, atol=1e-6)
    # the measured attention share is far from the fixed 0.5 on a real model
    assert float((w - 0.5).abs().mean()) > 0.1
