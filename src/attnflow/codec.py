"""The Parquet codec of schema v2 (src/attnflow/exporters/SCHEMA.md), shared by `AttentionTrace.save`/`load`,
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

import hashlib
import itertools
import json
import numbers
import re
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
from attnflow.errors import BadArgumentError, DataError, ShapeError

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
        ("weights", pa.list_(pa.field("element", pa.float32()))),
    ]
)
NORMS_SCHEMA = pa.schema(
    [
        ("example", pa.int32()),
        ("layer", pa.int32()),
        ("position", pa.int32()),
        ("attn", pa.float32()),
        ("residual", pa.float32()),
        ("value", pa.list_(pa.field("element", pa.float32()))),  # one per head
    ]
)
SOURCE_COLUMNS = {"spans": "source_span", "tokens": "source_token"}
SHARE_COLUMNS = ("share", "excluded_share", "completion_share", "other_share")

FlowArg = Mapping[str, "Tensor | tuple[Tensor, Tensor]"]


def attention_schema(dtype: torch.dtype) -> pa.Schema:
    """The attention table's columns for patterns recorded in `dtype` (the layer is the partition key)."""
    return pa.schema(
        [
            ("example", pa.int32()),
            ("head", pa.int16()),
            ("query", pa.int32()),
            ("weights", pa.list_(pa.field("element", ARROW[STORAGE[dtype]]))),
        ]
    )


def attribution_schema(sources: str = "spans", shares: bool = False) -> pa.Schema:
    """The attributions table's columns (exporters/SCHEMA.md); `source_token` replaces `source_span` for tokens.

    `shares=True` adds the accounting columns after the six: share, excluded_share,
    completion_share, other_share (float32) and excluded_keys (list<int32>).
    """
    fields = [
        ("example", pa.int32()),
        ("method", pa.string()),
        ("target", pa.int32()),
        (SOURCE_COLUMNS[sources], pa.int32()),
        ("score", pa.float32()),
        ("rank", pa.int32()),
    ]
    if shares:
        fields += [(c, pa.float32()) for c in SHARE_COLUMNS] + [("excluded_keys", pa.list_(pa.int32()))]
    return pa.schema(fields)


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
    values = pa.array(values.numpy(), value_type)
    return pa.ListArray.from_arrays(pa.array(offsets.numpy().astype(np.int32)), values, type=pa.list_(pa.field("element", value_type)))


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
HEAD_MODES = ("all", "mean", "max", "weighted", "norm")
WEIGHT_TOL = 0.02  # fp16 rounding over long rows stays far below; rows summing to 1.5 or 5 do not
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_layers(layers: Any, where: Any = "layers") -> list[int]:
    """`layers` as distinct non-negative ints, else DataError: they become folder names `layer=<n>`.

    >>> check_layers((0, 2))
    [0, 2]
    >>> check_layers([0, "1/../../x"])
    Traceback (most recent call last):
    attnflow.errors.DataError: layers: layers holds '1/../../x', not a non-negative integer; ...
    """
    if not isinstance(layers, (list, tuple)) or not layers:
        raise DataError(f"{where}: layers is {_short(layers)}; need a non-empty list of layer indices")
    out = []
    for v in layers:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
            raise DataError(f"{where}: layers holds {_short(v)}, not a non-negative integer; layers name folders (layer=<n>)")
        out.append(int(v))
    if len(set(out)) != len(out):
        raise DataError(f"{where}: layers {out} name a layer twice; each recorded layer once")
    return out


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def manifest(tr: AttentionTrace, causal: bool) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "trace",  # the output-folder marker (attnflow._io.folder_kind); to_parquet writes "parquet"
        "attnflow_version": __version__,
        "model_info": tr.model_info,
        "settings": tr.settings,
        "dtype": dtype_name(tr.patterns.dtype),
        "layers": check_layers(tr.layers, "the trace"),
        "heads": tr.heads,
        "num_heads": int(tr.patterns.shape[2]),
        "batch": tr.batch_size,
        "causal": causal,
        "pad_token_id": int(tr.settings.get("pad_token_id", 0) or 0),
        "prompt_lengths": list(tr.prompt_lengths),
        **({} if getattr(tr, "norms", None) is None else {"norm_heads": int(tr.norms["value"].shape[2])}),
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


ROW_GROUP_BYTES = 32 * 2**20  # packed weights gathered before a row group is written


