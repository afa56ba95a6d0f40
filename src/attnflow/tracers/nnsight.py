"""Record attention patterns of any HF causal LM through nnsight, with its attention kernel left as it is.

Every attention module written against transformers' attention interface runs

    attn_output, attn_weights = attention_interface(self, query, key, value, attention_mask, scaling=..., ...)

nnsight's `.source` exposes that call site inside the module's forward (named
`attention_interface_<n>`; n drifts between versions, so it is found by prefix).
Inside one `model.trace(...)` the tracer reads the call's inputs (post-rotary
query and key, the mask, sliding_window/softcap/sinks kwargs), recomputes the
probabilities of the requested rows in float32 with `reduce.py`, reduces heads
and casts to the storage dtype there, and saves only that.  The model's own
attention (sdpa, flash, eager) runs untouched: no `output_attentions`.

    >>> tr = trace_nnsight(model, ["the cat sat", "a dog"], heads="mean", rows="last", progress=False)
    >>> tr.patterns.shape                      # batch layer head query key (a 2-layer model, 3 tokens)
    torch.Size([2, 2, 1, 1, 3])
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import nnsight
import torch
from torch import Tensor
from tqdm.auto import tqdm

from attnflow.errors import BadArgumentError, NonFiniteError, UnsupportedModelError
from attnflow.attention_trace import AttentionTrace
from attnflow.tracers import inputs, reduce
from attnflow.tracers import remote as ndif

OP_PREFIX = "attention_interface_"
SUPPORTED = (
    "models whose attention modules call transformers' `attention_interface(...)` "
    "(Llama, Mistral, Qwen2/3, Gemma 2, Phi-3, GPT-2, GPT-NeoX and most transformers>=5 decoders)"
)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


@dataclass
class Site:
    """Where one layer's attention is recorded: module path, its call-site op name, its causal flag."""

    path: str
    op: str
    is_causal: bool
    module_class: str


# --- the model -------------------------------------------------------------------------
def as_nnsight(model: Any, tokenizer: Any = None) -> tuple[Any, torch.nn.Module, Any]:
    """(nnsight model, underlying HF module, tokenizer) for an nnsight model or a PreTrainedModel."""
    if isinstance(model, nnsight.Envoy):
        return model, model._module, tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if isinstance(model, torch.nn.Module):
        # A plain wrapper: attnflow tokenizes and pads itself, so the user's tokenizer is left untouched.
        return nnsight.NNsight(model), model, tokenizer
    raise UnsupportedModelError(
        f"cannot trace a {type(model).__name__}; pass an nnsight model, a transformers PreTrainedModel "
        "(with tokenizer=), or a TransformerLens model"
    )


_HAS_CALL: dict[type, bool] = {}


def _calls_interface(cls: type) -> bool:
    """Whether the class's forward calls `attention_interface(...)` (cached per class)."""
    if cls not in _HAS_CALL:
        try:
            _HAS_CALL[cls] = "attention_interface(" in inspect.getsource(cls.forward)
        except (OSError, TypeError, AttributeError):
            _HAS_CALL[cls] = False
    return _HAS_CALL[cls]


def attention_sites(nn_model: Any, hf: torch.nn.Module) -> list[Site]:
    """One Site per attention module, in the order the model runs them (module order)."""
    sites = []
    for path, module in hf.named_modules():
        if path and _calls_interface(type(module)):
            names = [n for n in nn_model.get(path).source.names if _is_op(n)]
            if names:  # a binding `attention_interface = ...` precedes the call: the call is the last
                sites.append(Site(path, names[-1], bool(getattr(module, "is_causal", True)), type(module).__name__))
    if not sites:
        attn = sorted({type(m).__name__ for _, m in hf.named_modules() if "attention" in type(m).__name__.lower()})
        what = (
            f"the attention modules of {type(hf).__name__} ({', '.join(attn)}) have no attention_interface call site"
            if attn
            else f"{type(hf).__name__} has no attention module with an attention_interface call site"
        )
        raise UnsupportedModelError(f"{what}; attnflow records {SUPPORTED}")
    return sites


def _is_op(name: str) -> bool:
    return name.startswith(OP_PREFIX) and name[len(OP_PREFIX) :].isdigit()


def _config_get(config: Any, *names: str) -> Any:
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    return None


def model_info(hf: torch.nn.Module, sites: list[Site], source: str = "nnsight") -> dict:
    """Name, architecture and attention geometry of an HF model, as stored in AttentionTrace.model_info."""
    cfg = getattr(hf, "config", None)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    heads = _config_get(text, "num_attention_heads", "n_head")
    return {
        "name": getattr(cfg, "_name_or_path", "") or type(hf).__name__,
        "architecture": type(hf).__name__,
        "model_type": getattr(cfg, "model_type", None),
        "num_layers": len(sites),
        "num_heads": heads,
        "num_kv_heads": _config_get(text, "num_key_value_heads") or heads,
        "max_positions": _config_get(text, "max_position_embeddings", "n_positions", "n_ctx"),
        "vocab_size": _config_get(text, "vocab_size"),
        "attn_implementation": getattr(cfg, "_attn_implementation", None),
        "attention_module": sites[0].module_class,
        "source": source,
    }


