"""Recording attention from TransformerLens models through their `hook_pattern` hook points.

A TransformerLens 4.x `TransformerBridge` (from `boot_transformers` or
`boot_native`), or a `HookedTransformer` where the installed version still has
one, exposes every layer's attention probabilities at
`blocks.{l}.attn.hook_pattern` as `[batch, head, query, key]`.  `trace_lens`
runs the model once per batch through `run_with_hooks`, and each hook keeps only
what was asked for (the query rows of `rows=`, the head reduction of `heads=`,
the layers of `layers=`), so what it holds is O(layers x rows x seq), never
layers x heads x seq².

    >>> bridge = TransformerBridge.boot_transformers("gpt2", hf_model=copy.deepcopy(hf), tokenizer=tok)
    >>> tr = af.trace(bridge, ["The cat sat", "A dog"], heads="mean", rows="last")
    >>> tr.patterns.shape                      # batch layer head query key
    torch.Size([2, 12, 1, 1, 4])
    >>> tr.tokens[1]                           # the bridge prepended BOS to the string
    ['<|endoftext|>', 'A', 'Ġdog']

Strings are tokenized the way the bridge tokenizes them (`to_tokens`, which
prepends BOS per `cfg.default_prepend_bos`), and that BOS is part of the
recorded tokens and prompt length; token ids are used exactly as given.  The
AttentionTrace and the errors are those of the nnsight tracer.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from attnflow.errors import BadArgumentError, PromptError, UnsupportedModelError
from attnflow.attention_trace import AttentionTrace
from attnflow.tracers import inputs, reduce
from attnflow.tracers.nnsight import storage_dtype

LENS_CLASSES = ("TransformerBridge", "HookedTransformer")


def is_lens_model(model: Any) -> bool:
    """True for a TransformerLens TransformerBridge or HookedTransformer (without importing transformer_lens)."""
    return any(
        cls.__name__ in LENS_CLASSES and cls.__module__.startswith("transformer_lens") for cls in type(model).__mro__
    )


def trace_lens(
    model: Any,
    prompts: Any,
    *,
    max_new_tokens: int | None = None,
    completions: Any = None,
    heads: Any = "all",
    layers: Any = None,
    rows: Any = None,
    dtype: torch.dtype = torch.float16,
    batch_size: int = 8,
    remote: Any = False,
    progress: bool = True,
    spans: Any = None,
    tokenizer: Any = None,
) -> AttentionTrace:
    """Record `blocks.{l}.attn.hook_pattern` of a TransformerLens model into an AttentionTrace.

    Arguments are those of `attnflow.trace`.  `remote=` is refused: NDIF runs
    HuggingFace models through nnsight, so trace the HF model for a remote run.
    """
    if remote:
        raise BadArgumentError(
            "remote= runs HuggingFace models on NDIF through nnsight; a TransformerLens model records locally: "
            "drop remote= or trace the HF model (or its hub id) instead"
        )
    if max_new_tokens is not None and completions is not None:
        raise BadArgumentError("pass either max_new_tokens= (generate) or completions= (teacher forcing), not both")
    if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or max_new_tokens < 0):
        raise BadArgumentError(f"max_new_tokens={max_new_tokens!r}; use a non-negative integer")
    dtype = storage_dtype(dtype)
    cfg = model.cfg
    num_layers, num_heads = int(cfg.n_layers), int(cfg.n_heads)
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    layer_ids = inputs.check_layers(layers, num_layers)
    head_mode = inputs.check_heads(heads, num_layers, num_heads, layer_ids)
    row_mode = inputs.check_rows(rows, has_completion=bool(max_new_tokens) or completions is not None)

    enc = encode(model, prompts, tok, completions)
    n_ctx = getattr(cfg, "n_ctx", None)
    inputs.check_lengths(enc.sequences, n_ctx, getattr(cfg, "d_vocab", None), extra=max_new_tokens or 0)
    pad_id = _pad_id(tok)
    chunks = inputs.chunks(len(enc.sequences), batch_size)
    with torch.no_grad():
        if max_new_tokens:
            enc = generate(model, enc, max_new_tokens, pad_id, chunks, eos_ids=_eos_ids(model, tok))
        lengths = enc.lengths
        positions = inputs.row_positions(row_mode, lengths, enc.prompt_lengths)
        seq = max(lengths)
        input_ids, attention_mask = inputs.left_pad(enc.sequences, pad_id)
        query_positions = inputs.row_index(positions, lengths, seq)
        H = num_heads if isinstance(head_mode, str) and head_mode == "all" else 1
        patterns = torch.zeros((len(lengths), len(layer_ids), H, query_positions.shape[1], seq), dtype=dtype)
        for chunk in tqdm(chunks, desc="recording attention", unit="batch", disable=not progress or len(chunks) < 2):
            seqs = [enc.sequences[i] for i in chunk]
            part = record_batch(model, seqs, [positions[i] for i in chunk], layer_ids, head_mode, dtype, pad_id)
            R, S = part.shape[-2:]
            patterns[chunk.start : chunk.stop, ..., patterns.shape[-2] - R :, seq - S :] = part

    return AttentionTrace(
        patterns=patterns,
        input_ids=input_ids,
        attention_mask=attention_mask,
        query_positions=query_positions,
        tokens=[_token_strings(tok, s) for s in enc.sequences],
        prompt_lengths=list(enc.prompt_lengths),
        layers=layer_ids,
        heads=inputs.head_label(head_mode),
        spans=inputs.check_spans(spans, lengths),
        model_info=_model_info(model),
        settings={
            "heads": inputs.head_label(head_mode),
            "rows": row_mode,
            "layers": layer_ids,
            "dtype": str(dtype).removeprefix("torch."),
            "max_new_tokens": max_new_tokens,
            "teacher_forced": completions is not None,
            "pad_token_id": pad_id,
            "remote": False,
            "hook": "blocks.{layer}.attn.hook_pattern",
            "prepend_bos": bool(getattr(cfg, "default_prepend_bos", True)),
        },
    )


# --- tokens ---------------------------------------------------------------------------
def encode(model: Any, prompts: Any, tokenizer: Any, completions: Any) -> inputs.Encoded:
    """Token ids of every prompt and completion; strings go through the bridge's `to_tokens` (BOS as it adds it)."""
    plist = inputs.as_prompt_list(prompts)
    ids = []
    for i, p in enumerate(plist):
        if isinstance(p, str):
            if not p.strip():
                raise PromptError(f"prompt {i} is empty; give it some text")
            if tokenizer is None:
                raise BadArgumentError(f"prompt {i} is text but the model has no tokenizer; pass tokenizer= or token ids")
            ids.append(_to_tokens(model, p, tokenizer))
        else:
            ids.append(inputs.encode_prompt(p, tokenizer, i))
    return inputs.encode(ids, tokenizer, completions)