class AttentionWriter:
    """The attention table of a trace, written layer by layer and batch by batch as the patterns arrive.

    `write(li, P, query_positions, lengths)` takes recorded layer `li` of a window of examples in the
    window's own left padding: P [example, head, query, key], its query rows' padded positions
    [example, query] (-1 = none) and the examples' lengths; windows come in example order.  Rows
    are stored in (example, head, query) order, as `AttentionTrace.save` stores them, a head at a
    time into row groups of about ROW_GROUP_BYTES, so the transient beyond P is one head's rows
    (and the index of one example's stored keys).  Each call writes its own file, closed at once
    (an open Parquet writer keeps buffers the size of its row groups); `close()` renames a layer's
    only file to `part-0.parquet`, or copies several into it one row group at a time.  `example=`
    names the window's first example, so that later calls can add rows to the same window (a
    generation's prompt rows at prefill, its new tokens' rows after): such a window is staged as
    Arrow IPC, and `close()` sorts it into (example, head, query) order and encodes it once.

    With `causal=True` each row stores keys 0..query, and (unless `check_causal=False`: the
    caller verified it) a weight on a later key is refused (DataError: dropping it would lose data).
    `close()` returns the files written, relative to `out`.

        >>> w = AttentionWriter(Path("t/"), layers=[0, 1], dtype=torch.float16, heads="all", causal=True)
        >>> for li in range(2):
        ...     w.write(li, tr.patterns[:, li], tr.query_positions, tr.lengths)
        >>> w.close()
        ['attention/layer=0/part-0.parquet', 'attention/layer=1/part-0.parquet']
    """

    def __init__(self, out: Path, layers: list[int], dtype: torch.dtype, heads: str, causal: bool, check_causal: bool = True):
        self.out, self.layers, self.dtype, self.heads, self.causal = Path(out), check_layers(layers), dtype, heads, causal
        self.check_causal = causal and check_causal
        self.schema = attention_schema(dtype)
        self.examples = [0] * len(self.layers)  # examples written so far, per layer
        self.files: list[list[Path]] = [[] for _ in self.layers]  # the files of each layer, one per `write`

    def write(
        self, li: int, P: Float[Tensor, "example head query key"], query_positions: Int[Tensor, "example query"],
        lengths: list[int], example: int | None = None,
    ) -> None:
        E, H, _, S = P.shape
        qpos = query_positions.cpu()
        first = self.examples[li] if example is None else example  # the window's first example
        # '_': not a table file until `close`; a window that more rows may join is staged as Arrow IPC (no
        # Parquet encoding to undo when `close` sorts it)
        file = self._dir(li) / f"_batch-{len(self.files[li])}.{'parquet' if example is None else 'arrow'}"
        self.files[li].append((first, file))
        with _staging_writer(file, self.schema) as sink:
            parts, size = [], 0
            for e in range(E):
                real = qpos[e] >= 0
                pad = S - int(lengths[e])
                q = qpos[e][real] - pad  # unpadded query of each row
                widths = row_widths(q, int(lengths[e]), self.causal)
                take = torch.nonzero(key_mask(torch.full_like(q, pad), widths, S).flatten()).squeeze(1)  # once per example
                for h in range(H):
                    rows = P[e, h].cpu()
                    rows = rows if bool(real.all()) else rows[real]  # [row, key]
                    values = rows.reshape(-1).index_select(0, take)
                    if self.check_causal and _nonzero(rows) != _nonzero(values):  # a dropped key held weight
                        raise DataError(
                            f"layer {self.layers[li]} attends to keys after the query (not causal); a streamed "
                            "trace stores causal rows: record without out= and save() the trace"
                        )
                    values = values.to(STORAGE[self.dtype])
                    parts.append(self._table(first + e, h, q, values, widths))
                    size += values.numel() * values.element_size()
                    if size >= ROW_GROUP_BYTES:
                        sink.write_table(pa.concat_tables(parts))
                        parts, size = [], 0
            if parts or not E:
                sink.write_table(pa.concat_tables(parts) if parts else self.schema.empty_table())
        self.examples[li] = max(self.examples[li], first + E)

    def _table(self, example: int, head: int, q: Tensor, values: Tensor, widths: Tensor) -> pa.Table:
        n = len(q)
        return pa.table(
            {
                "example": pa.array(np.full(n, example, dtype=np.int32)),
                "head": pa.array(np.full(n, head if self.heads == "all" else -1, dtype=np.int16)),
                "query": pa.array(q.numpy().astype(np.int32)),
                "weights": list_array(values, widths, ARROW[STORAGE[self.dtype]]),
            },
            schema=self.schema,
        )

    def _dir(self, li: int) -> Path:
        folder = self.out / "attention" / f"layer={self.layers[li]}"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def close(self) -> list[str]:
        """Each layer's files as its one `part-0.parquet` (a layer without rows: an empty table, as `save` writes it).

        The files of a staged window (several `write`s with the same `example=`:
        a generation's prompt rows, then its new tokens' rows) are read back
        memory-mapped, put in (example, head, query) order and encoded once.
        """
        for li, files in enumerate(self.files):
            target = self._dir(li) / "part-0.parquet"
            if len(files) == 1 and files[0][1].suffix == ".parquet":
                files[0][1].replace(target)
            elif not files:
                pq.write_table(self.schema.empty_table(), target)
            else:
                with pq.ParquetWriter(target, self.schema) as sink:
                    for _, group in itertools.groupby(files, key=lambda f: f[0]):
                        paths = [path for _, path in group]
                        if paths[0].suffix == ".parquet":
                            part = pq.ParquetFile(paths[0])
                            for g in range(part.num_row_groups):
                                sink.write_table(part.read_row_group(g))
                        else:  # staged: read back memory-mapped, sorted, encoded once
                            window = pa.concat_tables([pa.ipc.open_file(pa.memory_map(str(p))).read_all() for p in paths])
                            window = _in_row_order(window)
                            sink.write_table(window, row_group_size=max(1, len(window) * ROW_GROUP_BYTES // max(1, window.nbytes)))
                            del window
                        for path in paths:
                            path.unlink()
            self.files[li] = []
        return [f"attention/layer={layer}/part-0.parquet" for layer in self.layers]


def _in_row_order(table: pa.Table) -> pa.Table:
    """`table` sorted by (example, head, query), as runs of its own rows (zero-copy slices, not a `take`).

    Its parts are each sorted already (a window's prompt rows, then its new tokens'
    rows), so the sorted order is a few runs of consecutive rows: one when nothing moves.

        >>> t = pa.table({"example": [0, 0, 0, 0], "head": [0, 1, 0, 1], "query": [0, 0, 1, 1]})
        >>> _in_row_order(t).to_pydict()["query"], _in_row_order(t).column("head").num_chunks
        ([0, 1, 0, 1], 4)
    """
    order = pc.sort_indices(table, sort_keys=[("example", "ascending"), ("head", "ascending"), ("query", "ascending")])
    order = order.to_numpy()
    cuts = np.flatnonzero(np.diff(order) != 1) + 1  # where a run of consecutive rows ends
    starts, ends = np.concatenate([[0], cuts]), np.concatenate([cuts, [len(order)]])
    return pa.concat_tables([table.slice(int(order[a]), int(b - a)) for a, b in zip(starts, ends)]) if len(order) else table


def _staging_writer(file: Path, schema: pa.Schema):
    """A writer of `write_table` calls into `file`: Parquet for a `.parquet` name, Arrow IPC for `.arrow`."""
    if file.suffix == ".parquet":
        return pq.ParquetWriter(file, schema)
    return pa.ipc.new_file(str(file), schema)


def _nonzero(x: Tensor) -> int:
    """How many entries of `x` are not +0.0 (counted on the bits: 3x faster than on float16; softmax never gives -0.0)."""
    return int(torch.count_nonzero(x.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])))


