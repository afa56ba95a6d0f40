"""The one recording pipeline: check, encode, generate, record batch by batch, assemble, check finite.

A backend knows one kind of model and nothing else: its geometry, how it turns
text into ids, how it generates one batch greedily and how it records one
batch's patterns.  Everything around that lives here, once, for every backend:

    options -> backend_for(model) -> layers, heads checked against the model
            -> encode -> [generate] -> record (per batch, into one preallocated
               [batch, layer, head, row, key] tensor) -> check_finite -> AttentionTrace

With `max_new_tokens`, a backend that can (`generate_record`: HF models, locally
or remotely) records while it generates, one generation per batch; otherwise
(`one_pass=False`, TransformerLens) the driver generates every batch first and
records prompt + completion in a second forward.  With `out=DIR` (`stream`) each
layer goes to disk as it is recorded instead of into the tensor.

    >>> tr = run(model, ["the cat sat", "a dog"], TraceOptions(heads="mean", rows="last", progress=False))
    >>> tr.patterns.shape                      # batch layer head query key (the 4-layer demo model, BOS + 3 words)
    torch.Size([2, 4, 1, 1, 4])

Backends: `tracers/hf.py` (HF models through nnsight, locally or on NDIF) and
`tracers/lens.py` (TransformerLens), chosen by `backend_for`.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from attnflow import _io, codec, tokens
from attnflow.attention_trace import AttentionTrace, SavedTrace
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
        options: TraceOptions, out: Float[Tensor, "batch layer head row key"], norms: dict[str, Tensor] | None = None,
    ) -> None:
        """Write the patterns of one left-padded batch into `out` (rows of `positions` right-aligned, heads reduced).

        `out` is this batch's window of the trace's tensor, of the storage dtype:
        [batch, layer, head_out, max rows of the batch, longest sequence of the batch].
        `norms` (with `options.norms`) are the batch's windows of `AttentionTrace.norms`, keys right-aligned.
        """

    # optional: generate_record(sequences, max_new_tokens, *, layers, heads, options) -> (new tokens, patterns, norms)
    # (one generation that also records; `tracers/hf.py`), used with one_pass when the backend has it


def backend_for(model: Any, tokenizer: Any, options: TraceOptions) -> Backend:
    """The backend that records `model`: TransformerLens models by class, everything else through nnsight."""
    from attnflow.tracers import lens

    if lens.is_lens_model(model):
        return lens.LensBackend(model, tokenizer, options)
    from attnflow.tracers import hf  # nnsight is imported only here

    return hf.HFBackend(model, tokenizer, options)


def run(
    model: Any, prompts: Any, options: TraceOptions, *, tokenizer: Any = None, completions: Any = None, spans: Any = None,
    out: str | os.PathLike | None = None, overwrite: bool = False,
) -> AttentionTrace | SavedTrace:
    """Record the attention of `model` on `prompts` as `options` say (see `attnflow.trace`) into an AttentionTrace.

    With `out`, the trace is written to that folder as it is recorded (`stream`) and a SavedTrace is returned.
    """
    if out is not None:
        _io.check_output(out, "trace", overwrite=overwrite)  # before the model runs: a refused folder fails fast
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

    if out is not None:
        return stream(backend, enc, batches, out, overwrite, layers=layers, heads=heads, options=options, spans=spans,
                      teacher_forced=completions is not None)  # fmt: skip
    with torch.no_grad(), tqdm(total=len(enc.sequences), desc="attnflow trace", unit="prompt", disable=not options.progress) as bar:
        if new_tokens and options.one_pass and hasattr(backend, "generate_record"):
            enc, patterns, norms = generate_record(backend, enc, new_tokens, batches, layers=layers, heads=heads, options=options, bar=bar)
            span_lists = inputs.check_spans(spans, enc.lengths)
        else:
            if new_tokens:
                enc = generate(backend, enc, new_tokens, batches)
                bar.set_postfix_str("generated")
            span_lists = inputs.check_spans(spans, enc.lengths)  # before the forward: a bad span fails fast
            positions = inputs.row_positions(options.rows, enc.lengths, enc.prompt_lengths)
            head_out = backend.num_heads if isinstance(heads, str) and heads == "all" else 1
            patterns, norms = record(
                backend, enc, positions, batches, layers=layers, heads=heads, head_out=head_out, options=options, bar=bar
            )
        positions = inputs.row_positions(options.rows, enc.lengths, enc.prompt_lengths)
        input_ids, attention_mask = inputs.left_pad(enc.sequences, backend.pad_id)
        query_positions = inputs.row_index(positions, enc.lengths, input_ids.shape[1])
    check_finite(patterns, layers)
    check_finite_norms(norms, layers)
    return assemble_trace(backend, enc, patterns, query_positions, input_ids, attention_mask, span_lists, layers=layers,
                          heads=heads, options=options, teacher_forced=completions is not None, norms=norms)  # fmt: skip


def assemble_trace(
    backend: Backend, enc: inputs.Encoded, patterns: Tensor, query_positions: Tensor, input_ids: Tensor,
    attention_mask: Tensor, span_lists: Any, *, layers: list[int], heads: str | Tensor, options: TraceOptions,
    teacher_forced: bool, norms: dict[str, Tensor] | None = None,
) -> AttentionTrace:
    """The AttentionTrace of recorded `patterns` and everything around them (tokens, text, spans, info, settings)."""
    info = backend.model_info
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
        model_info={**info, "special_token_ids": special_ids(backend.tokenizer)},  # what exclude_keys="sinks" reads
        settings=options.to_settings(
            layers=layers, heads=heads, teacher_forced=teacher_forced, pad_token_id=backend.pad_id, backend=backend.settings,
        ),
        norms=norms,
    )


def stream(
    backend: Backend, enc: inputs.Encoded, batches: list[range], out: str | os.PathLike, overwrite: bool, *,
    layers: list[int], heads: str | Tensor, options: TraceOptions, spans: Any, teacher_forced: bool,
) -> SavedTrace:
    """Record into the saved-trace folder `out` (`AttentionTrace.save`'s layout), one layer at a time; a SavedTrace.

    Each batch runs one forward (or, with `max_new_tokens`, one generation); each
    layer's rows go to its Parquet file as the model computes them
    (`codec.AttentionWriter`), so what is held is one layer of one batch, not the
    trace.  A generation hands over its prompt's rows at prefill and its new
    tokens' rows once it ends (`stream_generation`).  A backend that cannot hand
    layers over while it runs (remote runs, TransformerLens) records a batch
    whole, then writes it layer by layer.  The folder is built under a temporary
    name and swapped in whole, manifest last (`attnflow._io.output_dir`).
    """
    head_out = backend.num_heads if isinstance(heads, str) and heads == "all" else 1
    causal = getattr(backend, "causal", lambda layers: True)(layers)
    kw = dict(layers=layers, heads=heads, options=options)
    with torch.no_grad(), _io.output_dir(out, "trace", overwrite=overwrite) as tmp, tqdm(
        total=len(enc.sequences), desc="attnflow trace", unit="prompt", disable=not options.progress
    ) as bar:
        writer = codec.AttentionWriter(tmp, layers, options.dtype, inputs.head_label(heads), causal)
        if options.max_new_tokens and options.one_pass and hasattr(backend, "generate_record"):
            enc, norms = stream_generation(backend, enc, batches, writer, causal=causal, bar=bar, **kw)
            span_lists = inputs.check_spans(spans, enc.lengths)
        else:
            if options.max_new_tokens:
                enc = generate(backend, enc, options.max_new_tokens, batches)
                bar.set_postfix_str("generated")
            span_lists = inputs.check_spans(spans, enc.lengths)  # before the forward: a bad span fails fast
            norms = stream_record(backend, enc, batches, writer, head_out=head_out, bar=bar, **kw)
        writer.close()
        check_finite_norms(norms, layers)
        positions = inputs.row_positions(options.rows, enc.lengths, enc.prompt_lengths)
        input_ids, attention_mask = inputs.left_pad(enc.sequences, backend.pad_id)
        query_positions = inputs.row_index(positions, enc.lengths, input_ids.shape[1])
        B, R, S = len(enc.sequences), query_positions.shape[1], input_ids.shape[1]
        placeholder = torch.zeros((), dtype=options.dtype).expand(B, len(layers), head_out, R, S)  # no memory: shape only
        skeleton = assemble_trace(backend, enc, placeholder, query_positions, input_ids, attention_mask, span_lists,
                                  layers=layers, heads=heads, options=options, teacher_forced=teacher_forced,
                                  norms=norms)  # fmt: skip
        codec.write_rest(skeleton, tmp, causal)
    return SavedTrace(out)


def writing_sink(writer: codec.AttentionWriter, layers: list[int], example: int | None = None):
    """`sink(li, rows, query_positions, lengths)`: layer `li`'s rows checked finite, then written (`example=`: see
    `AttentionWriter.write`)."""

    def sink(li: int, P: Tensor, qpos: Tensor, lengths: list[int]) -> None:
        check_finite(P.unsqueeze(1), [layers[li]])
        writer.write(li, P, qpos, lengths, example=example)

    return sink


def write_layers(write: Any, part: Float[Tensor, "batch layer head row key"], qpos: Tensor, lengths: list[int]) -> None:
    """A batch recorded whole, handed to `write` (a `writing_sink`) one layer at a time."""
    for li in range(part.shape[1]):
        write(li, part[:, li], qpos, lengths)


def stream_record(
    backend: Backend, enc: inputs.Encoded, batches: list[range], writer: codec.AttentionWriter, *, layers: list[int],
    heads: str | Tensor, options: TraceOptions, head_out: int, bar: Any,
) -> dict[str, Tensor] | None:
    """Each batch's forward written layer by layer (`stream`); the norms, which are small, are kept and returned."""
    positions = inputs.row_positions(options.rows, enc.lengths, enc.prompt_lengths)
    S = max(enc.lengths)
    norms = empty_norms(len(enc.sequences), len(layers), backend.num_heads, S) if options.norms else None
    write = writing_sink(writer, layers)
    for chunk in batches:
        seqs, pos = [enc.sequences[i] for i in chunk], [positions[i] for i in chunk]
        lengths = [len(s) for s in seqs]
        qpos = inputs.row_index(pos, lengths, max(lengths))  # [chunk, row] in the batch's own padding
        kw = dict(layers=layers, heads=heads, options=options)
        if norms is not None:
            kw["norms"] = {k: v[chunk.start : chunk.stop, ..., S - max(lengths) :] for k, v in norms.items()}
        if getattr(backend, "streams", False):
            backend.record(seqs, pos, **kw, out=None, sink=lambda li, P, qpos=qpos, lengths=lengths: write(li, P, qpos, lengths))
        else:
            part = torch.zeros((len(chunk), len(layers), head_out, qpos.shape[1], max(lengths)), dtype=options.dtype)
            backend.record(seqs, pos, **kw, out=part)
            write_layers(write, part, qpos, lengths)
            del part
        bar.update(len(chunk))
    return norms


