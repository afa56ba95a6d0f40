"""Parquet export: the trace's tables plus composed flow and document attributions.

`to_parquet` writes the core tables with `attnflow.attention_trace.write_tables` (the one
codec `AttentionTrace.load` reads) and adds two optional tables:

    flow/part-0.parquet           example int32, method string, query int32, weights list<float32>
    attributions/part-0.parquet   example int32, method string, target int32, source_span int32,
                                  score float32, rank int32

Positions are unpadded (0 = an example's first real token).  A flow row's
weights run over keys 0..query when the flow is causal, else over every key.
The full schema is in src/attnflow/exporters/SCHEMA.md.

    >>> R = af.flow.rollout(tr.patterns)                     # [batch, query, key], rows = tr.query_positions
    >>> scores = af.attribute(tr, method="rollout", sources="spans")
    >>> to_parquet(tr, "run/", flow={"rollout": R}, attributions=scores)
    >>> read_flow("run/").to_pandas().head()
       example   method  query                weights
    0        0  rollout      0                  [1.0]
    >>> af.AttentionTrace.load("run/")                        # the trace itself, unchanged
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from jaxtyping import Float, Int
from torch import Tensor

from attnflow import _io
from attnflow.attribution import attribution_schema
from attnflow.errors import DataError, ShapeError
from attnflow.attention_trace import AttentionTrace, read_manifest, write_tables

FLOW_SCHEMA = pa.schema(
    [
        ("example", pa.int32()),
        ("method", pa.string()),
        ("query", pa.int32()),
        ("weights", pa.list_(pa.float32())),
    ]
)

FlowArg = Mapping[str, "Tensor | tuple[Tensor, Tensor]"]


def to_parquet(
    trace: AttentionTrace,
    path: str | Path,
    flow: FlowArg | None = None,
    attributions: Any = None,
) -> Path:
    """Write `trace` (and optional flow / attributions) as a Parquet dataset under `path`, replaced whole.

    `flow` maps a method name to a Tensor [batch, query, key] in the trace's padded
    coordinates whose rows are `trace.query_positions`, or to a tuple
    (Tensor [batch, rows, key], query positions Int[batch, rows]) for target rows
    (-1 = no row).  `attributions` is the table `attnflow.attribute` returns
    (pyarrow Table or pandas DataFrame).

    >>> to_parquet(tr, "run/", flow={"flow": af.flow.residual_flow(tr.patterns, normalize=True)})
    PosixPath('run')
    """
    path = Path(path)
    flow_tab = flow_table(trace, flow) if flow else None
    attr_tab = attribution_table(attributions) if attributions is not None else None
    with _io.atomic_dir(path) as tmp:
        write_tables(trace, tmp)
        tables = {"tokens": "tokens", "spans": "spans", "attention": "attention"}
        if flow_tab is not None:
            _write(flow_tab, tmp / "flow" / "part-0.parquet")
            tables["flow"] = "flow"
        if attr_tab is not None:
            _write(attr_tab, tmp / "attributions" / "part-0.parquet")
            tables["attributions"] = "attributions"
        man = read_manifest(tmp)
        man.update(recording_info(trace, flow_tab, attr_tab, tables))
        _io.write_json(tmp / "manifest.json", man)
    return path


def recording_info(trace: AttentionTrace, flow_tab, attr_tab, tables: dict) -> dict:
    """Manifest entries beyond the core ones: which tables exist and how rows were recorded."""
    qpos = trace.query_positions
    n_rows = (qpos >= 0).sum(-1).tolist()
    return {
        "tables": tables,
        "lengths": trace.lengths,
        "query_rows": n_rows,
        "all_rows": n_rows == trace.lengths,
        "flow_methods": sorted(set(flow_tab["method"].to_pylist())) if flow_tab is not None else [],
        "attribution_methods": sorted(set(attr_tab["method"].to_pylist())) if attr_tab is not None else [],
    }


def flow_table(trace: AttentionTrace, flow: FlowArg) -> pa.Table:
    """One row per (method, example, recorded query row), weights over unpadded keys."""
    parts = [_flow_rows(trace, method, value) for method, value in flow.items()]
    return pa.concat_tables(parts) if parts else FLOW_SCHEMA.empty_table()


def _flow_rows(trace: AttentionTrace, method: str, value) -> pa.Table:
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
    F = F.detach().float().cpu()
    pads = torch.tensor(trace.pad_offsets).view(B, 1, 1)
    lengths = torch.tensor(trace.lengths).view(B, 1, 1)
    keys = torch.arange(S).view(1, 1, S)
    bad = (qpos >= 0) & ((qpos < pads[..., 0]) | (qpos >= S))
    if bad.any():
        b, r = (int(i) for i in torch.nonzero(bad)[0])
        raise DataError(
            f"flow[{method!r}] row {r} of example {b} has query position {int(qpos[b, r])}, outside the example's "
            f"padded positions {trace.pad_offsets[b]}..{S - 1}; give padded positions, -1 for no row"
        )
    real_row = (qpos >= 0).unsqueeze(-1)  # [batch, rows, 1]
    real_key = keys >= pads  # [batch, 1, key]
    causal = not bool((F.abs() * (keys > qpos.unsqueeze(-1)) * real_row).any())
    width = (qpos - pads[..., 0] + 1) if causal else lengths[..., 0].expand_as(qpos)  # [batch, rows]
    take = real_row & real_key & (keys < pads + width.unsqueeze(-1))  # [batch, rows, key], row prefixes
    values = F[take]  # row-major: example, row, key
    widths = width[qpos >= 0]
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(widths, 0)])
    ex, _ = torch.nonzero(qpos >= 0, as_tuple=True)
    return pa.table(
        {
            "example": pa.array(ex.numpy().astype("int32")),
            "method": pa.array([method] * len(ex), pa.string()),
            "query": pa.array((qpos[qpos >= 0] - pads.view(B, 1).expand_as(qpos)[qpos >= 0]).numpy().astype("int32")),
            "weights": pa.ListArray.from_arrays(pa.array(offsets.numpy().astype("int32")), pa.array(values.numpy())),
        },
        schema=FLOW_SCHEMA,
    )


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
        raise DataError(
            f"attributions lacks column(s) {', '.join(missing)}; it needs {', '.join(schema.names)}"
        )
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


def read_flow(path: str | Path) -> pa.Table:
    """The flow table written by `to_parquet` (example, method, query, weights)."""
    return _read(Path(path), "flow", "pass flow= to to_parquet")


def read_attributions(path: str | Path) -> pa.Table:
    """The attributions table written by `to_parquet` (example, method, target, source_span, score, rank)."""
    return _read(Path(path), "attributions", "pass attributions= to to_parquet")


def flow_tensor(table: pa.Table, trace: AttentionTrace, method: str) -> tuple[Float[Tensor, "batch rows key"], Int[Tensor, "batch rows"]]:
    """Rebuild (flow [batch, rows, key], query positions [batch, rows]) in `trace`'s padded coordinates.

    Rows are right-aligned like `trace.query_positions`; -1 marks a missing row.
    """
    t = table.filter(pc.equal(table["method"], method))
    if t.num_rows == 0:
        raise DataError(f"the flow table has no method {method!r}; it has {sorted(set(table['method'].to_pylist()))}")
    B, S = trace.input_ids.shape
    ex = torch.tensor(t["example"].to_numpy()).long()
    q = torch.tensor(t["query"].to_numpy()).long()
    order = torch.argsort(ex * S + q)
    ex, q = ex[order], q[order]
    w = t["weights"].combine_chunks().take(pa.array(order.numpy()))
    counts = torch.bincount(ex, minlength=B)
    R = int(counts.max())
    slot = torch.arange(len(ex)) - (torch.cumsum(counts, 0) - counts)[ex] + (R - counts)[ex]  # right-aligned
    pads = torch.tensor(trace.pad_offsets)
    qpos = torch.full((B, R), -1, dtype=torch.long)
    qpos[ex, slot] = q + pads[ex]
    flat = torch.tensor(w.flatten().to_numpy(zero_copy_only=False))
    widths = torch.from_numpy(pc.list_value_length(w).to_numpy().astype("int64"))
    row = torch.repeat_interleave(torch.arange(len(widths)), widths)
    key = torch.arange(len(flat)) - (torch.cumsum(widths, 0) - widths)[row] + pads[ex][row]
    F = torch.zeros((B, R, S), dtype=torch.float32)
    F[ex[row], slot[row], key] = flat
    return F, qpos


def _read(path: Path, name: str, hint: str) -> pa.Table:
    read_manifest(path)
    if not (path / name).is_dir():
        raise DataError(f"{path} holds no {name} table; {hint}")
    return pq.read_table(path / name)


def _write(table: pa.Table, path: Path) -> None:
    with _io.atomic_path(path) as tmp:
        pq.write_table(table, tmp)