def norms_table(tr: AttentionTrace) -> pa.Table:
    """Rows (example, layer, position, attn, residual, value[head]) of every recorded layer and real position.

    `layer` is the model's layer index (as in `layers`), `position` counts the example's real tokens.
    """
    B, L, H, S = tr.norms["value"].shape
    real = tr.attention_mask.cpu().bool().unsqueeze(1).expand(B, L, S)  # [batch, layer, seq]
    b, li, j = torch.nonzero(real, as_tuple=True)
    pads = torch.tensor(tr.pad_offsets)[b]
    value = tr.norms["value"].cpu().float().permute(0, 1, 3, 2)[real]  # [row, head]
    return pa.table(
        {
            "example": pa.array(b.numpy(), pa.int32()),
            "layer": pa.array(torch.tensor(tr.layers, dtype=torch.long)[li].numpy(), pa.int32()),
            "position": pa.array((j - pads).numpy(), pa.int32()),
            "attn": pa.array(tr.norms["attn"].cpu().float()[real].numpy(), pa.float32()),
            "residual": pa.array(tr.norms["residual"].cpu().float()[real].numpy(), pa.float32()),
            "value": list_array(value.flatten(), torch.full((len(b),), H, dtype=torch.long), pa.float32()),
        },
        schema=NORMS_SCHEMA,
    )