def _to_tokens(model: Any, text: str, tokenizer: Any) -> list[int]:
    if tokenizer is getattr(model, "tokenizer", None):
        return model.to_tokens(text, truncate=False)[0].tolist()
    return list(tokenizer(text)["input_ids"])  # a caller's own tokenizer: its defaults, as in the nnsight tracer


def _token_strings(tokenizer: Any, ids: list[int]) -> list[str]:
    if tokenizer is None:
        return [str(i) for i in ids]
    return [str(t) for t in tokenizer.convert_ids_to_tokens(ids)]


def _pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


# --- the forward passes ---------------------------------------------------------------
def record_batch(
    model: Any,
    sequences: list[list[int]],
    positions: list[list[int]],
    layers: list[int],
    heads: str | Float[Tensor, "layer head"],
    dtype: torch.dtype,
    pad_id: int,
) -> Float[Tensor, "batch layer head query key"]:
    """One forward pass of a left-padded batch; each hook keeps its layer's selected rows, reduced over heads."""
    ids, mask = inputs.left_pad(sequences, pad_id)
    row_index = inputs.row_index(positions, [len(s) for s in sequences], ids.shape[1])
    kept: dict[int, Tensor] = {}

    def keep(index: int):
        weights = heads if isinstance(heads, str) else heads[index]

        def hook(pattern: Float[Tensor, "batch head query key"], hook: Any = None) -> None:
            kept[index] = select(pattern, row_index, mask, weights, dtype)

        return hook

    hooks = [(f"blocks.{layer}.attn.hook_pattern", keep(i)) for i, layer in enumerate(layers)]
    device = _device(model)
    model.run_with_hooks(ids.to(device), attention_mask=mask.to(device), return_type=None, fwd_hooks=hooks)
    missing = [layers[i] for i in range(len(layers)) if i not in kept]
    if missing:
        raise UnsupportedModelError(
            f"hook_pattern of layers {missing} never fired; boot the bridge with eager attention "
            "(boot_transformers does) so TransformerLens computes attention probabilities"
        )
    return torch.stack([kept[i] for i in range(len(layers))], dim=1)


