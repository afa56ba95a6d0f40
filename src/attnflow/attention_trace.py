"""AttentionTrace: the one data model every part of attnflow passes around.

A trace holds a batch of examples, left-padded to a common length `seq`, and the
attention patterns recorded from them:

    patterns        Float[Tensor, "batch layer head query key"]   key = seq (padded)
    input_ids       Int[Tensor, "batch seq"]                      left-padded
    attention_mask  Int[Tensor, "batch seq"]                      1 = real token
    query_positions Int[Tensor, "batch query"]                    padded position of each query row, -1 = none

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
    >>> tr.save("run/"); af.AttentionTrace.load("run/")

`save` writes a Parquet dataset (tables `tokens`, `spans`, `attention`, the last
partitioned by layer, hive style) and `manifest.json`; the schema is in
src/attnflow/exporters/SCHEMA.md.  It is lossless for the stored dtype (bfloat16 is stored as
float32, exactly).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from jaxtyping import Float, Int
from torch import Tensor

from attnflow import _io
from attnflow.errors import DataError, ShapeError

SCHEMA_VERSION = 1
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
            f"patterns={tuple(self.patterns.shape)} {str(self.patterns.dtype).removeprefix('torch.')}, "
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
            prompt_lengths=[self.prompt_lengths[i]],
            spans=[list(self.spans[i])],
            model_info=dict(self.model_info),
            settings=dict(self.settings),
        )

    def example_patterns(self, i: int) -> tuple[Tensor, Tensor]:
        """(patterns [layer, head, query, key], query positions [query]) of example i, unpadded."""
        one = self.item(i)
        return one.patterns[0], one.query_positions[0]

    # --- persistence ---------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the trace as a Parquet dataset with `manifest.json` under `path` (replaced whole)."""
        path = Path(path)
        with _io.atomic_dir(path) as tmp:
            write_tables(self, tmp)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "AttentionTrace":
        """Read a trace written by `save` or `attnflow.exporters.to_parquet`."""
        return read_tables(Path(path))

    def _repr_html_(self) -> str:
        from attnflow.exporters.html import inline_html

        return inline_html(self)


# ------------------------------------------------------------------------------------
# Parquet codec (schema v1, documented in src/attnflow/exporters/SCHEMA.md)
# ------------------------------------------------------------------------------------
_ARROW_FLOAT = {torch.float16: pa.float16(), torch.float32: pa.float32(), torch.float64: pa.float64()}
_TORCH_DTYPE = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def is_causal(tr: AttentionTrace) -> bool:
    """True when no query row attends to a key after its own position."""
    S = tr.input_ids.shape[1]
    keys = torch.arange(S)
    future = keys.view(1, 1, S) > tr.query_positions.clamp(min=0).unsqueeze(-1)  # [batch, query, key]
    return not bool((tr.patterns.abs().sum((1, 2)) * future).any())


def manifest(tr: AttentionTrace) -> dict:
    from attnflow import __version__

    return {
        "schema_version": SCHEMA_VERSION,
        "attnflow_version": __version__,
        "model_info": tr.model_info,
        "settings": tr.settings,
        "dtype": _dtype_name(tr.patterns.dtype),
        "layers": list(tr.layers),
        "heads": tr.heads,
        "num_heads": int(tr.patterns.shape[2]),
        "batch": tr.batch_size,
        "causal": is_causal(tr),
        "pad_token_id": int(tr.settings.get("pad_token_id", 0) or 0),
        "prompt_lengths": list(tr.prompt_lengths),
    }


def tokens_table(tr: AttentionTrace) -> pa.Table:
    rows = {k: [] for k in ("example", "position", "token_id", "token", "role", "span")}
    for b in range(tr.batch_size):
        ids = tr.input_ids[b, tr.pad_offsets[b] :].tolist()
        span_of = [None] * len(ids)
        for s_id, s in reversed(list(enumerate(tr.spans[b]))):  # first span listed wins
            for p in range(s.start, min(s.end, len(ids))):
                span_of[p] = s_id
        for p, tid in enumerate(ids):
            rows["example"].append(b)
            rows["position"].append(p)
            rows["token_id"].append(tid)
            rows["token"].append(tr.tokens[b][p])
            rows["role"].append("prompt" if p < tr.prompt_lengths[b] else "completion")
            rows["span"].append(span_of[p])
    schema = pa.schema(
        [
            ("example", pa.int32()),
            ("position", pa.int32()),
            ("token_id", pa.int64()),
            ("token", pa.string()),
            ("role", pa.string()),
            ("span", pa.int32()),
        ]
    )
    return pa.table(rows, schema=schema)