def write_trace(tr: AttentionTrace, out: Path) -> dict:
    """Write tokens, spans, attention (hive-partitioned by layer), norms (when recorded) and manifest.json into `out`.

    The manifest records the sha256 of every table file (`"sha256": {"tokens/part-0.parquet": hex, ...}`).
    """
    causal = is_causal(tr.patterns, tr.query_positions)
    writer = AttentionWriter(out, tr.layers, tr.patterns.dtype, tr.heads, causal, check_causal=False)
    for li in range(len(tr.layers)):
        writer.write(li, tr.patterns[:, li], tr.query_positions, tr.lengths)
    writer.close()
    return write_rest(tr, out, causal)


def write_rest(tr: AttentionTrace, out: Path, causal: bool) -> dict:
    """Tokens, spans and (last, with every table file's sha256) manifest.json of a trace whose attention is in `out`.

    Only the fields beside the patterns are read, and the patterns' shape and dtype: a streamed
    trace passes an AttentionTrace whose patterns are a zero-stride placeholder.
    """
    man = manifest(tr, causal)
    write_table(tokens_table(tr), out / "tokens" / "part-0.parquet")
    write_table(spans_table(tr), out / "spans" / "part-0.parquet")
    if getattr(tr, "norms", None) is not None:
        write_table(norms_table(tr), out / "norms" / "part-0.parquet")
    man["sha256"] = file_hashes(out)
    _io.write_json(out / "manifest.json", man)
    return man


# ------------------------------------------------------------------------------------
# reading, every field checked
# ------------------------------------------------------------------------------------
def read_manifest(path: Path) -> dict:
    """The manifest of the trace folder `path`, checked (types, ranges, layers); DataError naming what is wrong."""
    file = path / "manifest.json"
    if not file.is_file():
        raise DataError(f"{path} holds no manifest.json; pass a directory written by AttentionTrace.save or to_parquet")
    try:
        with _io.storage_errors(file, "read"):
            man = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise DataError(f"{file} is not valid JSON ({err}); write the directory again with AttentionTrace.save") from None
    if not isinstance(man, dict):
        raise DataError(f"{file} holds a JSON {type(man).__name__}, not an object; write the directory again")
    if man.get("schema_version") not in READABLE_VERSIONS or not _int(man.get("schema_version")):
        raise DataError(
            f"{path} has schema_version {man.get('schema_version')!r}; this attnflow reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}: upgrade attnflow or write the trace again"
        )
    check_manifest(man, file)
    return man


_MANIFEST_RULES = (  # key, test, what it must be
    ("dtype", lambda v: isinstance(v, str), "a dtype name"),
    ("layers", lambda v: isinstance(v, list), "a list of layer indices"),
    ("heads", lambda v: v in HEAD_MODES, f"one of {', '.join(HEAD_MODES)}"),
    ("num_heads", lambda v: _int(v) and v >= 1, "a positive integer"),
    ("batch", lambda v: _int(v) and v >= 1, "a positive integer"),
    ("causal", lambda v: isinstance(v, bool), "true or false"),
    ("pad_token_id", lambda v: _int(v), "an integer"),
    ("prompt_lengths", lambda v: isinstance(v, list) and all(_int(x) and x >= 0 for x in v), "a list of non-negative integers"),
    ("model_info", lambda v: isinstance(v, dict), "an object"),
    ("settings", lambda v: isinstance(v, dict), "an object"),
)


def check_manifest(man: dict, file: Path) -> None:
    """DataError unless `man` has every key of a trace manifest with a value of the right type and range."""
    for key, ok, what in _MANIFEST_RULES:
        if key not in man:
            raise DataError(f"{file} lacks {key!r}; the manifest is damaged: write the directory again")
        if not ok(man[key]):
            raise DataError(f"{file}: {key} is {_short(man[key])}, expected {what}; the manifest is damaged")
    man["layers"] = check_layers(man["layers"], file)
    _stored_dtype(man["dtype"], file)
    if len(man["prompt_lengths"]) != man["batch"]:
        raise DataError(f"{file}: prompt_lengths has {len(man['prompt_lengths'])} entries for batch {man['batch']}")
    if man["heads"] != "all" and man["num_heads"] != 1:
        raise DataError(f"{file}: heads {man['heads']!r} keeps one head, but num_heads is {man['num_heads']}")
    if "norm_heads" in man and not (_int(man["norm_heads"]) and man["norm_heads"] >= 1):
        raise DataError(f"{file}: norm_heads is {_short(man['norm_heads'])}, expected a positive integer; the manifest is damaged")
    hashes = man.get("sha256")
    if hashes is not None and not (
        isinstance(hashes, dict) and all(isinstance(k, str) and isinstance(v, str) and _HEX64.match(v) for k, v in hashes.items())
    ):
        raise DataError(f"{file}: sha256 is not a map of file names to sha256 hex digests; the manifest is damaged")


