"""The Parquet codec of schema v1 (src/attnflow/exporters/SCHEMA.md), shared by `AttentionTrace.save`/`load`,
`exporters.to_parquet` and `exporters.to_html`.

It owns the tables' Arrow schemas, the storage dtypes, the manifest, atomic table writes and the
encoding of variable-length rows.  A row of attention (or of composed flow) is stored as an Arrow
list holding only the keys it may attend to: keys `0..query` of its example when causal, every
key of the example otherwise.  `pack` cuts those keys out of padded dense rows, `unpack` puts
them back:

    >>> rows = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.25, 0.75]])   # [row, key]; key 0 is a pad
    >>> starts, widths = torch.tensor([1, 1]), row_widths(torch.tensor([0, 1]), 2, causal=True)
    >>> pack(rows, starts, widths)
    tensor([1.0000, 0.2500, 0.7500])
    >>> torch.equal(unpack(pack(rows, starts, widths), starts, widths, n_keys=3), rows)
    True

The codec works on any object with an AttentionTrace's fields and imports nothing of attnflow
but `_io`, `_version` and `errors`, so the data model can build on it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from attnflow import _io
from attnflow._version import __version__
from attnflow.errors import DataError, ShapeError

if TYPE_CHECKING:
    from attnflow.attention_trace import AttentionTrace

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)  # v1: no tokens.text column (display strings)

# recording dtype -> the dtype its values are stored in (bfloat16 widens to float32, exactly) -> Arrow type
STORAGE = {torch.float16: torch.float16, torch.bfloat16: torch.float32, torch.float32: torch.float32, torch.float64: torch.float64}
ARROW = {torch.float16: pa.float16(), torch.float32: pa.float32(), torch.float64: pa.float64()}

TOKENS_SCHEMA = pa.schema(
    [
        ("example", pa.int32()),
        ("position", pa.int32()),
        ("token_id", pa.int64()),
        ("token", pa.string()),
        ("text", pa.string()),
        ("role", pa.string()),
        ("span", pa.int32()),
    ]
)
SPANS_SCHEMA = pa.schema(
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
FLOW_SCHEMA = pa.schema(
    [
        ("example", pa.int32()),
        ("method", pa.string()),
        ("query", pa.int32()),
        ("weights", pa.list_(pa.float32())),
    ]
)
SOURCE_COLUMNS = {"spans": "source_span", "tokens": "source_token"}

FlowArg = Mapping[str, "Tensor | tuple[Tensor, Tensor]"]


def attention_schema(dtype: torch.dtype) -> pa.Schema:
    """The attention table's columns for patterns recorded in `dtype` (the layer is the partition key)."""
    return pa.schema(
        [
            ("example", pa.int32()),
            ("head", pa.int16()),
            ("query", pa.int32()),
            ("weights", pa.list_(ARROW[STORAGE[dtype]])),
        ]
    )


def attribution_schema(sources: str = "spans") -> pa.Schema:
    """The attributions table's columns; `source_token` replaces `source_span` for token-level scores."""
    return pa.schema(
        [
            ("example", pa.int32()),
            ("method", pa.string()),
            ("target", pa.int32()),
            (SOURCE_COLUMNS[sources], pa.int32()),
            ("score", pa.float32()),
            ("rank", pa.int32()),
        ]
    )


def dtype_name(dtype: torch.dtype) -> str:
    """torch.float16 -> "float16", the name the manifest stores."""
    return str(dtype).removeprefix("torch.")


def _stored_dtype(name: str, where: Path) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if dtype not in STORAGE:
        names = ", ".join(dtype_name(d) for d in STORAGE)
        raise DataError(f"{where} has dtype {name!r}; this attnflow reads {names}")
    return dtype


