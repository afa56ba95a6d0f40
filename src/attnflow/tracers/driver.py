"""The one recording pipeline: check, encode, generate, record batch by batch, assemble, check finite.

A backend knows one kind of model and nothing else: its geometry, how it turns
text into ids, how it generates one batch greedily and how it records one
batch's patterns.  Everything around that lives here, once, for every backend:

    options -> backend_for(model) -> layers, heads checked against the model
            -> encode -> generate (per batch) -> record (per batch) -> one preallocated
               [batch, layer, head, row, key] tensor -> check_finite -> AttentionTrace

    >>> tr = run(model, ["the cat sat", "a dog"], TraceOptions(heads="mean", rows="last", progress=False))
    >>> tr.patterns.shape                      # batch layer head query key (a 2-layer model, 3 tokens)
    torch.Size([2, 2, 1, 1, 3])

Backends: `tracers/hf.py` (HF models through nnsight, locally or on NDIF) and
`tracers/lens.py` (TransformerLens), chosen by `backend_for`.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from attnflow import tokens
from attnflow.attention_trace import AttentionTrace
from attnflow.errors import BadArgumentError, NonFiniteError
from attnflow.tracers import inputs
from attnflow.tracers.options import TraceOptions


class Backend(Protocol):
    """What the driver asks of a kind of model; one instance per `trace` call."""

    num_layers: int  # attention layers the backend can record
    num_heads: int  # query heads per layer
    tokenizer: Any  # for token strings (None: ids only)
    pad_id: int  # id written at left-pad positions
    eos_ids: set[int]  # ids that end a generated completion
    model_info: dict[str, Any]  # AttentionTrace.model_info (keys: name, architecture, num_layers, ...)
    settings: dict[str, Any]  # settings["backend"]: the backend's name and what only it knows

    def encode(self, prompts: Any, completions: Any) -> inputs.Encoded:
        """Token ids of every prompt, its given completion appended."""

    def generate(self, sequences: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy new tokens of one batch, `max_new_tokens` each at most (the driver cuts them at EOS)."""

    def record(
        self, sequences: list[list[int]], positions: list[list[int]], *, layers: list[int], heads: str | Tensor,
        dtype: torch.dtype,
    ) -> Float[Tensor, "batch layer head row key"]:
        """Patterns of one left-padded batch, the rows of `positions` right-aligned, heads reduced, as `dtype`."""


def backend_for(model: Any, tokenizer: Any, options: TraceOptions) -> Backend:
    """The backend that records `model`: TransformerLens models by class, everything else through nnsight."""
    from attnflow.tracers import lens

    if lens.is_lens_model(model):
        return lens.LensBackend(model, tokenizer, options)
    from attnflow.tracers import hf  # nnsight is imported only here

    return hf.HFBackend(model, tokenizer, options)


def run(
    model: Any, prompts: Any, options: TraceOptions, *, tokenizer: Any = None, completions: Any = None, spans: Any = None
) -> AttentionTrace:
    """Record the attention of `model` on `prompts` as `options` say (see `attnflow.trace`) into an AttentionTrace."""
    backend = backend_for(model, tokenizer, options)
    layers = inputs.check_layers(options.layers, backend.num_layers)
    heads = inputs.check_heads(options.heads, backend.num_layers, backend.num_heads, layers)
    new_tokens = options.max_new_tokens
    if new_tokens is not None and completions is not None:
        raise BadArgumentError("pass either max_new_tokens= (generate) or completions= (teacher forcing), not both")
    inputs.require_completion(options.rows, has_completion=bool(new_tokens) or completions is not None)
    enc = backend.encode(prompts, completions)
    info = backend.model_info
    inputs.check_lengths(enc.sequences, info["max_positions"], info["vocab_size"], extra=new_tokens or 0)
    batches = inputs.chunks(len(enc.sequences), options.batch_size)

    with torch.no_grad(), tqdm(total=len(enc.sequences), desc="attnflow trace", unit="prompt", disable=not options.progress) as bar:
        if new_tokens:
            enc = generate(backend, enc, new_tokens, batches)
            bar.set_postfix_str("generated")
        span_lists = inputs.check_spans(spans, enc.lengths)
        positions = inputs.row_positions(options.rows, enc.lengths, enc.prompt_lengths)
        input_ids, attention_mask = inputs.left_pad(enc.sequences, backend.pad_id)
        query_positions = inputs.row_index(positions, enc.lengths, input_ids.shape[1])
        patterns = record(backend, enc, positions, batches, layers=layers, heads=heads, options=options, bar=bar)
    check_finite(patterns, layers)
    return AttentionTrace(
        patterns=patterns,
        input_ids=input_ids,
        attention_mask=attention_mask,
        query_positions=query_positions,
        tokens=[inputs.token_strings(backend.tokenizer, s) for s in enc.sequences],
        text=display_text(backend.tokenizer, enc),
        prompt_lengths=list(enc.prompt_lengths),
        layers=layers,
        heads=inputs.head_label(heads),
        spans=span_lists,
        model_info=info,
        settings=options.to_settings(
            layers=layers, heads=heads, teacher_forced=completions is not None, pad_token_id=backend.pad_id,
            backend=backend.settings,
        ),
    )