def stream_generation(
    backend: Any, enc: inputs.Encoded, batches: list[range], writer: codec.AttentionWriter, *, layers: list[int],
    heads: str | Tensor, options: TraceOptions, causal: bool, bar: Any,
) -> tuple[inputs.Encoded, dict[str, Tensor] | None]:
    """One generation per batch that records (`generate_record`), written layer by layer; the completed sequences
    and the norms.

    Locally, with every row (`rows=None`, the case whose rows are too many to
    hold) of causal layers, the backend hands each layer's prompt rows to the
    writer at prefill and its new tokens' rows once the batch has generated, so
    one layer of prompt rows is held at a time.  Otherwise (listed rows, remote
    runs) the batch's rows, a few per example, are recorded whole, then written.
    """
    streamed = getattr(backend, "streams", False) and options.rows is None and causal
    sink = (lambda chunk: writing_sink(writer, layers, chunk.start)) if streamed else None
    seqs, norm_parts = [], []
    for chunk, full, part, part_norms in generated_batches(
        backend, enc, options.max_new_tokens, batches, layers=layers, heads=heads, options=options, bar=bar, sink=sink
    ):
        if part is not None:  # laid out as `record` lays out prompt + completion
            lengths = [len(s) for s in full]
            pos = inputs.row_positions(options.rows, lengths, [enc.prompt_lengths[i] for i in chunk])
            write_layers(writing_sink(writer, layers), part, inputs.row_index(pos, lengths, max(lengths)), lengths)
            del part
        seqs += full
        norm_parts.append(part_norms)
    enc = inputs.Encoded(seqs, list(enc.prompt_lengths))
    return enc, place_norms(norm_parts, batches, len(layers), backend.num_heads, max(enc.lengths))