# ------------------------------------------------------------------------------------
# variable-length rows
# ------------------------------------------------------------------------------------
def row_widths(queries: Int[Tensor, "row"], lengths: int | Int[Tensor, "row"], causal: bool) -> Int[Tensor, "row"]:
    """How many keys each row stores: `query + 1` when causal, its example's length otherwise.

    >>> row_widths(torch.tensor([0, 2]), 4, causal=True), row_widths(torch.tensor([0, 2]), 4, causal=False)
    (tensor([1, 3]), tensor([4, 4]))
    """
    return queries + 1 if causal else torch.as_tensor(lengths).expand(queries.shape).clone()


def key_mask(starts: Int[Tensor, "row"], widths: Int[Tensor, "row"], n_keys: int) -> Bool[Tensor, "row key"]:
    """True at keys `starts[r] .. starts[r] + widths[r] - 1` of each row r."""
    keys = torch.arange(n_keys)
    return (keys >= starts.unsqueeze(-1)) & (keys < (starts + widths).unsqueeze(-1))


def pack(rows: Float[Tensor, "*group row key"], starts: Int[Tensor, "row"], widths: Int[Tensor, "row"]) -> Float[Tensor, "*group value"]:
    """The stored keys of every row, rows in turn (`rows[..., r, starts[r]:starts[r] + widths[r]]`)."""
    R, N = rows.shape[-2:]
    take = torch.nonzero(key_mask(starts, widths, N).flatten()).squeeze(1)  # index_select beats a boolean mask
    return rows.reshape(*rows.shape[:-2], R * N).index_select(-1, take)


def unpack(values: Float[Tensor, "value"], starts: Int[Tensor, "row"], widths: Int[Tensor, "row"], n_keys: int) -> Float[Tensor, "row key"]:
    """Dense rows of `n_keys` keys from packed values (zeros outside each row's stored keys)."""
    mask = key_mask(starts, widths, n_keys)
    room = int(mask.sum())
    if room != len(values):
        raise DataError(
            f"a table holds {len(values)} weights for rows with room for {room}; the file is damaged or not schema v{SCHEMA_VERSION}"
        )
    rows = values.new_zeros((len(widths), n_keys))
    rows[mask] = values
    return rows


def list_array(values: Tensor, widths: Int[Tensor, "row"], value_type: pa.DataType) -> pa.ListArray:
    """An Arrow list array whose row r holds the next `widths[r]` of `values`."""
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(widths, 0)])
    return pa.ListArray.from_arrays(pa.array(offsets.numpy().astype(np.int32)), pa.array(values.numpy(), value_type))


def list_values(column: pa.ChunkedArray | pa.ListArray) -> tuple[Tensor, Int[Tensor, "row"]]:
    """(every value, row widths) of an Arrow list column."""
    lists = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    values = torch.from_numpy(np.array(lists.flatten().to_numpy(zero_copy_only=False)))
    widths = torch.from_numpy(pc.list_value_length(lists).to_numpy(zero_copy_only=False).astype(np.int64))
    return values, widths


def is_causal(rows: Float[Tensor, "batch *group query key"], query_positions: Int[Tensor, "batch query"]) -> bool:
    """True when no row holds weight on a key after its own position (rows at -1 are not rows).

    `rows` are padded patterns [batch, layer, head, query, key] or composed rows [batch, query, key].

    >>> is_causal(torch.tensor([[[1.0, 0.0], [0.5, 0.5]]]), torch.tensor([[0, 1]]))
    True
    """
    B, Q, K = rows.shape[0], rows.shape[-2], rows.shape[-1]
    qpos = query_positions.to(rows.device).unsqueeze(-1)  # [batch, query, 1]
    weighted = rows.abs().reshape(B, -1, Q, K).sum(1) != 0  # [batch, query, key]; faster than any(), inf is != 0 too
    later = (torch.arange(K, device=rows.device) > qpos) & (qpos >= 0)
    return not bool((weighted & later).any())