def spans_table(tr: AttentionTrace) -> pa.Table:
    cols = ("example", "span_id", "name", "kind", "start", "end", "char_start", "char_end")
    rows = {k: [] for k in cols}
    for b, spans in enumerate(tr.spans):
        for s_id, s in enumerate(spans):
            for k, v in zip(cols, (b, s_id, s.name, s.kind, s.start, s.end, s.char_start, s.char_end)):
                rows[k].append(v)
    schema = pa.schema(
        [
            ("example", pa.int32()),
            ("span_id", pa.int32()),
            ("name", pa.string()),
            ("kind", pa.string()),
            ("start", pa.int32()),
            ("end", pa.int32()),
            ("char_start", pa.int32()),
            ("char_end", pa.int32()),
        ]
    )
    return pa.table(rows, schema=schema)


def attention_table(tr: AttentionTrace, layer_index: int, causal: bool) -> pa.Table:
    """Rows (example, head, query, weights) of one recorded layer; weights over unpadded keys."""
    stored = torch.float32 if tr.patterns.dtype == torch.bfloat16 else tr.patterns.dtype
    value_type = _ARROW_FLOAT[stored]
    H = tr.patterns.shape[2]
    reduced = tr.heads != "all"
    examples, heads, queries, offsets, values = [], [], [], [0], []
    for b in range(tr.batch_size):
        pad = tr.pad_offsets[b]
        qpos = tr.query_positions[b]
        keep = qpos >= 0
        q = (qpos[keep] - pad).cpu()  # [query]
        A = tr.patterns[b, layer_index][:, keep, pad:].to(stored).cpu()  # [head, query, key]
        n_keys = A.shape[-1]
        widths = (q + 1) if causal else torch.full_like(q, n_keys)
        take = torch.arange(n_keys).view(1, -1) < widths.view(-1, 1)  # [query, key]
        values.append(A[:, take].reshape(-1))  # row prefixes, head-major then query
        row_widths = widths.repeat(H)
        offsets.extend((offsets[-1] + torch.cumsum(row_widths, 0)).tolist())
        examples.extend([b] * (H * len(q)))
        heads.extend([-1 if reduced else h for h in range(H) for _ in range(len(q))])
        queries.extend(q.tolist() * H)
    flat = torch.cat(values) if values else torch.zeros(0, dtype=stored)
    weights = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat.numpy(), value_type))
    return pa.table(
        {
            "example": pa.array(examples, pa.int32()),
            "head": pa.array(heads, pa.int16()),
            "query": pa.array(queries, pa.int32()),
            "weights": weights,
        }
    )


def write_tables(tr: AttentionTrace, out: Path) -> None:
    """Write tokens, spans, attention (hive-partitioned by layer) and manifest.json into `out`."""
    man = manifest(tr)
    _write_parquet(tokens_table(tr), out / "tokens" / "part-0.parquet")
    _write_parquet(spans_table(tr), out / "spans" / "part-0.parquet")
    for li, layer in enumerate(tr.layers):
        _write_parquet(attention_table(tr, li, man["causal"]), out / "attention" / f"layer={layer}" / "part-0.parquet")
    _io.write_json(out / "manifest.json", man)


def _write_parquet(table: pa.Table, path: Path) -> None:
    with _io.atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_manifest(path: Path) -> dict:
    file = path / "manifest.json"
    if not file.is_file():
        raise DataError(f"{path} holds no manifest.json; pass a directory written by AttentionTrace.save or to_parquet")
    man = json.loads(file.read_text())
    if man.get("schema_version") != SCHEMA_VERSION:
        raise DataError(
            f"{path} has schema_version {man.get('schema_version')!r}; this attnflow reads version {SCHEMA_VERSION}"
        )
    return man