def place_norms(parts: list[dict[str, Tensor] | None], batches: list[range], layers: int, heads: int, seq: int) -> dict[str, Tensor] | None:
    """The batches' norms (keys right-aligned in each batch's own length) in one trace's `empty_norms`; None without."""
    if not parts or parts[0] is None:
        return None
    norms = empty_norms(batches[-1].stop, layers, heads, seq)
    for chunk, part in zip(batches, parts):
        for k, v in part.items():
            norms[k][chunk.start : chunk.stop, ..., seq - v.shape[-1] :] = v  # keys right-aligned, as `place` does
    return norms


def special_ids(tokenizer: Any) -> list[int]:
    """The tokenizer's special token ids (its special tokens and added tokens marked special); [] without one."""
    ids = set(getattr(tokenizer, "all_special_ids", None) or ())
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return sorted(ids | {int(i) for i, t in added.items() if getattr(t, "special", False)})


def display_text(tokenizer: Any, enc: inputs.Encoded) -> list[list[str]] | None:
    """Each token's display string (the text it covers, `attnflow.tokens`); None without a tokenizer."""
    if tokenizer is None:
        return None
    return [tokens.sequence_display(tokenizer, s[:n], s[n:]) for s, n in zip(enc.sequences, enc.prompt_lengths)]