# ------------------------------------------------------------------------------------
# the trace: tokens, spans, attention, manifest
# ------------------------------------------------------------------------------------
def manifest(tr: AttentionTrace, causal: bool) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "attnflow_version": __version__,
        "model_info": tr.model_info,
        "settings": tr.settings,
        "dtype": dtype_name(tr.patterns.dtype),
        "layers": list(tr.layers),
        "heads": tr.heads,
        "num_heads": int(tr.patterns.shape[2]),
        "batch": tr.batch_size,
        "causal": causal,
        "pad_token_id": int(tr.settings.get("pad_token_id", 0) or 0),
        "prompt_lengths": list(tr.prompt_lengths),
    }


def tokens_table(tr: AttentionTrace) -> pa.Table:
    rows = {name: [] for name in TOKENS_SCHEMA.names}
    for b in range(tr.batch_size):
        ids = tr.input_ids[b, tr.pad_offsets[b] :].tolist()
        span_of = [None] * len(ids)
        for s_id, s in reversed(list(enumerate(tr.spans[b]))):  # first span listed wins
            for p in range(s.start, min(s.end, len(ids))):
                span_of[p] = s_id
        for p, tid in enumerate(ids):
            role = "prompt" if p < tr.prompt_lengths[b] else "completion"
            text = None if tr.text is None else tr.text[b][p]
            for name, v in zip(TOKENS_SCHEMA.names, (b, p, tid, tr.tokens[b][p], text, role, span_of[p])):
                rows[name].append(v)
    return pa.table(rows, schema=TOKENS_SCHEMA)


def spans_table(tr: AttentionTrace) -> pa.Table:
    rows = {name: [] for name in SPANS_SCHEMA.names}
    for b, spans in enumerate(tr.spans):
        for s_id, s in enumerate(spans):
            for name, v in zip(SPANS_SCHEMA.names, (b, s_id, s.name, s.kind, s.start, s.end, s.char_start, s.char_end)):
                rows[name].append(v)
    return pa.table(rows, schema=SPANS_SCHEMA)


def attention_table(tr: AttentionTrace, layer_index: int, causal: bool) -> pa.Table:
    """Rows (example, head, query, weights) of one recorded layer, in that order; weights over unpadded keys."""
    B, _, H, Q, S = tr.patterns.shape
    real = (tr.query_positions.cpu() >= 0).unsqueeze(1).expand(B, H, Q)  # [batch, head, query]
    b, h, j = torch.nonzero(real, as_tuple=True)
    pads = torch.tensor(tr.pad_offsets)[b]
    q = tr.query_positions.cpu()[b, j] - pads
    widths = row_widths(q, torch.tensor(tr.lengths)[b], causal)
    dtype = tr.patterns.dtype
    rows = tr.patterns[:, layer_index].cpu()[real].to(STORAGE[dtype])  # [row, key], (example, head, query) order
    return pa.table(
        {
            "example": pa.array(b.numpy(), pa.int32()),
            "head": pa.array((h if tr.heads == "all" else torch.full_like(h, -1)).numpy(), pa.int16()),
            "query": pa.array(q.numpy(), pa.int32()),
            "weights": list_array(pack(rows, pads, widths), widths, ARROW[STORAGE[dtype]]),
        },
        schema=attention_schema(dtype),
    )


def write_trace(tr: AttentionTrace, out: Path) -> dict:
    """Write tokens, spans, attention (hive-partitioned by layer) and manifest.json into `out`; the manifest."""
    man = manifest(tr, is_causal(tr.patterns, tr.query_positions))
    write_table(tokens_table(tr), out / "tokens" / "part-0.parquet")
    write_table(spans_table(tr), out / "spans" / "part-0.parquet")
    for li, layer in enumerate(tr.layers):
        write_table(attention_table(tr, li, man["causal"]), out / "attention" / f"layer={layer}" / "part-0.parquet")
    _io.write_json(out / "manifest.json", man)
    return man


