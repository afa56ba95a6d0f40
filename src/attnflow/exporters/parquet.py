"""Parquet export: the trace's tables plus composed flow and document attributions.

`to_parquet` writes the core tables with `attnflow.codec` (the one codec `AttentionTrace.load`
reads) and adds two optional tables:

    flow/part-0.parquet           example int32, method string, query int32, weights list<float32>
    attributions/part-0.parquet   example int32, method string, target int32, source_span int32,
                                  score float32, rank int32

Positions are unpadded (0 = an example's first real token).  A flow row's
weights run over keys 0..query when the flow is causal, else over every key.
The full schema is in src/attnflow/exporters/SCHEMA.md.

    >>> R = af.flow.rollout(tr.patterns)                     # [batch, query, key], rows = tr.query_positions
    >>> scores = af.attribute(tr, method="rollout", sources="spans")
    >>> to_parquet(tr, "run/", flow={"rollout": R}, attributions=scores)
    PosixPath('run')
    >>> read_flow("run/").to_pandas().head(3)
       example   method  query                         weights
    0        0  rollout      0                           [1.0]
    1        0  rollout      1            [0.678523, 0.321477]
    2        0  rollout      2  [0.608995, 0.167034, 0.223971]
    >>> cols = ["example", "method", "target", "source_span", "score", "rank"]
    >>> read_attributions("run/").to_pandas()[cols]           # one row per document span
       example   method  target  source_span     score  rank
    0        0  rollout      -1            0  0.304806     1
    1        0  rollout      -1            1  0.117718     2
    >>> af.AttentionTrace.load("run/").patterns.equal(tr.patterns)   # the trace itself, unchanged
    True
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from attnflow import _checks, _io
from attnflow.attention_trace import AttentionTrace
from attnflow.codec import (  # noqa: F401  (flow_tensor stays importable from here)
    FlowArg,
    attribution_table,
    file_hashes,
    flow_table,
    flow_tensor,
    read_manifest,
    read_table,
    verify_hashes,
    write_table,
    write_trace,
)


def to_parquet(
    trace: AttentionTrace,
    path: str | Path,
    flow: FlowArg | None = None,
    attributions: Any = None,
    overwrite: bool = False,
) -> Path:
    """Write `trace` (and optional flow / attributions) as a Parquet dataset in the new folder `path`.

    An existing folder is replaced (whole) only if `to_parquet` wrote it and `overwrite=True`;
    a file, or a folder of anything else, is never touched (DataError).

    `flow` maps a method name to a Tensor [batch, query, key] in the trace's padded
    coordinates whose rows are `trace.query_positions`, or to a tuple
    (Tensor [batch, rows, key], query positions Int[batch, rows]) for target rows
    (-1 = no row).  `attributions` is the table `attnflow.attribute` returns
    (pyarrow Table or pandas DataFrame).

    >>> to_parquet(tr, "run/", flow={"flow": af.flow.residual_flow(tr.patterns, normalize=True)})
    PosixPath('run')
    """
    _checks.instance("trace", trace, AttentionTrace, "an attnflow.AttentionTrace (af.trace or AttentionTrace.load)")
    path = _checks.path("path", path)
    flow_tab = flow_table(trace, flow) if flow else None
    attr_tab = attribution_table(attributions) if attributions is not None else None
    with _io.output_dir(path, "parquet", overwrite=overwrite) as tmp:
        man = write_trace(trace, tmp)
        tables = {"tokens": "tokens", "spans": "spans", "attention": "attention"}
        if trace.norms is not None:
            tables["norms"] = "norms"
        for name, tab in (("flow", flow_tab), ("attributions", attr_tab)):
            if tab is not None:
                write_table(tab, tmp / name / "part-0.parquet")
                tables[name] = name
        man.update(recording_info(trace, flow_tab, attr_tab, tables), kind="parquet")
        man["sha256"] = file_hashes(tmp)
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


def read_flow(path: str | Path) -> pa.Table:
    """The flow table written by `to_parquet` (example, method, query, weights)."""
    return _read(Path(path), "flow", "pass flow= to to_parquet")


def read_attributions(path: str | Path) -> pa.Table:
    """The attributions table written by `to_parquet` (example, method, target, source_span, score, rank)."""
    return _read(Path(path), "attributions", "pass attributions= to to_parquet")


def _read(path: Path, name: str, hint: str) -> pa.Table:
    man = read_manifest(path)
    table = read_table(path, name, hint)
    verify_hashes(path, man, (name,))
    return table