def record(
    backend: Backend, enc: inputs.Encoded, positions: list[list[int]], batches: list[range], *, layers: list[int],
    heads: str | Tensor, head_out: int, options: TraceOptions, bar: Any,
) -> tuple[Float[Tensor, "batch layer head row key"], dict[str, Tensor] | None]:
    """Every batch recorded by the backend straight into its window of one preallocated tensor (and of the norms).

    The window of a batch is right-aligned in rows and keys (left padding stays
    zero), so no batch's patterns are ever held twice.
    """
    B, R, S = len(enc.sequences), max(len(p) for p in positions), max(enc.lengths)
    patterns = torch.zeros((B, len(layers), head_out, R, S), dtype=options.dtype)
    norms = empty_norms(B, len(layers), backend.num_heads, S) if options.norms else None
    for chunk in batches:
        Rc = max(len(positions[i]) for i in chunk)
        Sc = max(enc.lengths[i] for i in chunk)
        window = None if norms is None else {k: v[chunk.start : chunk.stop, ..., S - Sc :] for k, v in norms.items()}
        backend.record(
            [enc.sequences[i] for i in chunk], [positions[i] for i in chunk], layers=layers, heads=heads,
            options=options, out=patterns[chunk.start : chunk.stop, :, :, R - Rc :, S - Sc :],
            **({} if window is None else {"norms": window}),
        )
        bar.update(len(chunk))
    return patterns, norms


def empty_norms(batch: int, layers: int, heads: int, seq: int) -> dict[str, Tensor]:
    """Zero float32 `AttentionTrace.norms`: value [batch, layer, head, seq], attn and residual [batch, layer, seq]."""
    return {
        "value": torch.zeros((batch, layers, heads, seq)),
        "attn": torch.zeros((batch, layers, seq)),
        "residual": torch.zeros((batch, layers, seq)),
    }