def read_manifest(path: Path) -> dict:
    file = path / "manifest.json"
    if not file.is_file():
        raise DataError(f"{path} holds no manifest.json; pass a directory written by AttentionTrace.save or to_parquet")
    try:
        man = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise DataError(f"{file} is not valid JSON ({err}); write the directory again with AttentionTrace.save") from None
    if man.get("schema_version") not in READABLE_VERSIONS:
        raise DataError(
            f"{path} has schema_version {man.get('schema_version')!r}; this attnflow reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}: upgrade attnflow or write the trace again"
        )
    return man


def read_trace(path: Path) -> dict[str, Any]:
    """The fields of the AttentionTrace saved under `path`; spans as dicts of Span's fields."""
    if not path.is_dir():
        raise DataError(f"no saved trace at {path}: the directory does not exist")
    man = read_manifest(path)
    B = man["batch"]
    ids, toks, text = _read_tokens(path, B)
    lengths = [len(x) for x in ids]
    S = max(lengths)
    pads = torch.tensor([S - n for n in lengths])
    input_ids = torch.full((B, S), man["pad_token_id"], dtype=torch.long)
    attention_mask = torch.zeros((B, S), dtype=torch.long)
    for b in range(B):
        input_ids[b, pads[b] :] = torch.tensor(ids[b], dtype=torch.long)
        attention_mask[b, pads[b] :] = 1

    spans = [[] for _ in range(B)]
    for r in sorted(read_table(path, "spans").to_pylist(), key=lambda r: (r["example"], r["span_id"])):
        spans[r.pop("example")].append({k: v for k, v in r.items() if k != "span_id"})

    layers = man["layers"]
    dtype = _stored_dtype(man["dtype"], path)
    query_positions = _query_positions(read_table(path / "attention", f"layer={layers[0]}"), pads)
    patterns = torch.zeros((B, len(layers), man["num_heads"], query_positions.shape[1], S), dtype=STORAGE[dtype])
    for li, layer in enumerate(layers):
        t = read_table(path / "attention", f"layer={layer}")
        ex = torch.from_numpy(t["example"].to_numpy().astype(np.int64))
        head = torch.from_numpy(t["head"].to_numpy().astype(np.int64)).clamp(min=0)
        query = torch.from_numpy(t["query"].to_numpy().astype(np.int64)) + pads[ex]
        values, widths = list_values(t["weights"])
        expected = row_widths(query - pads[ex], torch.tensor(lengths)[ex], man["causal"])
        if not torch.equal(widths, expected):
            r = int(torch.nonzero(widths != expected)[0])
            raise DataError(
                f"{path / 'attention'} layer={layer} row {r} holds {int(widths[r])} weights, expected {int(expected[r])}; "
                "the file is damaged: write the directory again"
            )
        patterns[ex, li, head, _row_index(query_positions, ex, query)] = unpack(values, pads[ex], widths, S).to(patterns.dtype)
    return dict(
        patterns=patterns.to(dtype),
        input_ids=input_ids,
        attention_mask=attention_mask,
        query_positions=query_positions,
        tokens=toks,
        text=text,
        prompt_lengths=list(man["prompt_lengths"]),
        layers=list(layers),
        heads=man["heads"],
        spans=spans,
        model_info=man["model_info"],
        settings=man["settings"],
    )


def _read_tokens(path: Path, batch: int) -> tuple[list[list[int]], list[list[str]], list[list[str]] | None]:
    """(ids, raw tokens, display text or None) per example; v1 tables and traces recorded without text give None."""
    tok = read_table(path, "tokens").to_pydict()
    texts = tok.get("text") or [None] * len(tok["token"])
    ids = [[] for _ in range(batch)]
    toks = [[] for _ in range(batch)]
    text = [[] for _ in range(batch)]
    for b, _, tid, t, d in sorted(zip(tok["example"], tok["position"], tok["token_id"], tok["token"], texts)):
        ids[b].append(tid)
        toks[b].append(t)
        text[b].append(d)
    has_text = any(d is not None for per in text for d in per)
    return ids, toks, text if has_text else None


