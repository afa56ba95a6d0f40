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
import json
import os
import re
from typing import Any

import torch

from attnflow.attention_trace import AttentionTrace, SavedTrace, Span
from attnflow import _checks
from attnflow.errors import BadArgumentError, DataError, ModelNotFoundError, UnsupportedModelError
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
                    dtype, batch_size, remote, progress, memory_budget, one_pass, norms (see TraceOptions).  Keywords given with
                    `options` replace those fields of it.
    out             a folder: write the trace there while it is recorded (`AttentionTrace.save`'s
                    layout; each layer's rows go to disk as the forward computes them, so memory
                    holds one layer of one batch, not the trace) and return a SavedTrace, which
                    reads the patterns only on `.load()`.  `overwrite` as in `save`.  With
                    max_new_tokens it records while generating too: every layer's prompt rows are
                    written at prefill, the new tokens' rows when the batch has generated.

        >>> tr = trace(model, ["the cat sat", "a dog ran to the park"], rows="last", heads="mean", progress=False)
        >>> tr.patterns.shape, tr.query_positions              # the demo model: 4 layers, BOS + 6 tokens
        (torch.Size([2, 4, 1, 1, 7]), tensor([[6], [6]]))
    """
    names = [f.name for f in dataclasses.fields(TraceOptions)]
    unknown = sorted(set(fields) - set(names))
    if unknown:
        raise BadArgumentError(f"trace() got unknown keyword(s) {', '.join(unknown)}; its options are {', '.join(names)}")
    if options is None:
        options = TraceOptions(**fields)
    elif not isinstance(options, TraceOptions):
        raise BadArgumentError(f"options is a {type(options).__name__}; pass an attnflow.TraceOptions (or its fields as keywords)")
    elif fields:
        options = dataclasses.replace(options, **fields)
    return driver.run(
        model, prompts, options, tokenizer=tokenizer, completions=completions, spans=spans, out=out, overwrite=overwrite
    )


def load(path_or_id: str | os.PathLike, dtype: Any = "float32", device_map: Any = None, **kwargs: Any):
    """An HF causal LM and its tokenizer from a local directory or a cached hub id, as an nnsight TransformersModel.

    A `.gguf` file, or a folder plus `gguf_file=NAME`, loads dequantised through `attnflow.gguf`.

    attnflow never downloads: a hub id `org/name` that is not a local folder is looked up in the
    local Hugging Face cache only (`huggingface_hub.snapshot_download(local_files_only=True)`, which
    is immediate, whatever `HF_HUB_OFFLINE` says), so offline it fails at once, in one line:

        >>> load("nobody/nothing-here")
        Traceback (most recent call last):
        attnflow.errors.ModelNotFoundError: 'nobody/nothing-here' is not found locally (no such folder, not in the \
Hugging Face cache); no network use: download it first (hf download nobody/nothing-here) or pass a local folder

    A folder that is not a model, has no tokenizer, holds truncated weights or a model type
    transformers does not know is a one-line `attnflow.errors` exception naming what is wrong.

        >>> model = load(af.demo.MODEL_DIR)          # nnsight.TransformersModel
        >>> type(model).__name__, model._module.config._attn_implementation
        ('TransformersModel', 'sdpa')
    """
    import nnsight

    from attnflow._dtypes import storage_dtype

    _checks.path("path_or_id", path_or_id)
    name = os.fspath(path_or_id)  # as given: Path() would drop the "./" that marks a local path
    if name.endswith(".gguf") or "gguf_file" in kwargs:
        from attnflow.gguf import load_gguf

        hf, tok = load_gguf(name, kwargs.pop("gguf_file", None), dtype=dtype, device_map=device_map, **kwargs)
        return nnsight.TransformersModel(hf, tokenizer=tok)
    torch_dtype = storage_dtype(dtype)  # float16 | bfloat16 | float32 | float64: int8 weights cannot run
    folder = model_folder(name)
    tok, hf = _from_folder(folder, name, torch_dtype, device_map, kwargs)
    hf.eval()
    if folder != name:  # a cached hub id: keep the id, as from_pretrained(id) would (NDIF's model key is built from it)
        hf.config._name_or_path = hf.name_or_path = name
    return nnsight.TransformersModel(hf, tokenizer=tok)


def model_folder(name: str) -> str:
    """The local folder of a model: `name` itself, or the cached snapshot of the hub id `name` (never downloaded).

        >>> model_folder(str(af.demo.MODEL_DIR)) == str(af.demo.MODEL_DIR)
        True
    """
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise ModelNotFoundError(
                f"{name!r} holds no config.json: it is not a model folder; pass a folder written by save_pretrained"
            )
        return name
    if os.path.exists(name):
        raise ModelNotFoundError(f"{name!r} is a file; pass the model's directory (or a .gguf file)")
    if not _HUB_ID.match(name) or name.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"no model directory at {name!r}; pass an existing directory or a hub id like org/name")
    from huggingface_hub import snapshot_download

    try:
        return model_folder(snapshot_download(name, local_files_only=True))
    except (OSError, ValueError):  # not cached (LocalEntryNotFoundError), or not a valid repo id
        raise ModelNotFoundError(
            f"{name!r} is not found locally (no such folder, not in the Hugging Face cache); no network use: "
            f"download it first (hf download {name}) or pass a local folder"
        ) from None


def _from_folder(folder: str, name: str, dtype: torch.dtype, device_map: Any, kwargs: dict) -> tuple[Any, Any]:
    """(tokenizer, model) of a model folder, every failure an attnflow error naming the folder and the fault."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config_file = os.path.join(folder, "config.json")
    try:
        with open(config_file, encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError) as err:
        raise DataError(f"{config_file!r} is not a readable JSON object ({_first_line(err)}); save the model again") from None
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise UnsupportedModelError(
            f"{name!r} has model type {model_type!r}, which this transformers cannot build ({_first_line(err)}); "
            "update transformers or use a supported model"
        ) from None
    try:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise ModelNotFoundError(
            f"no usable tokenizer in {name!r} ({_first_line(err)}); save one there (tokenizer.save_pretrained)"
        ) from None
    try:
        hf = AutoModelForCausalLM.from_pretrained(
            folder, config=config, dtype=dtype, device_map=device_map, local_files_only=True, **kwargs
        )
    except ValueError as err:
        if "Unrecognized configuration class" in str(err):
            raise UnsupportedModelError(f"{name!r} ({model_type}) is not a causal language model ({_first_line(err)})") from None
        raise _weights_error(folder, name, err) from None
    except (OSError, RuntimeError) as err:
        raise _weights_error(folder, name, err) from None
    except Exception as err:  # safetensors' own error class (SafetensorError) derives from Exception only
        if type(err).__name__ != "SafetensorError":
            raise
        raise _weights_error(folder, name, err) from None
    return tok, hf


def _weights_error(folder: str, name: str, err: BaseException) -> DataError:
    files = sorted(f for f in os.listdir(folder) if f.endswith((".safetensors", ".bin"))) or ["no weight files"]
    return DataError(
        f"cannot read the weights of {name!r} ({', '.join(files)}: {type(err).__name__}: {_first_line(err)}); "
        "the file may be truncated or damaged: download or save it again"
    )


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


__all__ = ["TraceOptions", "head_weights_from_o_proj", "load", "model_folder", "trace"]