def display_text(tokenizer: Any, enc: inputs.Encoded) -> list[list[str]] | None:
    """Each token's display string (the text it covers, `attnflow.tokens`); None without a tokenizer."""
    if tokenizer is None:
        return None
    return [tokens.sequence_display(tokenizer, s[:n], s[n:]) for s, n in zip(enc.sequences, enc.prompt_lengths)]


def record(
    backend: Backend, enc: inputs.Encoded, positions: list[list[int]], batches: list[range], *, layers: list[int],
    heads: str | Tensor, options: TraceOptions, bar: Any,
) -> Float[Tensor, "batch layer head row key"]:
    """Every batch recorded by the backend and written into one preallocated tensor (rows, keys right-aligned)."""
    B, R, S = len(enc.sequences), max(len(p) for p in positions), max(enc.lengths)
    patterns = None
    for chunk in batches:
        part = backend.record(  # [chunk, layer, head, part_row, part_key]
            [enc.sequences[i] for i in chunk], [positions[i] for i in chunk], layers=layers, heads=heads, dtype=options.dtype
        )
        if patterns is None:  # the head dim is the backend's (all heads or 1); the rest is known
            patterns = part.new_zeros((B, len(layers), part.shape[2], R, S))
        place(patterns, part, chunk)
        bar.update(len(chunk))
    return patterns


def generate(backend: Backend, enc: inputs.Encoded, max_new_tokens: int, batches: list[range]) -> inputs.Encoded:
    """Each prompt with its greedy completion appended, cut after the first end-of-sequence token.

        >>> class Echo:                                     # a backend that always says 7, and 2 ends a completion
        ...     eos_ids = {2}
        ...     def generate(self, seqs, n): return [[7, 2, 7][:n] for _ in seqs]
        >>> generate(Echo(), inputs.Encoded([[1], [1, 5]], [1, 2]), 3, [range(2)]).sequences
        [[1, 7, 2], [1, 5, 7, 2]]
    """
    seqs = []
    for chunk in batches:
        part = [enc.sequences[i] for i in chunk]
        for s, new in zip(part, backend.generate(part, max_new_tokens)):
            stop = next((j + 1 for j, t in enumerate(new) if t in backend.eos_ids), len(new))
            seqs.append(list(s) + list(new[:stop]))
    return inputs.Encoded(seqs, list(enc.prompt_lengths))


def place(
    patterns: Float[Tensor, "batch layer head row key"], part: Float[Tensor, "chunk layer head part_row part_key"], chunk: range
) -> None:
    """Write one batch's patterns into the whole trace's, right-aligned in rows and keys (left padding stays zero).

        >>> out = torch.zeros(2, 1, 1, 2, 3)
        >>> place(out, torch.ones(1, 1, 1, 1, 2), range(1, 2))
        >>> out[1, 0, 0]
        tensor([[0., 0., 0.],
                [0., 1., 1.]])
    """
    R, S = part.shape[-2:]
    patterns[chunk.start : chunk.stop, ..., patterns.shape[-2] - R :, patterns.shape[-1] - S :] = part


def check_finite(patterns: Float[Tensor, "batch layer head row key"], layers: list[int]) -> None:
    """NonFiniteError naming the first layer whose pattern holds NaN or inf (the model's q/k overflowed).

        >>> P = torch.zeros(1, 2, 1, 1, 3); P[0, 1, 0, 0, 2] = float("nan")
        >>> check_finite(P, [0, 5])
        Traceback (most recent call last):
        attnflow.errors.NonFiniteError: the attention of layer 5 (example 0) holds NaN or inf: the model's queries or keys overflowed; load it in float32 or bfloat16
    """
    for li, layer in enumerate(layers):  # a sum carries any NaN/inf; isfinite() would copy the whole trace
        bad = ~torch.isfinite(patterns[:, li].flatten(1).sum(-1, dtype=torch.float32))  # [batch]
        if bad.any():
            raise NonFiniteError(
                f"the attention of layer {layer} (example {int(bad.nonzero()[0])}) holds NaN or inf: the model's "
                "queries or keys overflowed; load it in float32 or bfloat16"
            )