def _query_positions(table: pa.Table, pads: Tensor) -> Int[Tensor, "batch query"]:
    """Padded positions of each example's recorded rows, right-aligned (-1 first), from one layer's table."""
    ex, query = table["example"].to_pylist(), table["query"].to_pylist()
    qsets = [sorted({q for e, q in zip(ex, query) if e == b}) for b in range(len(pads))]
    Q = max((len(q) for q in qsets), default=0)
    query_positions = torch.full((len(pads), Q), -1, dtype=torch.long)
    for b, qs in enumerate(qsets):
        if qs:
            query_positions[b, Q - len(qs) :] = torch.tensor(qs) + pads[b]
    return query_positions


def _row_index(query_positions: Tensor, ex: Tensor, padded_q: Tensor) -> Tensor:
    """Index of padded position `padded_q` within query_positions[ex] (rows are sorted, -1 first)."""
    rows = query_positions[ex]  # [n, Q]
    return (rows == padded_q.unsqueeze(-1)).long().argmax(-1)


# ------------------------------------------------------------------------------------
# flow and attributions
# ------------------------------------------------------------------------------------
def flow_rows(trace: AttentionTrace, method: str, value) -> tuple[Float[Tensor, "batch rows key"], Int[Tensor, "batch rows"], bool]:
    """Validate one `flow=` entry: (rows float32 on cpu, their padded query positions, causal).

    `value` is a Tensor [batch, query, key] whose rows are `trace.query_positions`, or a
    tuple (Tensor [batch, rows, key], query positions [batch, rows]) with -1 for no row.
    """
    B, S = trace.input_ids.shape
    F, qpos = value if isinstance(value, tuple) else (value, trace.query_positions)
    if not isinstance(F, Tensor) or F.ndim != 3 or F.shape[0] != B or F.shape[2] != S:
        shape = tuple(F.shape) if isinstance(F, Tensor) else type(F).__name__
        raise ShapeError(f"flow[{method!r}] has shape {shape}, expected (batch={B}, query, key={S}) in padded coordinates")
    qpos = torch.as_tensor(qpos).long().cpu()
    if qpos.shape != F.shape[:2]:
        raise ShapeError(
            f"flow[{method!r}] query positions have shape {tuple(qpos.shape)}, expected {tuple(F.shape[:2])} (batch, rows)"
        )
    if not torch.isfinite(F).all():
        raise DataError(f"flow[{method!r}] holds NaN or inf; compose it in float32 from finite patterns")
    pads = torch.tensor(trace.pad_offsets).view(B, 1)
    bad = (qpos >= 0) & ((qpos < pads) | (qpos >= S))
    if bad.any():
        b, r = (int(i) for i in torch.nonzero(bad)[0])
        raise DataError(
            f"flow[{method!r}] row {r} of example {b} has query position {int(qpos[b, r])}, outside the example's "
            f"padded positions {trace.pad_offsets[b]}..{S - 1}; give padded positions, -1 for no row"
        )
    F = F.detach().float().cpu()
    return F, qpos, is_causal(F, qpos)


def flow_table(trace: AttentionTrace, flow: FlowArg) -> pa.Table:
    """One row per (method, example, recorded query row), weights over unpadded keys."""
    parts = [_flow_part(trace, method, *flow_rows(trace, method, value)) for method, value in flow.items()]
    return pa.concat_tables(parts) if parts else FLOW_SCHEMA.empty_table()


