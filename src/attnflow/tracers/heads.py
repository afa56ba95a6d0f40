"""Per-head weights read from a model's own parameters, for `heads=` of the tracer and of `attnflow.flow`.

This is the one place that knows where attention modules keep their output
projection (HF `nn.Linear` o_proj / out_proj / dense, GPT-2's `Conv1D` c_proj,
TransformerLens's `W_O`), and how nnsight wraps a module; `flow.py` stays pure
tensor math.

    >>> from transformers import AutoModelForCausalLM, LlamaConfig
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    >>> w = head_weights_from_o_proj(AutoModelForCausalLM.from_config(cfg))
    >>> w.shape, bool(torch.allclose(w.sum(-1), torch.ones(2)))      # [layer, head], each layer sums to 1
    (torch.Size([2, 4]), True)

Pass `w` as `heads=w` to `attnflow.flow.rollout` on a trace recorded with
heads="all", or to `attnflow.trace` to record the weighted mean directly.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn

from attnflow.errors import BadArgumentError, ShapeError
from attnflow.flow import normalize_head_weights
from attnflow.tracers.reduce import output_blocks

PROJ_NAMES = ("o_proj", "out_proj", "c_proj", "dense")


def head_weights_from_o_proj(model: nn.Module | object) -> Float[Tensor, "layer head"]:
    """Per-head weights from the output projection: ‖W_O[:, head h's columns]‖_F, normalised per layer.

    Head h writes to the residual stream through the input features
    `h·d : (h+1)·d` of the output projection (its *column* block for an
    `nn.Linear` `o_proj` of weight `[hidden, heads·d]`, its *row* block for GPT-2's
    `Conv1D` `c_proj` of weight `[heads·d, hidden]`, `W_O[h]` for a
    TransformerLens `W_O [head, d, hidden]`).  Attention modules are found
    generically: modules whose class name contains "Attention" (or that have
    `head_dim`) and own one of `o_proj`, `out_proj`, `c_proj`, `dense`, or a 3-D `W_O`.

        >>> W_O = torch.ones(4, 8, 16) * torch.tensor([1., 2., 3., 4.]).view(-1, 1, 1)   # head h scaled by h+1
        >>> attn = nn.Module(); attn.W_O = nn.Parameter(W_O)
        >>> head_weights_from_o_proj(nn.ModuleList([attn]))
        tensor([[0.1000, 0.2000, 0.3000, 0.4000]])
    """
    if not isinstance(model, nn.Module):  # an nnsight model wraps the HF module
        model = getattr(model, "_module", None) or getattr(model, "_model", None)
    if not isinstance(model, nn.Module):
        raise BadArgumentError(
            "head_weights_from_o_proj needs a torch module (an HF or TransformerLens model, or an nnsight wrapper of one)"
        )
    norms = []
    for module in model.modules():
        block = o_proj_blocks(module, model)
        if block is not None:
            norms.append(torch.linalg.vector_norm(block.detach().float(), dim=(-2, -1)))  # [head]
    if not norms:
        raise BadArgumentError(
            f"found no attention output projection in {type(model).__name__}; "
            "pass heads='mean' or your own weights [layer, head]"
        )
    return normalize_head_weights(torch.stack(norms))  # [layer, head]


def o_proj_blocks(module: nn.Module, model: nn.Module) -> Float[Tensor, "head d hidden"] | None:
    """`[head, d, hidden]` blocks of the module's output projection, or None if it is no attention module."""
    W_O = getattr(module, "W_O", None)
    if isinstance(W_O, Tensor) and W_O.ndim == 3:
        return W_O
    found = output_projection(module)
    if found is None:
        return None
    name, conv1d = found
    weight = getattr(module, name).weight
    heads = num_heads(module, model)
    if weight.shape[0 if conv1d else 1] % heads:
        raise ShapeError(
            f"{type(module).__name__} output projection has {weight.shape[0 if conv1d else 1]} input features, "
            f"not divisible by {heads} heads"
        )
    return output_blocks(weight, heads, conv1d)


def output_projection(module: nn.Module) -> tuple[str, bool] | None:
    """(attribute name, is GPT-2's Conv1D) of an HF attention module's output projection, or None if it has none.

        >>> from transformers import AutoModelForCausalLM, LlamaConfig
        >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
        >>> output_projection(AutoModelForCausalLM.from_config(cfg).model.layers[0].self_attn)
        ('o_proj', False)
    """
    if "Attention" not in type(module).__name__ and not hasattr(module, "head_dim"):
        return None
    name = next((n for n in PROJ_NAMES if isinstance(getattr(module, n, None), nn.Module)), None)
    proj = None if name is None else getattr(module, name)
    if proj is None or getattr(proj, "weight", None) is None:
        return None
    if isinstance(proj, nn.Linear):
        return name, False
    if type(proj).__name__ == "Conv1D":
        return name, True
    return None


def num_heads(module: nn.Module, model: nn.Module) -> int:
    """Query heads of an attention module: its own attribute, else its config's, else the model's."""
    for obj in (module, getattr(module, "config", None), getattr(model, "config", None)):
        for name in ("num_heads", "num_attention_heads", "n_head", "n_heads"):
            value = getattr(obj, name, None)
            if isinstance(value, int):
                return value
    raise BadArgumentError(f"cannot tell how many heads {type(module).__name__} has; pass your own weights [layer, head]")
