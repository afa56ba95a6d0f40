"""How attention patterns are recorded: `trace` runs the one driver on any model, `load` opens an HF model.

    >>> model = af.load(af.demo.MODEL_DIR)                     # nnsight TransformersModel (a folder or a .gguf)
    >>> tr = af.trace(model, ["the cat sat on the mat"], heads="mean", rows="last", progress=False)
    >>> tr.patterns.shape                                      # batch layer head query key (4 layers, BOS + 6 tokens)
    torch.Size([1, 4, 1, 1, 7])
    >>> opts = TraceOptions(heads="mean", rows="last")        # the same parameters as one checked object
    >>> torch.equal(af.trace(model, ["the cat sat on the mat"], options=opts, progress=False).patterns, tr.patterns)
    True

`tracers/driver.py` runs the pipeline; its backends are `tracers/hf.py` (nnsight
models and transformers PreTrainedModels, locally or on NDIF) and
`tracers/lens.py` (TransformerLens TransformerBridge / HookedTransformer).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import torch

from attnflow.attention_trace import AttentionTrace, SavedTrace, Span
from attnflow.errors import BadArgumentError, ModelNotFoundError
from attnflow.tracers import driver
from attnflow.tracers.heads import head_weights_from_o_proj
from attnflow.tracers.options import TraceOptions

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def trace(
    model: Any,
    prompts: Any,
    *,
    tokenizer: Any = None,
    completions: Any = None,
    spans: list[list[Span] | None] | None = None,
    options: TraceOptions | None = None,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    **fields: Any,
) -> AttentionTrace | SavedTrace:
    """Record the attention patterns of `model` on `prompts` into an AttentionTrace.

    model           an nnsight model (`af.load`), a transformers PreTrainedModel (pass tokenizer=,
                    or give token ids), or a TransformerLens TransformerBridge / HookedTransformer
    prompts         a string, a chat (list of {"role", "content"}), a list of token ids (no BOS added),
                    or a list of any of these
    completions     strings or ids, one per prompt, appended and recorded (teacher forcing)
    spans           one list of attnflow.Span per prompt, stored with the trace
    options         a TraceOptions; or its fields as keywords: max_new_tokens, heads, layers, rows,
                    dtype, batch_size, remote, progress, memory_budget, one_pass (see TraceOptions).  Keywords given with
                    `options` replace those fields of it.
    out             a folder: write the trace there while it is recorded (`AttentionTrace.save`'s
                    layout; each layer's rows go to disk as the forward computes them, so memory
                    holds one layer of one batch, not the trace) and return a SavedTrace, which
                    reads the patterns only on `.load()`.  `overwrite` as in `save`.  With
                    max_new_tokens it generates first, then records in one forward (two passes).

        >>> tr = trace(model, ["the cat sat", "a dog ran to the park"], rows="last", heads="mean", progress=False)
        >>> tr.patterns.shape, tr.query_positions              # the demo model: 4 layers, BOS + 6 tokens
        (torch.Size([2, 4, 1, 1, 7]), tensor([[6], [6]]))
    """
    if options is None:
        options = TraceOptions(**fields)
    elif fields:
        options = dataclasses.replace(options, **fields)
    return driver.run(
        model, prompts, options, tokenizer=tokenizer, completions=completions, spans=spans, out=out, overwrite=overwrite
    )


def load(path_or_id: str | os.PathLike, dtype: Any = "float32", device_map: Any = None, **kwargs: Any):
    """An HF causal LM and its tokenizer from a local directory or a hub id, as an nnsight TransformersModel.

    A `.gguf` file, or a folder plus `gguf_file=NAME`, loads dequantised through `attnflow.gguf`.

    A string that is neither an existing path nor of the form `org/name` is a
    missing local directory: ModelNotFoundError, without asking the hub.

        >>> model = load(af.demo.MODEL_DIR)          # nnsight.TransformersModel
        >>> type(model).__name__, model._module.config._attn_implementation
        ('TransformersModel', 'sdpa')
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


__all__ = ["TraceOptions", "head_weights_from_o_proj", "load", "trace"]