def _pad_id(tokenizer: Any, hf: torch.nn.Module) -> int:
    for v in (
        getattr(tokenizer, "pad_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
        getattr(getattr(hf, "generation_config", None), "pad_token_id", None),
        getattr(hf.config, "pad_token_id", None),
    ):
        if isinstance(v, int):
            return v
    return 0


def _device(hf: torch.nn.Module) -> torch.device:
    p = next(hf.parameters(), None)
    return p.device if p is not None and p.device.type != "meta" else torch.device("cpu")


# --- recording ---------------------------------------------------------------------------
def record(
    nn_model: Any,
    sites: list[Site],
    sequences: list[list[int]],
    positions: list[list[int]],
    *,
    layers: list[int],
    heads: str | Tensor,
    dtype: torch.dtype,
    pad_id: int,
    device: torch.device,
    remote: Any = False,
) -> Tensor:
    """Patterns [batch, layer, head, row, seq] of one left-padded batch, rows right-aligned."""
    ids, mask = inputs.left_pad(sequences, pad_id)
    pos = inputs.position_ids(mask)
    rows = inputs.row_index(positions, [len(s) for s in sequences], ids.shape[1]).to(device)
    envoys = [nn_model.get(sites[layer].path) for layer in layers]
    ops = [sites[layer].op for layer in layers]
    causal = [sites[layer].is_causal for layer in layers]
    weights = [heads if isinstance(heads, str) else heads[i] for i in range(len(layers))]
    stop_early = layers[-1] < len(sites) - 1  # nothing to read past the last requested layer
    extra = ndif.trace_kwargs(nn_model, remote)  # {} locally; a checked RemoteBackend for NDIF
    with torch.no_grad(), ndif.translate_errors(extra):
        with nn_model.trace(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=pos.to(device),
            use_cache=False,  # one forward: a KV cache would only hold memory
            **extra,
        ) as tracer:
            patterns = None  # [batch, layer, head, row, key], filled layer by layer (no second copy from a stack)
            for i in range(len(envoys)):
                args, kwargs = getattr(envoys[i].source, ops[i]).inputs
                p = reduce.interface_pattern(  # float32: the copy into `patterns` casts to the storage dtype
                    args, kwargs, row_index=rows, heads=weights[i], dtype=None, is_causal=causal[i]
                )
                if patterns is None:
                    patterns = p.new_empty((p.shape[0], len(envoys), *p.shape[1:]), dtype=dtype)
                patterns[:, i] = p
            patterns = patterns.save()
            if stop_early:
                tracer.stop()
    return patterns.detach().cpu()


def generate(
    hf: torch.nn.Module,
    enc: inputs.Encoded,
    max_new_tokens: int,
    *,
    pad_id: int,
    batch_size: int,
    bar: Any = None,
    nn_model: Any = None,
    remote: Any = False,
) -> inputs.Encoded:
    """Greedy completions appended to each prompt, cut after the first end-of-sequence token."""
    gen_cfg = getattr(hf, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None)
    eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    device = _device(hf)
    seqs = []
    for chunk in inputs.chunks(len(enc.sequences), batch_size):
        part = [enc.sequences[i] for i in chunk]
        ids, mask = inputs.left_pad(part, pad_id)
        greedy = dict(  # plain argmax decoding, whatever penalties the checkpoint's generation_config sets
            max_new_tokens=max_new_tokens, min_new_tokens=0, do_sample=False, num_beams=1,
            repetition_penalty=1.0, no_repeat_ngram_size=0, pad_token_id=pad_id,
        )
        if remote:  # generate where the weights are: NDIF, or nnsight's local round trip
            out = ndif.generate(nn_model, ids.to(device), mask.to(device), remote=remote, **greedy)
        else:
            with torch.no_grad():
                out = hf.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **greedy)
        for s, new in zip(part, out[:, ids.shape[1] :].tolist()):
            stop = next((j + 1 for j, t in enumerate(new) if t in eos), len(new))
            seqs.append(s + new[:stop])
        if bar is not None:
            bar.set_postfix_str("generated")
    return inputs.Encoded(seqs, list(enc.prompt_lengths))


def storage_dtype(dtype: Any) -> torch.dtype:
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if dtype in DTYPES.values():
        return dtype
    raise BadArgumentError(f"dtype={dtype!r}; use one of {', '.join(DTYPES)}")


