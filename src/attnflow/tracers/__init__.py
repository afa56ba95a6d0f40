"""How attention patterns are recorded: `trace` dispatches on the model type, `load` opens an HF model.

    >>> model = af.load("path/to/model")                      # nnsight TransformersModel
    >>> tr = af.trace(model, ["the cat sat on the mat"], heads="mean", rows="last")
    >>> tr.patterns.shape                                      # batch layer head query key (2 layers, 6 tokens)
    torch.Size([1, 2, 1, 1, 6])

nnsight models and transformers PreTrainedModels go to `tracers/nnsight.py`;
TransformerLens models (TransformerBridge, HookedTransformer) to `tracers/lens.py`.
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch

from attnflow.errors import BadArgumentError, ModelNotFoundError
from attnflow.attention_trace import AttentionTrace

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def trace(
    model: Any,
    prompts: Any,
    *,
    tokenizer: Any = None,
    max_new_tokens: int | None = None,
    completions: Any = None,
    heads: Any = "all",
    layers: Any = None,
    rows: Any = None,
    dtype: Any = torch.float16,
    batch_size: int = 8,
    remote: bool | str = False,
    progress: bool = True,
    spans: Any = None,
) -> AttentionTrace:
    """Record the attention patterns of `model` on `prompts` into an AttentionTrace.

    model           an nnsight model (`af.load`), a transformers PreTrainedModel (pass tokenizer=,
                    or give token ids), or a TransformerLens TransformerBridge / HookedTransformer
    prompts         a string, a chat (list of {"role", "content"}), a list of token ids (no BOS added),
                    or a list of any of these
    max_new_tokens  generate this many tokens greedily first, then record prompt + completion
    completions     or append these (strings or ids, one per prompt) and record them (teacher forcing)
    heads           "all" | "mean" | "max" | Tensor[layer, head] of non-negative weights (normalised per layer)
    layers          None (all) or a list of layer indices, negatives from the end; stored sorted
    rows            None (every query row) | "last" | "completion" (rows prompt_length-1 .. length-2,
                    which produce the completion tokens) | list of positions (negatives from each end)
    dtype           storage dtype of the patterns (computed in float32, then cast)
    batch_size      prompts per forward pass
    remote          True / "local" to run on NDIF (nnsight models only)
    progress        show a tqdm bar
    spans           one list of attnflow.Span per prompt, stored with the trace

        >>> tr = trace(model, ["the cat sat", "a dog ran to the park"], rows="last", heads="mean")
        >>> tr.patterns.shape, tr.query_positions
        (torch.Size([2, 2, 1, 1, 6]), tensor([[5], [5]]))
    """
    kwargs = dict(
        tokenizer=tokenizer,
        max_new_tokens=max_new_tokens,
        completions=completions,
        heads=heads,
        layers=layers,
        rows=rows,
        dtype=dtype,
        batch_size=batch_size,
        remote=remote,
        progress=progress,
        spans=spans,
    )
    if _is_lens(model):
        from attnflow.tracers.lens import trace_lens

        return trace_lens(model, prompts, **kwargs)
    from attnflow.tracers.nnsight import trace_nnsight

    return trace_nnsight(model, prompts, **kwargs)


def _is_lens(model: Any) -> bool:
    """TransformerLens models, recognised by class name so transformer_lens is imported only when used."""
    names = {c.__name__ for c in type(model).__mro__}
    return bool(names & {"TransformerBridge", "HookedTransformer", "HookedRootModule"})


def load(path_or_id: str | os.PathLike, dtype: Any = "float32", device_map: Any = None, **kwargs: Any):
    """An HF causal LM and its tokenizer from a local directory or a hub id, as an nnsight TransformersModel.

    A `.gguf` file, or a folder plus `gguf_file=NAME`, loads dequantised through `attnflow.gguf`.

    A string that is neither an existing path nor of the form `org/name` is a
    missing local directory: ModelNotFoundError, without asking the hub.

        >>> model = load("runs/tiny-llama")          # nnsight.TransformersModel
        >>> model.tokenizer, model._module.config._attn_implementation
        (..., 'sdpa')
    """
    import nnsight
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = os.fspath(path_or_id)
    if name.endswith(".gguf") or "gguf_file" in kwargs:
        from attnflow.gguf import load_gguf

        hf, tok = load_gguf(name, kwargs.pop("gguf_file", None), dtype=dtype, device_map=device_map, **kwargs)
        return nnsight.TransformersModel(hf, tokenizer=tok)
    if not os.path.exists(name):
        if not _HUB_ID.match(name) or name.startswith((".", "/", "~")):
            raise ModelNotFoundError(f"no model directory at {name!r}; pass an existing directory or a hub id like org/name")
    elif not os.path.isdir(name):
        raise ModelNotFoundError(f"{name!r} is a file; pass the model's directory")
    torch_dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(torch_dtype, torch.dtype):
        raise BadArgumentError(f"dtype={dtype!r}; use e.g. 'float32', 'bfloat16' or a torch.dtype")
    try:
        tok = AutoTokenizer.from_pretrained(name)
        hf = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype, device_map=device_map, **kwargs)
    except OSError as err:
        raise ModelNotFoundError(f"cannot load a model from {name!r}: {str(err).splitlines()[0]}") from err
    hf.eval()
    return nnsight.TransformersModel(hf, tokenizer=tok)


__all__ = ["trace", "load"]
