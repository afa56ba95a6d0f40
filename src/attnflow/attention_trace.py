"""AttentionTrace: the one data model every part of attnflow passes around.

A trace holds a batch of examples, left-padded to a common length `seq`, and the
attention patterns recorded from them:

    patterns        Float[Tensor, "batch layer head query key"]   key = seq (padded)
    input_ids       Int[Tensor, "batch seq"]                      left-padded
    attention_mask  Int[Tensor, "batch seq"]                      1 = real token
    query_positions Int[Tensor, "batch query"]                    padded position of each query row, -1 = none
    norms           None, or (recorded with `norms=True`) float32 tensors padded like the keys:
                    "value"    [batch, layer, head, key]   ‖W_O^h v^h_j‖, each key's transformed value per head
                    "attn"     [batch, layer, query]       ‖attention output‖ at each position (query = seq)
                    "residual" [batch, layer, query]       ‖residual input of the layer‖ at each position

Query rows are right-aligned: with every row recorded, `query_positions[b]` is
`arange(seq)` with -1 at pad positions; with `rows="last"` it is `[[seq - 1]]`
for every example.  Pad rows and pad keys of `patterns` are zero.  `tokens`,
`prompt_lengths` and `spans` are per example and unpadded: position 0 is an
example's first real token.  `item(i)` returns example i alone, unpadded.

    >>> tr = af.trace(model, ["The cat", "A much longer prompt"], heads="mean")
    >>> tr.patterns.shape                 # batch layer head query key
    torch.Size([2, 4, 1, 5, 5])
    >>> tr.item(0).patterns.shape         # unpadded
    torch.Size([1, 4, 1, 3, 3])
    >>> tr.save("run/")
    PosixPath('run')
    >>> af.AttentionTrace.load("run/")
    AttentionTrace(batch=2, layers=[0, 1, 2, 3], heads='mean', patterns=(2, 4, 1, 5, 5) float16, model='...')

`save` writes a Parquet dataset (tables `tokens`, `spans`, `attention`, the last
partitioned by layer, hive style) and `manifest.json` through `attnflow.codec`; the
schema is in src/attnflow/exporters/SCHEMA.md.  It is lossless for the stored dtype (bfloat16 is stored as
float32, exactly).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from jaxtyping import Float, Int
from torch import Tensor

from attnflow import _checks, _io, codec
from attnflow.errors import DataError, ShapeError

SPAN_KINDS = ("document", "sentence", "question", "answer", "prompt", "completion", "custom")


@dataclass(frozen=True)
class Span:
    """A named range of token positions `[start, end)` in one example (unpadded).

    `kind` is one of document, sentence, question, answer, prompt, completion,
    custom.  `char_start`/`char_end` locate it in the prompt text when known.
    """

    name: str
    kind: str
    start: int
    end: int
    char_start: int | None = None
    char_end: int | None = None

    def __post_init__(self):
        if self.kind not in SPAN_KINDS:
            raise DataError(f"span {self.name!r} has kind {self.kind!r}; use one of {', '.join(SPAN_KINDS)}")
        if not 0 <= self.start <= self.end:
            raise DataError(f"span {self.name!r} has start={self.start}, end={self.end}; need 0 <= start <= end")


NORM_KEYS = ("value", "attn", "residual")


def check_norms(norms: Any, batch: int, layers: int, seq: int) -> None:
    """ShapeError unless `norms` maps exactly NORM_KEYS to value [batch, layer, head, seq] and [batch, layer, seq] tensors.

        >>> check_norms({"value": torch.ones(1, 2, 4, 3), "attn": torch.ones(1, 2, 3), "residual": torch.ones(1, 2, 5)}, 1, 2, 3)
        Traceback (most recent call last):
        attnflow.errors.ShapeError: norms['residual'] has shape (1, 2, 5), expected (batch=1, layer=2, query=3)
    """
    if not isinstance(norms, dict) or sorted(norms) != sorted(NORM_KEYS):
        keys = sorted(norms) if isinstance(norms, dict) else type(norms).__name__
        raise ShapeError(f"norms holds {keys}; expected a dict of {', '.join(NORM_KEYS)} (or None)")
    v = norms["value"]
    if not isinstance(v, Tensor) or v.ndim != 4 or (v.shape[0], v.shape[1], v.shape[3]) != (batch, layers, seq):
        shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
        raise ShapeError(f"norms['value'] has shape {shape}, expected (batch={batch}, layer={layers}, head, key={seq})")
    for name in ("attn", "residual"):
        t = norms[name]
        if not isinstance(t, Tensor) or tuple(t.shape) != (batch, layers, seq):
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ShapeError(f"norms[{name!r}] has shape {shape}, expected (batch={batch}, layer={layers}, query={seq})")


@dataclass
class AttentionTrace:
    patterns: Float[Tensor, "batch layer head query key"]
    input_ids: Int[Tensor, "batch seq"]
    attention_mask: Int[Tensor, "batch seq"]
    query_positions: Int[Tensor, "batch query"]
    tokens: list[list[str]]
    prompt_lengths: list[int]
    layers: list[int]
    heads: str = "all"  # "all" | "mean" | "max" | "weighted": how the head dim was made
    spans: list[list[Span]] = field(default_factory=list)
    model_info: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    text: list[list[str]] | None = None  # display strings: exactly the text each token covers (attnflow.tokens)
    norms: dict[str, Tensor] | None = None  # NORM_KEYS -> float32 tensors (see the module docstring)

    def __post_init__(self):
        B, S = self.input_ids.shape
        if self.attention_mask.shape != (B, S):
            raise ShapeError(f"attention_mask has shape {tuple(self.attention_mask.shape)}, expected {(B, S)}")
        if self.patterns.ndim != 5 or self.patterns.shape[0] != B or self.patterns.shape[-1] != S:
            raise ShapeError(
                f"patterns has shape {tuple(self.patterns.shape)}, expected (batch={B}, layer, head, query, key={S})"
            )
        if self.patterns.shape[1] != len(self.layers):
            raise ShapeError(f"patterns has {self.patterns.shape[1]} layers but `layers` names {len(self.layers)}")
        if self.query_positions.shape != (B, self.patterns.shape[3]):
            raise ShapeError(
                f"query_positions has shape {tuple(self.query_positions.shape)}, expected {(B, self.patterns.shape[3])}"
            )
        if len(self.tokens) != B or len(self.prompt_lengths) != B:
            raise ShapeError(f"tokens and prompt_lengths need one entry per example ({B})")
        if not self.spans:
            self.spans = [[] for _ in range(B)]
        if self.text is not None and [len(t) for t in self.text] != [len(t) for t in self.tokens]:
            raise ShapeError("text needs one display string per token of each example (as many as tokens)")
        if self.norms is not None:
            check_norms(self.norms, B, len(self.layers), S)

    def display(self, i: int) -> list[str]:
        """Example i's display strings: `text` when recorded, else the raw `tokens` (older traces)."""
        return list(self.text[i]) if self.text is not None else list(self.tokens[i])

    # --- shape facts -------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def lengths(self) -> list[int]:
        """Unpadded length of each example."""
        return self.attention_mask.sum(-1).tolist()

    @property
    def pad_offsets(self) -> list[int]:
        """How many pad positions precede example b's first real token."""
        S = self.input_ids.shape[1]
        return [S - n for n in self.lengths]

    def __len__(self) -> int:
        return self.batch_size

    def __repr__(self) -> str:
        return (
            f"AttentionTrace(batch={self.batch_size}, layers={self.layers}, heads={self.heads!r}, "
            f"patterns={tuple(self.patterns.shape)} {codec.dtype_name(self.patterns.dtype)}, "
            f"model={self.model_info.get('name', '?')!r})"
        )

    # --- one example ---------------------------------------------------------------
    def item(self, i: int) -> "AttentionTrace":
        """Example `i` alone, with padding removed (positions start at its first real token)."""
        if not -self.batch_size <= i < self.batch_size:
            raise IndexError(f"example {i} out of range for a trace of {self.batch_size}")
        i = i % self.batch_size
        pad = self.pad_offsets[i]
        qpos = self.query_positions[i]
        keep = qpos >= 0
        return replace(
            self,
            patterns=self.patterns[i : i + 1, :, :, keep, pad:].clone(),
            input_ids=self.input_ids[i : i + 1, pad:].clone(),
            attention_mask=self.attention_mask[i : i + 1, pad:].clone(),
            query_positions=(qpos[keep] - pad).unsqueeze(0),
            tokens=[list(self.tokens[i])],
            text=None if self.text is None else [list(self.text[i])],
            prompt_lengths=[self.prompt_lengths[i]],
            spans=[list(self.spans[i])],
            model_info=dict(self.model_info),
            settings=dict(self.settings),
            norms=None if self.norms is None else {k: v[i : i + 1, ..., pad:].clone() for k, v in self.norms.items()},
        )

    def example_patterns(self, i: int) -> tuple[Tensor, Tensor]:
        """(patterns [layer, head, query, key], query positions [query]) of example i, unpadded."""
        one = self.item(i)
        return one.patterns[0], one.query_positions[0]

    # --- persistence ---------------------------------------------------------------
    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the trace as a Parquet dataset with `manifest.json` under the new folder `path`.

        An existing folder is replaced (whole) only if it holds a trace attnflow saved and
        `overwrite=True`; a file, or a folder of anything else, is never touched (DataError).

        >>> tr.save("run/")
        PosixPath('run')
        >>> tr.save("run/")
        Traceback (most recent call last):
        attnflow.errors.DataError: run already holds an attnflow trace; pass overwrite=True (CLI: --overwrite) to replace it
        >>> tr.save("run/", overwrite=True)
        PosixPath('run')
        """
        path = _checks.path("path", path)
        with _io.output_dir(path, "trace", overwrite=overwrite) as tmp:
            codec.write_trace(self, tmp)
        return path

    @classmethod
    def load(cls, path: str | Path, layers: list[int] | None = None) -> "AttentionTrace":
        """Read a trace written by `save`, `trace(..., out=)` or `attnflow.exporters.to_parquet`, checked (DataError if damaged).

        `layers` reads only those recorded layers (their indices as in `trace.layers`), so a
        trace larger than memory can be read a few layers at a time:

        >>> tr.save("run/")
        PosixPath('run')
        >>> part = AttentionTrace.load("run/", layers=[3])
        >>> part.layers, torch.equal(part.patterns[:, 0], tr.patterns[:, 3])
        ([3], True)
        """
        fields = codec.read_trace(_checks.path("path", path), layers)
        try:
            fields["spans"] = [[Span(**s) for s in spans] for spans in fields["spans"]]
        except DataError as err:
            raise DataError(f"{Path(path) / 'spans'}: {err}") from None
        return cls(**fields)

    def _repr_html_(self) -> str:
        # Jupyter looks the hook up on the object, so it lives here; the exporter is imported only
        # when a notebook shows a trace, keeping the data model free of exporters at import time.
        from attnflow.exporters.html import inline_html

        return inline_html(self)


class SavedTrace:
    """A trace saved on disk, read only when asked: what `attnflow.trace(..., out=DIR)` returns.

    The manifest is read at once (a few kB); the patterns only by `load()` (every layer,
    an AttentionTrace held in memory) or `load(layers=[...])` (those layers), so a trace
    larger than memory is read a layer at a time.  Nothing is cached: each `load` reads
    and checks the files again.

        >>> saved = af.trace(model, ["the cat sat"], out="run/", progress=False)
        >>> saved
        SavedTrace('run', batch=1, layers=[0, 1, 2, 3], heads='all', dtype='float16')
        >>> saved.load(layers=[0]).patterns.shape           # batch layer head query key
        torch.Size([1, 1, 8, 4, 4])
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = codec.read_manifest(self.path)

    @property
    def layers(self) -> list[int]:
        return list(self.manifest["layers"])

    @property
    def heads(self) -> str:
        return self.manifest["heads"]

    @property
    def batch_size(self) -> int:
        return self.manifest["batch"]

    @property
    def dtype(self) -> str:
        return self.manifest["dtype"]

    def load(self, layers: list[int] | None = None) -> AttentionTrace:
        """The trace (or only `layers` of it) as an AttentionTrace: `AttentionTrace.load(self.path, layers)`."""
        return AttentionTrace.load(self.path, layers)

    def __repr__(self) -> str:
        return (
            f"SavedTrace({str(self.path)!r}, batch={self.batch_size}, layers={self.layers}, heads={self.heads!r}, "
            f"dtype={self.dtype!r})"
        )