def _flow_part(trace: AttentionTrace, method: str, F: Tensor, qpos: Tensor, causal: bool) -> pa.Table:
    real = qpos >= 0  # [batch, rows]
    ex, _ = torch.nonzero(real, as_tuple=True)
    pads = torch.tensor(trace.pad_offsets)[ex]
    q = qpos[real] - pads
    widths = row_widths(q, torch.tensor(trace.lengths)[ex], causal)
    return pa.table(
        [
            pa.array(ex.numpy().astype(np.int32)),
            pa.array([method] * len(ex), pa.string()),
            pa.array(q.numpy().astype(np.int32)),
            list_array(pack(F[real], pads, widths), widths, pa.float32()),
        ],
        schema=FLOW_SCHEMA,
    )


def flow_tensor(table: pa.Table, trace: AttentionTrace, method: str) -> tuple[Float[Tensor, "batch rows key"], Int[Tensor, "batch rows"]]:
    """Rebuild (flow [batch, rows, key], query positions [batch, rows]) in `trace`'s padded coordinates.

    Rows are right-aligned like `trace.query_positions`; -1 marks a missing row.
    """
    t = table.filter(pc.equal(table["method"], method))
    if t.num_rows == 0:
        raise DataError(f"the flow table has no method {method!r}; it has {sorted(set(table['method'].to_pylist()))}")
    B, S = trace.input_ids.shape
    ex = torch.from_numpy(t["example"].to_numpy().astype(np.int64))
    q = torch.from_numpy(t["query"].to_numpy().astype(np.int64))
    order = torch.argsort(ex * S + q)
    ex, q = ex[order], q[order]
    counts = torch.bincount(ex, minlength=B)
    R = int(counts.max())
    slot = torch.arange(len(ex)) - (torch.cumsum(counts, 0) - counts)[ex] + (R - counts)[ex]  # right-aligned
    pads = torch.tensor(trace.pad_offsets)[ex]
    qpos = torch.full((B, R), -1, dtype=torch.long)
    qpos[ex, slot] = q + pads
    values, widths = list_values(t["weights"].combine_chunks().take(pa.array(order.numpy())))
    F = torch.zeros((B, R, S), dtype=torch.float32)
    F[ex, slot] = unpack(values, pads, widths, S)
    return F, qpos


def attribution_table(scores: Any) -> pa.Table:
    """Validate the table `attnflow.attribute` returned and cast it to the v1 column types.

    Token-level scores (`sources="tokens"`) carry `source_token` in place of `source_span`.
    Columns beyond the six of the schema are kept after them, unchanged.
    """
    if not isinstance(scores, pa.Table):
        try:
            import pandas as pd
        except ImportError:  # pragma: no cover - pandas is optional
            pd = None
        if pd is None or not isinstance(scores, pd.DataFrame):
            raise DataError(
                f"attributions is a {type(scores).__name__}; pass the pyarrow Table or pandas DataFrame attnflow.attribute returned"
            )
        scores = pa.Table.from_pandas(scores, preserve_index=False)
    tokens = "source_span" not in scores.column_names and "source_token" in scores.column_names
    schema = attribution_schema("tokens" if tokens else "spans")
    missing = [n for n in schema.names if n not in scores.column_names]
    if missing:
        raise DataError(f"attributions lacks column(s) {', '.join(missing)}; it needs {', '.join(schema.names)}")
    cols = {}
    for f in schema:
        try:
            cols[f.name] = scores[f.name].cast(f.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
            raise DataError(f"attributions column {f.name!r} cannot be read as {f.type}: {err}") from None
    for name in scores.column_names:
        if name not in cols:
            cols[name] = scores[name]
    return pa.table(cols)


# ------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------
def write_table(table: pa.Table, path: Path) -> None:
    """Write one Parquet file atomically (it appears whole or not at all)."""
    with _io.atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_table(path: Path, name: str, hint: str = "write the directory again with AttentionTrace.save") -> pa.Table:
    """The table in folder `path/name`, or a DataError that says it is missing and what to do."""
    where = path / name
    if not where.is_dir():
        raise DataError(f"{path} holds no {name} table; {hint}")
    try:
        return pq.read_table(where)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{where} cannot be read as Parquet ({err}); write the directory again") from None