def generate_record(
    backend: Any, enc: inputs.Encoded, max_new_tokens: int, batches: list[range], *, layers: list[int],
    heads: str | Tensor, options: TraceOptions, bar: Any,
) -> tuple[inputs.Encoded, Float[Tensor, "batch layer head row key"], dict[str, Tensor] | None]:
    """Each prompt with its greedy completion (cut after the first EOS) and its patterns, one generation per batch.

    The final lengths are known only once every batch has generated, so each
    batch's part is kept until then and placed into the trace's tensor (parts
    are freed as they are placed).
    """
    seqs, parts, norm_parts = [], [], []
    for _, full, part, part_norms in generated_batches(
        backend, enc, max_new_tokens, batches, layers=layers, heads=heads, options=options, bar=bar
    ):
        seqs += full
        parts.append(part)
        norm_parts.append(part_norms)
    enc = inputs.Encoded(seqs, list(enc.prompt_lengths))
    positions = inputs.row_positions(options.rows, enc.lengths, enc.prompt_lengths)
    B, R, S = len(seqs), max(len(p) for p in positions), max(enc.lengths)
    norms = place_norms(norm_parts, batches, len(layers), backend.num_heads, S)
    if len(parts) == 1 and parts[0].shape[-2:] == (R, S):
        return enc, parts[0], norms
    patterns = torch.zeros((B, *parts[0].shape[1:3], R, S), dtype=parts[0].dtype)
    for chunk in batches:
        place(patterns, parts.pop(0), chunk)
    return enc, patterns, norms


def generated_batches(
    backend: Any, enc: inputs.Encoded, max_new_tokens: int, batches: list[range], *, layers: list[int],
    heads: str | Tensor, options: TraceOptions, bar: Any, sink: Any = None,
):
    """Each batch's one recording generation (`generate_record`), in order: (chunk, its prompts + completions cut
    after the first EOS, its patterns or None when streamed, its norms).  `sink(chunk)`, when given, is the
    batch's writer sink (`writing_sink`)."""
    for chunk in batches:
        part_seqs = [enc.sequences[i] for i in chunk]
        extra = {} if sink is None else {"sink": sink(chunk)}
        new, part, part_norms = backend.generate_record(
            part_seqs, max_new_tokens, layers=layers, heads=heads, options=options, **extra
        )
        yield chunk, [list(s) + cut_at_eos(n, backend.eos_ids) for s, n in zip(part_seqs, new)], part, part_norms
        bar.update(len(chunk))


def cut_at_eos(new: list[int], eos_ids: set[int]) -> list[int]:
    """New tokens up to and including the first end-of-sequence token.

        >>> cut_at_eos([7, 2, 7], {2}), cut_at_eos([7, 7], {2})
        ([7, 2], [7, 7])
    """
    stop = next((j + 1 for j, t in enumerate(new) if t in eos_ids), len(new))
    return list(new[:stop])


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
            seqs.append(list(s) + cut_at_eos(new, backend.eos_ids))
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


def check_finite_norms(norms: dict[str, Tensor] | None, layers: list[int]) -> None:
    """NonFiniteError naming the first layer whose recorded norms hold NaN or inf (the model's activations overflowed)."""
    if norms is None:
        return
    for name, t in norms.items():
        bad = ~torch.isfinite(t.flatten(2).sum(-1)).all(0)  # [layer]
        if bad.any():
            raise NonFiniteError(
                f"the {name} norms of layer {layers[int(bad.nonzero()[0])]} hold NaN or inf: the model's activations "
                "overflowed; load it in float32 or bfloat16"
            )


def check_finite(patterns: Float[Tensor, "batch layer head row key"], layers: list[int]) -> None:
    """NonFiniteError naming the first layer whose pattern holds NaN or inf (the model's q/k overflowed).

        >>> P = torch.zeros(1, 2, 1, 1, 3); P[0, 1, 0, 0, 2] = float("nan")
        >>> check_finite(P, [0, 5])
        Traceback (most recent call last):
        attnflow.errors.NonFiniteError: the attention of layer 5 (example 0) holds NaN or inf: the model's queries or keys overflowed; load it in float32 or bfloat16
    """
    for li, layer in enumerate(layers):
        # a row sum carries any NaN/inf; summed in the storage dtype (rows sum to <= 1, so it cannot overflow),
        # it is 1/key the size of the layer: no float32 or boolean copy of the trace
        bad = ~torch.isfinite(patterns[:, li].sum(-1)).flatten(1).all(-1)  # [batch]
        if bad.any():
            raise NonFiniteError(
                f"the attention of layer {layer} (example {int(bad.nonzero()[0])}) holds NaN or inf: the model's "
                "queries or keys overflowed; load it in float32 or bfloat16"
            )