def select(
    pattern: Float[Tensor, "batch head query key"],
    row_index: Int[Tensor, "batch row"],
    mask: Int[Tensor, "batch key"],
    heads: str | Float[Tensor, "head"],
    dtype: torch.dtype,
) -> Float[Tensor, "batch head_out row key"]:
    """The rows in `row_index` (-1 = none, left zero), pad keys zeroed, heads reduced in float32, stored as `dtype`.

        >>> P = torch.full((1, 2, 3, 3), 1 / 3)
        >>> select(P, torch.tensor([[-1, 2]]), torch.tensor([[0, 1, 1]]), "mean", torch.float32)[0, 0]
        tensor([[0.0000, 0.0000, 0.0000],
                [0.0000, 0.3333, 0.3333]])
    """
    present = (row_index >= 0).to(pattern.device)
    rows = reduce._gather_rows(pattern, row_index.clamp(min=0).to(pattern.device)).float()
    rows = rows * present[:, None, :, None] * mask.to(pattern.device)[:, None, None, :]
    return reduce.to_storage(reduce.reduce_heads(rows, heads), dtype).cpu()


def generate(
    model: Any, enc: inputs.Encoded, max_new_tokens: int, pad_id: int, chunks: list[range], eos_ids: set[int]
) -> inputs.Encoded:
    """Greedy completions (argmax of the last row, recomputed each step), cut after the first EOS.

    The same tokens as the nnsight tracer's `hf.generate(do_sample=False)`: full
    forward passes instead of a KV cache, so nothing depends on TransformerLens's
    generation loop.
    """
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long)
    device = _device(model)
    out = [list(s) for s in enc.sequences]
    for chunk in chunks:
        ids, mask = inputs.left_pad([enc.sequences[i] for i in chunk], pad_id)
        ids, mask = ids.to(device), mask.to(device)
        done = torch.zeros(len(chunk), dtype=torch.bool)
        new = []
        for _ in range(max_new_tokens):
            nxt = model(ids, attention_mask=mask, return_type="logits")[:, -1].argmax(-1)
            new.append(nxt.cpu())
            done = done | torch.isin(new[-1], eos)
            if bool(done.all()):
                break
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        steps = torch.stack(new, dim=1).tolist() if new else [[] for _ in chunk]
        for b, i in enumerate(chunk):
            stop = next((j + 1 for j, t in enumerate(steps[b]) if t in eos_ids), len(steps[b]))
            out[i] = out[i] + steps[b][:stop]
    return inputs.Encoded(out, list(enc.prompt_lengths))


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """End-of-sequence ids: the wrapped HF model's generation config (as hf.generate uses), else the tokenizer's."""
    try:
        config = getattr(model.original_model, "generation_config", None)
    except Exception:  # a native bridge or a HookedTransformer: no HF model inside
        config = None
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        eos = getattr(tokenizer, "eos_token_id", None)
    return set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])


def _device(model: Any) -> torch.device:
    device = getattr(model.cfg, "device", None)
    if device is not None:
        return torch.device(device)
    return next(model.parameters()).device


def _model_info(model: Any) -> dict:
    """The keys of the nnsight tracer's model_info, from the TransformerLens config."""
    cfg = model.cfg
    heads = int(cfg.n_heads)
    return {
        "name": str(getattr(cfg, "model_name", None) or type(model).__name__),
        "architecture": str(getattr(cfg, "architecture", None) or type(model).__name__),
        "model_type": getattr(cfg, "original_architecture", None),
        "num_layers": int(cfg.n_layers),
        "num_heads": heads,
        "num_kv_heads": int(getattr(cfg, "n_key_value_heads", None) or heads),
        "max_positions": getattr(cfg, "n_ctx", None),
        "vocab_size": getattr(cfg, "d_vocab", None),
        "attn_implementation": "eager",
        "attention_module": "blocks.{layer}.attn",
        "class": type(model).__name__,
        "source": "transformer_lens",
    }