def read_trace(path: Path, layers: list[int] | None = None) -> dict[str, Any]:
    """The fields of the AttentionTrace saved under `path`; spans as dicts of Span's fields.

    `layers` (recorded layer indices, as the manifest names them) reads only those
    layers' tables; None reads every one.  Everything read is checked before it is
    used: the manifest, each table's columns, duplicate and missing rows, indices in
    range, finite weights in [0, 1] with row sums at most 1, and (last, so the specific
    messages come first) each file's sha256 against the manifest.
    """
    if not path.is_dir():
        raise DataError(f"no saved trace at {path}: the directory does not exist")
    man = read_manifest(path)
    tables = ("tokens", "spans", "attention")
    if layers is not None:
        asked = check_layers(list(layers) if isinstance(layers, (list, tuple)) else layers, "layers=")
        missing = [layer for layer in asked if layer not in man["layers"]]
        if missing:
            raise DataError(f"{path} holds layers {man['layers']}, not {missing}; pass recorded layers (or layers=None)")
        wanted = [layer for layer in man["layers"] if layer in asked]  # the stored order
        man = {**man, "layers": wanted}
        tables = ("tokens", "spans", *(f"attention/layer={layer}" for layer in wanted))
    B = man["batch"]
    ids, toks, text = _read_tokens(path, man)
    lengths = [len(x) for x in ids]
    S = max(lengths)
    pads = torch.tensor([S - n for n in lengths])
    input_ids = torch.full((B, S), man["pad_token_id"], dtype=torch.long)
    attention_mask = torch.zeros((B, S), dtype=torch.long)
    for b in range(B):
        input_ids[b, pads[b] :] = torch.tensor(ids[b], dtype=torch.long)
        attention_mask[b, pads[b] :] = 1
    spans = _read_spans(path, B, lengths)

    layers, dtype = man["layers"], _stored_dtype(man["dtype"], path)
    first = _read_layer(path, layers[0], man, lengths)
    query_positions = _query_positions(first, pads)
    patterns = torch.zeros((B, len(layers), man["num_heads"], query_positions.shape[1], S), dtype=STORAGE[dtype])
    for li, layer in enumerate(layers):
        t = first if li == 0 else _read_layer(path, layer, man, lengths, like=first)
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
        _check_weights(values, widths, man["heads"], path / "attention" / f"layer={layer}")
        patterns[ex, li, head, _row_index(query_positions, ex, query)] = unpack(values, pads[ex], widths, S).to(patterns.dtype)
    norms = _read_norms(path, man, lengths, S, subset=layers is not None) if "norm_heads" in man else None
    verify_hashes(path, man, tables + (() if norms is None else ("norms",)))
    return dict(
        norms=norms,
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


def _read_norms(path: Path, man: dict, lengths: list[int], S: int, subset: bool = False) -> dict[str, Tensor]:
    """The norms table as `AttentionTrace.norms` (float32, padded), checked: every (example, layer, position) once,
    `norm_heads` values per row, finite and non-negative.  `subset`: `man["layers"]` is a subset being read."""
    where = path / "norms"
    t = read_table(path, "norms")
    _check_columns(t, NORMS_SCHEMA, where)
    if subset:
        t = t.filter(pc.is_in(t["layer"], value_set=pa.array(man["layers"], type=t.schema.field("layer").type)))
    B, layers, H = man["batch"], man["layers"], man["norm_heads"]
    ex, layer, pos = _ints(t, "example", where), _ints(t, "layer", where), _ints(t, "position", where)
    if (r := _out_of_range(ex, 0, B)) is not None:
        raise DataError(f"{where} row {r} is of example {ex[r]}, outside the manifest's batch of {B}")
    slot = {l: i for i, l in enumerate(layers)}
    li = np.array([slot.get(int(l), -1) for l in layer], dtype=np.int64)
    if (r := _out_of_range(li, 0, len(layers))) is not None:
        raise DataError(f"{where} row {r} is of layer {layer[r]}, not one of the recorded layers {layers}")
    if (r := _out_of_range(pos, 0, np.asarray(lengths)[ex])) is not None:
        raise DataError(f"{where} row {r} has position {pos[r]}, outside example {ex[r]}'s {lengths[ex[r]]} tokens")
    key = (ex * len(layers) + li) * S + pos
    if len(np.unique(key)) != len(key) or len(key) != len(layers) * sum(lengths):
        raise DataError(
            f"{where} has {len(key)} rows ({len(np.unique(key))} distinct) for {len(layers)} layers x {sum(lengths)} "
            "positions; a row is duplicated or missing: write the directory again"
        )
    values, widths = list_values(t["value"])
    if not bool((widths == H).all()):
        raise DataError(f"{where} holds value norms of {sorted(set(widths.tolist()))} heads per row; the manifest says {H}")
    attn = torch.from_numpy(t["attn"].to_numpy(zero_copy_only=False).astype(np.float32))
    residual = torch.from_numpy(t["residual"].to_numpy(zero_copy_only=False).astype(np.float32))
    for name, v in (("value", values), ("attn", attn), ("residual", residual)):
        if len(v) and not (torch.isfinite(v).all() and (v >= 0).all()):
            raise DataError(f"{where} column {name!r} holds NaN, inf or negative norms; the file is damaged")
    pads = torch.tensor([S - n for n in lengths])
    e, l = torch.from_numpy(ex), torch.from_numpy(li)
    col = torch.from_numpy(pos) + pads[e]
    out = {"value": torch.zeros((B, len(layers), H, S)), "attn": torch.zeros((B, len(layers), S)),
           "residual": torch.zeros((B, len(layers), S))}
    out["value"].permute(0, 1, 3, 2)[e, l, col] = values.float().view(-1, H)
    out["attn"][e, l, col] = attn
    out["residual"][e, l, col] = residual
    return out


def _check_columns(t: pa.Table, schema: pa.Schema, where: Path) -> None:
    for f in schema:
        if f.name not in t.column_names:
            raise DataError(f"{where} lacks column {f.name!r}; the file is damaged: write the directory again")
        if t.schema.field(f.name).type != f.type:
            raise DataError(f"{where} column {f.name!r} has type {t.schema.field(f.name).type}, expected {f.type}")


def _ints(t: pa.Table, name: str, where: Path) -> np.ndarray:
    col = t[name]
    if col.null_count:
        raise DataError(f"{where} column {name!r} has {col.null_count} empty (null) values; the file is damaged")
    return col.to_numpy().astype(np.int64)


def _out_of_range(values: np.ndarray, low, high) -> int | None:
    """Index of the first value outside [low, high) (bounds may be arrays), else None."""
    bad = np.flatnonzero((values < low) | (values >= high))
    return int(bad[0]) if len(bad) else None


def _read_tokens(path: Path, man: dict) -> tuple[list[list[int]], list[list[str]], list[list[str]] | None]:
    """(ids, raw tokens, display text or None) per example; v1 tables and traces recorded without text give None."""
    B, where = man["batch"], path / "tokens"
    t = read_table(path, "tokens")
    v2 = man["schema_version"] >= 2
    _check_columns(t, TOKENS_SCHEMA if v2 else TOKENS_SCHEMA.remove(TOKENS_SCHEMA.get_field_index("text")), where)
    ex, pos, tid = _ints(t, "example", where), _ints(t, "position", where), _ints(t, "token_id", where)
    if (r := _out_of_range(ex, 0, B)) is not None:
        raise DataError(f"{where} row {r} is of example {ex[r]}, outside the manifest's batch of {B}")
    if (r := _out_of_range(tid, 0, 2**62)) is not None:
        raise DataError(f"{where} row {r} has token_id {tid[r]}; token ids are non-negative")
    order = np.lexsort((pos, ex))
    ex, pos = ex[order], pos[order]
    counts = np.bincount(ex, minlength=B)
    if (counts == 0).any():
        raise DataError(f"{where} holds no tokens of example {int(np.argmin(counts))} (batch {B}); the file is damaged")
    expect = np.arange(len(ex)) - (np.cumsum(counts) - counts)[ex]
    if (r := _out_of_range(pos - expect, 0, 1)) is not None:
        e, p = int(ex[r]), int(pos[r])
        what = f"position {p} twice" if r and ex[r - 1] == e and pos[r - 1] == p else f"position {p} where {int(expect[r])} belongs"
        raise DataError(f"{where} holds example {e}'s {what}; a row is duplicated or missing: write the directory again")
    plen = np.asarray(man["prompt_lengths"], dtype=np.int64)
    if (b := _out_of_range(plen, 1, counts + 1)) is not None:
        raise DataError(f"{path / 'manifest.json'}: prompt_lengths[{b}] is {plen[b]}, but example {b} has {counts[b]} tokens")
    role = np.asarray(t["role"].to_pylist(), dtype=object)[order]
    if (role != np.where(pos < plen[ex], "prompt", "completion")).any():
        raise DataError(f"{where} roles disagree with the manifest's prompt_lengths; the file is damaged")
    tok = t["token"].to_pylist()
    if None in tok:
        raise DataError(f"{where} column 'token' has empty (null) values; the file is damaged")
    texts = t["text"].to_pylist() if v2 else [None] * len(tok)
    ids, toks, text = ([[] for _ in range(B)] for _ in range(3))
    tid = tid[order]
    for i, r in enumerate(order.tolist()):
        b = int(ex[i])
        ids[b].append(int(tid[i]))
        toks[b].append(tok[r])
        text[b].append(texts[r])
    has_text = any(d is not None for per in text for d in per)
    return ids, toks, text if has_text else None


def _read_spans(path: Path, batch: int, lengths: list[int]) -> list[list[dict]]:
    from attnflow.attention_trace import SPAN_KINDS  # loaded by now: the data model imports this module

    where = path / "spans"
    t = read_table(path, "spans")
    _check_columns(t, SPANS_SCHEMA, where)
    for name in ("example", "span_id", "start", "end"):
        _ints(t, name, where)
    spans = [[] for _ in range(batch)]
    for r in sorted(t.to_pylist(), key=lambda r: (r["example"], r["span_id"])):
        b = r.pop("example")
        if not 0 <= b < batch:
            raise DataError(f"{where} holds a span of example {b}, outside the manifest's batch of {batch}")
        if r.pop("span_id") != len(spans[b]):
            raise DataError(f"{where} span ids of example {b} are not 0, 1, 2, ... (one is duplicated or missing)")
        if r["name"] is None or not 0 <= r["start"] <= r["end"] <= lengths[b]:
            raise DataError(
                f"{where} span {r['name']!r} of example {b} covers {r['start']}..{r['end']}, outside its {lengths[b]} tokens"
            )
        if r["kind"] not in SPAN_KINDS:
            raise DataError(f"{where} span {r['name']!r} of example {b} has kind {r['kind']!r}; kinds are {', '.join(SPAN_KINDS)}")
        spans[b].append(r)
    return spans


def _read_layer(path: Path, layer: int, man: dict, lengths: list[int], like: pa.Table | None = None) -> pa.Table:
    """One layer's table, checked: columns, example/head/query in range, every (example, head, query) once."""
    where = path / "attention" / f"layer={layer}"
    t = read_table(path / "attention", f"layer={layer}")
    _check_columns(t, attention_schema(_stored_dtype(man["dtype"], path)), where)
    B, H = man["batch"], man["num_heads"]
    ex, head, q = _ints(t, "example", where), _ints(t, "head", where), _ints(t, "query", where)
    if (r := _out_of_range(ex, 0, B)) is not None:
        raise DataError(f"{where} row {r} is of example {ex[r]}, outside the manifest's batch of {B}")
    if (r := _out_of_range(q, 0, np.asarray(lengths)[ex])) is not None:
        raise DataError(f"{where} row {r} has query {q[r]}, outside example {ex[r]}'s {lengths[ex[r]]} tokens")
    low, high = (0, H) if man["heads"] == "all" else (-1, 0)
    if (r := _out_of_range(head, low, high)) is not None:
        raise DataError(f"{where} row {r} has head {head[r]}; heads {man['heads']!r} with num_heads {H} stores {low}..{high - 1}")
    S = max(lengths)
    key = (ex * H + (head - low)) * S + q
    uniq, counts = np.unique(key, return_counts=True)
    if (counts > 1).any():
        k = int(uniq[np.argmax(counts > 1)])
        raise DataError(f"{where} holds (example {k // S // H}, head {k // S % H + low}, query {k % S}) twice; a row is duplicated")
    pairs = np.unique(ex * S + q)
    if len(t) != H * len(pairs):
        raise DataError(f"{where} has {len(t)} rows for {len(pairs)} query rows x {H} heads; rows are missing (or num_heads is wrong)")
    if like is not None and not np.array_equal(pairs, np.unique(_ints(like, "example", where) * S + _ints(like, "query", where))):
        raise DataError(f"{where} records other query rows than layer={man['layers'][0]}; the file is damaged")
    rows = man.get("query_rows")
    if rows is not None and list(np.bincount(pairs // S, minlength=B)) != rows:
        raise DataError(f"{where} rows per example disagree with the manifest's query_rows {_short(rows)}")
    return t


def _check_weights(values: Tensor, widths: Tensor, heads: str, where: Path) -> None:
    """Finite, in [0, 1], and (unless heads="max") each row's sum at most 1: softmax rows, sinks may take some."""
    if len(values) == 0:
        return
    v = values.numpy()
    lo, hi = float(v.min()), float(v.max())  # NaN propagates: no copy needed to find it
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise DataError(f"{where} holds NaN or inf weights; the file is damaged: write the directory again")
    if lo < -WEIGHT_TOL or hi > 1 + WEIGHT_TOL:
        raise DataError(f"{where} holds weights from {lo:.4g} to {hi:.4g}; attention weights lie in [0, 1]")
    if heads != "max":
        starts = (torch.cumsum(widths, 0) - widths).numpy()
        sums = np.add.reduceat(v, starts, dtype=np.float64)
        r = int(np.argmax(sums))
        if sums[r] > 1 + WEIGHT_TOL:
            raise DataError(f"{where} row {r} sums to {sums[r]:.4g}; attention rows sum to at most 1")


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
# content hashes
# ------------------------------------------------------------------------------------
def _sha256(file: Path) -> str:
    with _io.storage_errors(file, "read"), open(file, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _table_files(path: Path, name: str) -> set[str]:
    """Files pyarrow reads as table `name` (it skips names starting with '.' or '_'), relative to `path`."""
    files = set()
    for f in (path / name).rglob("*"):
        rel = f.relative_to(path)
        if f.is_file() and not any(part[0] in "._" for part in rel.parts):
            files.add(rel.as_posix())
    return files


def file_hashes(root: Path) -> dict[str, str]:
    """{path relative to `root`: sha256 hex} of every Parquet file under `root`, as the manifest records them."""
    return {f.relative_to(root).as_posix(): _sha256(f) for f in sorted(root.rglob("*.parquet"))}


def verify_hashes(path: Path, man: dict, tables: tuple[str, ...]) -> None:
    """DataError unless the files of `tables` under `path` are exactly those the manifest hashed, unchanged.

    Traces written before hashes (no "sha256", or schema v1) have nothing to check.
    """
    hashes = man.get("sha256")
    if hashes is None or man["schema_version"] < 2:
        return
    for name in tables:
        found = _table_files(path, name)
        listed = {k for k in hashes if k.startswith(name + "/")}
        for rel in sorted(found - listed):
            raise DataError(f"{path / rel} is not one of the files manifest.json lists; remove it or write the directory again")
        for rel in sorted(listed - found):
            raise DataError(f"{path / rel} is missing (manifest.json lists it); write the directory again")
        for rel in sorted(found):
            if _sha256(path / rel) != hashes[rel]:
                raise DataError(f"{path / rel} does not match its sha256 in manifest.json; the file was changed or damaged")

# ------------------------------------------------------------------------------------
# flow and attributions
# ------------------------------------------------------------------------------------
def flow_rows(trace: AttentionTrace, method: str, value) -> tuple[Float[Tensor, "batch rows key"], Int[Tensor, "batch rows"], bool]:
    """Validate one `flow=` entry: (rows float32 on cpu, their padded query positions, causal).

    `value` is a Tensor [batch, query, key] whose rows are `trace.query_positions`, or a
    tuple (Tensor [batch, rows, key], query positions [batch, rows]) with -1 for no row.
    """
    B, S = trace.input_ids.shape
    F, qpos = value if isinstance(value, tuple) and len(value) == 2 else (value, trace.query_positions)
    if not isinstance(F, Tensor):
        raise BadArgumentError(
            f"flow[{method!r}] is a {type(F).__name__}; pass a Tensor [batch, query, key] or (Tensor, query positions)"
        )
    if F.ndim != 3 or F.shape[0] != B or F.shape[2] != S:
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
    if not isinstance(flow, dict) or not all(isinstance(m, str) for m in flow):
        raise BadArgumentError(f"flow is a {type(flow).__name__}; pass a dict method name -> Tensor [batch, query, key]")
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
            raise BadArgumentError(
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
    except (pa.ArrowException, OSError) as err:
        raise _io.read_failure(err, where, f"{where} cannot be read as Parquet ({err}); write the directory again") from None