def read_tables(path: Path) -> AttentionTrace:
    if not path.is_dir():
        raise DataError(f"no saved trace at {path}: the directory does not exist")
    man = read_manifest(path)
    tok = pq.read_table(path / "tokens").to_pydict()
    B = man["batch"]
    ids = [[] for _ in range(B)]
    toks = [[] for _ in range(B)]
    for b, p, tid, t in sorted(zip(tok["example"], tok["position"], tok["token_id"], tok["token"])):
        ids[b].append(tid)
        toks[b].append(t)
    lengths = [len(x) for x in ids]
    S = max(lengths)
    pads = [S - n for n in lengths]
    input_ids = torch.full((B, S), man["pad_token_id"], dtype=torch.long)
    attention_mask = torch.zeros((B, S), dtype=torch.long)
    for b in range(B):
        input_ids[b, pads[b] :] = torch.tensor(ids[b], dtype=torch.long)
        attention_mask[b, pads[b] :] = 1

    spans = [[] for _ in range(B)]
    sp = pq.read_table(path / "spans").to_pylist()
    for r in sorted(sp, key=lambda r: (r["example"], r["span_id"])):
        spans[r["example"]].append(
            Span(r["name"], r["kind"], r["start"], r["end"], r["char_start"], r["char_end"])
        )

    layers = man["layers"]
    H = man["num_heads"]
    dtype = _TORCH_DTYPE[man["dtype"]]
    first = pq.read_table(path / "attention" / f"layer={layers[0]}", columns=["example", "head", "query"])
    qsets = [sorted(set(q for e, q in zip(first["example"].to_pylist(), first["query"].to_pylist()) if e == b)) for b in range(B)]
    Q = max((len(q) for q in qsets), default=0)
    query_positions = torch.full((B, Q), -1, dtype=torch.long)
    for b, qs in enumerate(qsets):
        if qs:
            query_positions[b, Q - len(qs) :] = torch.tensor(qs) + pads[b]
    patterns = torch.zeros((B, len(layers), H, Q, S), dtype=torch.float32 if dtype == torch.bfloat16 else dtype)
    for li, layer in enumerate(layers):
        t = pq.read_table(path / "attention" / f"layer={layer}")
        ex = torch.tensor(t["example"].to_numpy()).long()
        hd = torch.tensor(t["head"].to_numpy()).long().clamp(min=0)
        qy = torch.tensor(t["query"].to_numpy()).long()
        w = t["weights"].combine_chunks()
        flat = torch.tensor(np.asarray(w.flatten().to_numpy(zero_copy_only=False)))
        widths = torch.from_numpy(np.diff(np.asarray(w.offsets)).astype(np.int64))
        # row r's values go to key columns pad[ex] + 0..width-1 of its (example, head, query row)
        row_of_value = torch.repeat_interleave(torch.arange(len(widths)), widths)
        start = torch.cumsum(widths, 0) - widths
        key = torch.arange(len(flat)) - start[row_of_value] + torch.tensor(pads)[ex][row_of_value]
        qrow = _row_index(query_positions, ex, qy + torch.tensor(pads)[ex])
        patterns[ex[row_of_value], li, hd[row_of_value], qrow[row_of_value], key] = flat.to(patterns.dtype)
    return AttentionTrace(
        patterns=patterns.to(dtype),
        input_ids=input_ids,
        attention_mask=attention_mask,
        query_positions=query_positions,
        tokens=toks,
        prompt_lengths=list(man["prompt_lengths"]),
        layers=list(layers),
        heads=man["heads"],
        spans=spans,
        model_info=man["model_info"],
        settings=man["settings"],
    )


def _row_index(query_positions: Tensor, ex: Tensor, padded_q: Tensor) -> Tensor:
    """Index of padded position `padded_q` within query_positions[ex] (rows are sorted, -1 first)."""
    rows = query_positions[ex]  # [n, Q]
    return (rows == padded_q.unsqueeze(-1)).long().argmax(-1)