def trace_nnsight(
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
    remote: Any = False,
    progress: bool = True,
    spans: Any = None,
) -> AttentionTrace:
    """Record attention of `prompts` (see `attnflow.trace` for every argument) into an AttentionTrace."""
    nn_model, hf, tok = as_nnsight(model, tokenizer)
    sites = attention_sites(nn_model, hf)
    info = model_info(hf, sites)
    dtype = storage_dtype(dtype)
    layer_ids = inputs.check_layers(layers, len(sites))
    head_spec = inputs.check_heads(heads, len(sites), info["num_heads"], layer_ids)
    if max_new_tokens is not None and completions is not None:
        raise BadArgumentError("pass either max_new_tokens= (generate) or completions= (teacher forcing), not both")
    if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or max_new_tokens < 0):
        raise BadArgumentError(f"max_new_tokens={max_new_tokens!r}; use a non-negative integer")
    rows = inputs.check_rows(rows, has_completion=bool(max_new_tokens) or completions is not None)
    enc = inputs.encode(prompts, tok, completions)
    inputs.check_lengths(enc.sequences, info["max_positions"], info["vocab_size"], extra=max_new_tokens or 0)
    batches = inputs.chunks(len(enc.sequences), batch_size)
    pad_id = _pad_id(tok, hf)
    device = _device(hf)

    with tqdm(total=len(enc.sequences), desc="attnflow trace", unit="prompt", disable=not progress) as bar:
        if max_new_tokens:
            enc = generate(
                hf, enc, max_new_tokens, pad_id=pad_id, batch_size=batch_size, bar=bar, nn_model=nn_model, remote=remote
            )
        span_lists = inputs.check_spans(spans, enc.lengths)
        positions = inputs.row_positions(rows, enc.lengths, enc.prompt_lengths)
        parts = []
        for chunk in batches:
            parts.append(
                record(
                    nn_model,
                    sites,
                    [enc.sequences[i] for i in chunk],
                    [positions[i] for i in chunk],
                    layers=layer_ids,
                    heads=head_spec,
                    dtype=dtype,
                    pad_id=pad_id,
                    device=device,
                    remote=remote,
                )
            )
            bar.update(len(chunk))

    input_ids, attention_mask = inputs.left_pad(enc.sequences, pad_id)
    S = input_ids.shape[1]
    R = max(len(p) for p in positions)
    parts = [_pad_left(p, R, S) for p in parts]
    patterns = parts[0] if len(parts) == 1 else torch.cat(parts)
    check_finite(patterns, layer_ids)
    return AttentionTrace(
        patterns=patterns,
        input_ids=input_ids,
        attention_mask=attention_mask,
        query_positions=inputs.row_index(positions, enc.lengths, S),
        tokens=[_tokens(tok, s) for s in enc.sequences],
        prompt_lengths=list(enc.prompt_lengths),
        layers=layer_ids,
        heads=inputs.head_label(head_spec),
        spans=span_lists,
        model_info=info,
        settings={
            "heads": inputs.head_label(head_spec),
            "head_weights": head_spec.tolist() if isinstance(head_spec, Tensor) else None,  # per recorded layer
            "rows": rows,
            "layers": layer_ids,
            "dtype": str(dtype).removeprefix("torch."),
            "max_new_tokens": max_new_tokens,
            "teacher_forced": completions is not None,
            "pad_token_id": pad_id,
            "remote": remote if isinstance(remote, (bool, str)) else bool(remote),
        },
    )


def check_finite(patterns: Tensor, layers: list[int]) -> None:
    """NonFiniteError naming the first layer whose pattern holds NaN or inf (the model's q/k overflowed)."""
    for li, layer in enumerate(layers):  # a sum carries any NaN/inf; isfinite() would copy the whole trace
        bad = ~torch.isfinite(patterns[:, li].flatten(1).sum(-1, dtype=torch.float32))  # [batch]
        if bad.any():
            raise NonFiniteError(
                f"the attention of layer {layer} (example {int(bad.nonzero()[0])}) holds NaN or inf: the model's "
                "queries or keys overflowed; load it in float32 or bfloat16"
            )


def _pad_left(p: Tensor, rows: int, seq: int) -> Tensor:
    """Zero-pad a chunk's [batch, layer, head, row, key] on the left of its row and key dims."""
    if p.shape[-2:] == (rows, seq):
        return p
    return torch.nn.functional.pad(p, (seq - p.shape[-1], 0, rows - p.shape[-2], 0))


def _tokens(tokenizer: Any, ids: list[int]) -> list[str]:
    if tokenizer is None:
        return [str(i) for i in ids]
    return [str(t) for t in tokenizer.convert_ids_to_tokens(ids)]
