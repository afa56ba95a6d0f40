"""head_weights_from_o_proj against per-head slicing written out by hand (Llama o_proj, GPT-2 c_proj)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from attnflow import flow as F
from attnflow.errors import BadArgumentError
from attnflow.tracers.heads import head_weights_from_o_proj

HEADS, HEAD_DIM, LAYERS = 4, 8, 3


def by_hand(blocks_per_layer):
    out = []
    for blocks in blocks_per_layer:
        norms = torch.tensor([float((b.detach().double() ** 2).sum().sqrt()) for b in blocks])
        out.append(norms / norms.sum())
    return torch.stack(out).float()


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=HEADS * HEAD_DIM, intermediate_size=64, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=64,
    )
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # make heads distinct, and make rows-vs-columns slicing disagree
        for i, layer in enumerate(model.model.layers):
            W = layer.self_attn.o_proj.weight  # [hidden, heads*d]
            W[:, HEAD_DIM : 2 * HEAD_DIM] *= 3.0 + i  # head 1's column block
            W[: HEAD_DIM, :] *= 0.1  # a row block: must not look like a head
    return model


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(1)
    cfg = GPT2Config(vocab_size=64, n_embd=HEADS * HEAD_DIM, n_layer=LAYERS, n_head=HEADS, n_positions=64)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for i, block in enumerate(model.transformer.h):
            W = block.attn.c_proj.weight  # Conv1D [heads*d (in), hidden (out)]
            W[2 * HEAD_DIM : 3 * HEAD_DIM, :] *= 4.0 + i  # head 2's input features
            W[:, : HEAD_DIM] *= 0.1  # output features: must not look like a head
    return model


def test_llama_o_proj_column_blocks(llama):
    expected = by_hand(
        [[layer.self_attn.o_proj.weight[:, h * HEAD_DIM : (h + 1) * HEAD_DIM] for h in range(HEADS)] for layer in llama.model.layers]
    )
    wrong = by_hand(  # the known bug: slicing rows (output features) per head
        [[layer.self_attn.o_proj.weight[h * HEAD_DIM : (h + 1) * HEAD_DIM, :] for h in range(HEADS)] for layer in llama.model.layers]
    )
    got = head_weights_from_o_proj(llama)
    assert got.shape == (LAYERS, HEADS)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert (got - wrong).abs().max() > 0.05
    torch.testing.assert_close(got.sum(-1), torch.ones(LAYERS))
    assert got.argmax(-1).tolist() == [1] * LAYERS


def test_gpt2_c_proj_conv1d_row_blocks(gpt2):
    expected = by_hand(
        [[block.attn.c_proj.weight[h * HEAD_DIM : (h + 1) * HEAD_DIM, :] for h in range(HEADS)] for block in gpt2.transformer.h]
    )
    wrong = by_hand(
        [[block.attn.c_proj.weight[:, h * HEAD_DIM : (h + 1) * HEAD_DIM] for h in range(HEADS)] for block in gpt2.transformer.h]
    )
    got = head_weights_from_o_proj(gpt2)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert (got - wrong).abs().max() > 0.05
    assert got.argmax(-1).tolist() == [2] * LAYERS  # GPT-2's MLP c_proj is not mistaken for attention


def test_wrapped_model_is_unwrapped(llama):
    import types

    wrapper = types.SimpleNamespace(_module=llama)  # what nnsight.TransformersModel keeps
    torch.testing.assert_close(head_weights_from_o_proj(wrapper), head_weights_from_o_proj(llama))
    with pytest.raises(BadArgumentError, match="needs a torch module"):
        head_weights_from_o_proj(object())


def test_weights_feed_rollout(llama):
    w = head_weights_from_o_proj(llama)
    A = torch.rand(2, LAYERS, HEADS, 5, 5).tril()
    A = A / A.sum(-1, keepdim=True)
    by_einsum = torch.einsum("blhqk,lh->blqk", A, w).unsqueeze(2)
    torch.testing.assert_close(F.rollout(A, heads=w), F.rollout(by_einsum))


def test_transformer_lens_style_W_O():
    class Attn(torch.nn.Module):
        def __init__(self, scale):
            super().__init__()
            self.W_O = torch.nn.Parameter(torch.ones(HEADS, HEAD_DIM, 16) * torch.tensor(scale).view(-1, 1, 1))

    model = torch.nn.ModuleList([Attn([1.0, 2.0, 3.0, 4.0]), Attn([1.0, 1.0, 1.0, 1.0])])
    torch.testing.assert_close(head_weights_from_o_proj(model), torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25] * 4]))


def test_no_attention_module():
    with pytest.raises(BadArgumentError, match="no attention output projection"):
        head_weights_from_o_proj(torch.nn.Sequential(torch.nn.Linear(4, 4)))
