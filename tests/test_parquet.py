"""Parquet export: trace -> parquet -> trace round trips, flow / attribution tables, DuckDB queries."""

from __future__ import annotations

import json

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pytest
import torch

from attnflow.errors import BadArgumentError, DataError, ShapeError
from attnflow.exporters import flow_tensor, read_attributions, read_flow, to_parquet
from attnflow.attention_trace import AttentionTrace, Span


def make_trace(lengths, layers=(0, 1), heads=3, dtype=torch.float32, rows=None, reduced=None, seed=0):
    """A left-padded trace with random causal rows; `rows[b]` lists the unpadded query rows kept."""
    g = torch.Generator().manual_seed(seed)
    B, S, L = len(lengths), max(lengths), len(layers)
    H = 1 if reduced else heads
    rows = rows or [list(range(n)) for n in lengths]
    Q = max(len(r) for r in rows)
    qpos = torch.full((B, Q), -1, dtype=torch.long)
    patterns = torch.zeros(B, L, H, Q, S, dtype=torch.float64)
    mask = torch.zeros(B, S, dtype=torch.long)
    ids = torch.zeros(B, S, dtype=torch.long)
    for b, n in enumerate(lengths):
        pad = S - n
        mask[b, pad:] = 1
        ids[b, pad:] = torch.randint(1, 1000, (n,), generator=g)
        for j, r in enumerate(rows[b]):
            slot = Q - len(rows[b]) + j
            qpos[b, slot] = pad + r
            logits = torch.randn(L, H, r + 1, generator=g, dtype=torch.float64) * 3
            patterns[b, :, :, slot, pad : pad + r + 1] = logits.softmax(-1)
    tokens = [[f"t{b}_{p}" for p in range(n)] for b, n in enumerate(lengths)]
    spans = [[Span("doc A", "document", 0, min(2, n), 0, 7), Span("question", "question", 1, n)] for n in lengths]
    spans[-1] = []
    return AttentionTrace(
        patterns=patterns.to(dtype),
        input_ids=ids,
        attention_mask=mask,
        query_positions=qpos,
        tokens=tokens,
        prompt_lengths=[max(1, n - 2) for n in lengths],
        layers=list(layers),
        heads=reduced or "all",
        spans=spans,
        model_info={"name": "toy", "num_layers": 4, "num_heads": heads},
        settings={"rows": "all" if rows is None else "subset", "dtype": str(dtype), "max_new_tokens": 2},
    )


def assert_same(a: AttentionTrace, b: AttentionTrace):
    assert a.patterns.dtype == b.patterns.dtype
    assert a.patterns.shape == b.patterns.shape
    assert torch.equal(a.patterns, b.patterns)
    assert torch.equal(a.input_ids, b.input_ids)
    assert torch.equal(a.attention_mask, b.attention_mask)
    assert torch.equal(a.query_positions, b.query_positions)
    assert a.tokens == b.tokens and a.prompt_lengths == b.prompt_lengths
    assert a.layers == b.layers and a.heads == b.heads
    assert a.spans == b.spans
    assert a.model_info == b.model_info and a.settings == b.settings
    assert (a.norms is None) == (b.norms is None)
    if a.norms is not None:
        assert a.norms.keys() == b.norms.keys() and all(torch.equal(a.norms[k], b.norms[k]) for k in a.norms)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
def test_round_trip_dtypes(tmp_path, dtype):
    tr = make_trace([5, 3, 7], dtype=dtype)
    to_parquet(tr, tmp_path / "run")
    back = AttentionTrace.load(tmp_path / "run")
    assert_same(tr, back)


def test_round_trip_row_subsets_and_layer_subset(tmp_path):
    tr = make_trace([6, 4], layers=(1, 3), rows=[[1, 3, 5], [3]])
    to_parquet(tr, tmp_path / "run")
    back = AttentionTrace.load(tmp_path / "run")
    assert_same(tr, back)
    assert back.query_positions.tolist() == [[1, 3, 5], [-1, -1, 5]]


@pytest.mark.parametrize("reduced", ["mean", "max"])
def test_round_trip_reduced_heads(tmp_path, reduced):
    tr = make_trace([4, 6], reduced=reduced, dtype=torch.float16)
    to_parquet(tr, tmp_path / "run")
    back = AttentionTrace.load(tmp_path / "run")
    assert_same(tr, back)
    heads = ds.dataset(tmp_path / "run" / "attention", format="parquet", partitioning="hive").to_table(columns=["head"])
    assert set(heads["head"].to_pylist()) == {-1}


def test_tables_read_with_pyarrow_dataset(tmp_path):
    tr = make_trace([5, 3], layers=(0, 2), heads=2)
    to_parquet(tr, tmp_path / "run")
    att = ds.dataset(tmp_path / "run" / "attention", format="parquet", partitioning="hive").to_table()
    assert set(att["layer"].to_pylist()) == {0, 2}
    assert att.schema.field("weights").type == pa.list_(pa.float32())
    assert att.schema.field("head").type == pa.int16()
    # causal rows store keys 0..query of the unpadded example
    lens = pa.compute.list_value_length(att["weights"]).to_pylist()
    assert lens == [q + 1 for q in att["query"].to_pylist()]
    assert att.num_rows == 2 * 2 * (5 + 3)
    tok = ds.dataset(tmp_path / "run" / "tokens", format="parquet").to_table().to_pylist()
    first = [r for r in tok if r["example"] == 0]
    assert [r["token"] for r in first] == tr.tokens[0]
    assert [r["role"] for r in first] == ["prompt"] * 3 + ["completion"] * 2
    assert [r["span"] for r in first] == [0, 0, 1, 1, 1]
    assert [r["span"] for r in tok if r["example"] == 1] == [None] * 3
    sp = ds.dataset(tmp_path / "run" / "spans", format="parquet").to_table().to_pylist()
    assert sp[0] == {
        "example": 0, "span_id": 0, "name": "doc A", "kind": "document",
        "start": 0, "end": 2, "char_start": 0, "char_end": 7,
    }
    man = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert man["schema_version"] == 2 and man["settings"]["max_new_tokens"] == 2
    assert man["model_info"]["name"] == "toy" and man["causal"] is True
    assert man["query_rows"] == [5, 3] and man["all_rows"] is True
    assert set(man["tables"]) == {"tokens", "spans", "attention"}


def test_duckdb_top_attended_key(tmp_path):
    tr = make_trace([6, 4, 5], layers=(0, 1, 2), heads=2, seed=3)
    to_parquet(tr, tmp_path / "run")
    glob = str(tmp_path / "run" / "attention" / "*" / "*.parquet")
    got = duckdb.sql(
        f"""
        SELECT example, layer, head, query, list_position(weights, list_max(weights)) - 1 AS top
        FROM read_parquet('{glob}', hive_partitioning = true)
        ORDER BY example, layer, head, query
        """
    ).fetchall()
    expected = []
    for b in range(tr.batch_size):
        P, q = tr.example_patterns(b)  # [layer, head, query, key]
        for li, layer in enumerate(tr.layers):
            for h in range(P.shape[1]):
                for j, qq in enumerate(q.tolist()):
                    expected.append((b, layer, h, qq, int(P[li, h, j].argmax())))
    assert got == expected
    # the same query through a pyarrow dataset registered in DuckDB
    attention = ds.dataset(tmp_path / "run" / "attention", format="parquet", partitioning="hive")  # noqa: F841
    n = duckdb.sql("SELECT count(*) FROM attention WHERE layer = 1 AND len(weights) = query + 1").fetchall()[0][0]
    assert n == 2 * (6 + 4 + 5)


def test_flow_table_full_and_target_rows(tmp_path):
    tr = make_trace([5, 3], heads=2)
    A = tr.patterns.float().mean(2)  # [batch, layer, query, key]
    F = 0.5 * A[:, 0] + 0.5 * A[:, 1]  # any causal row-stochastic [batch, query, key]
    T = F[:, -2:]  # target rows: the last two
    T_pos = tr.query_positions[:, -2:].clone()
    T_pos[1, 0] = -1  # example 1 lacks one row
    T[1, 0] = 0
    to_parquet(tr, tmp_path / "run", flow={"raw": F, "last2": (T, T_pos)})
    tab = read_flow(tmp_path / "run")
    assert tab.schema.field("weights").type == pa.list_(pa.float32())
    raw = tab.filter(pa.compute.equal(tab["method"], "raw"))
    assert raw.num_rows == 5 + 3
    assert pa.compute.list_value_length(raw["weights"]).to_pylist() == [q + 1 for q in raw["query"].to_pylist()]
    back, q = flow_tensor(tab, tr, "raw")
    assert torch.equal(q, tr.query_positions) and torch.equal(back, F)
    back, q = flow_tensor(tab, tr, "last2")
    assert torch.equal(q, T_pos) and torch.equal(back, T)
    last = tab.filter(pa.compute.equal(tab["method"], "last2")).to_pylist()
    assert [(r["example"], r["query"]) for r in last] == [(0, 3), (0, 4), (1, 2)]
    assert last[2]["weights"] == pytest.approx(F[1, -1, 2:].tolist())  # unpadded: pad of example 1 is 2
    man = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert man["flow_methods"] == ["last2", "raw"] and "flow" in man["tables"]
    assert_same(tr, AttentionTrace.load(tmp_path / "run"))


def test_non_causal_flow_keeps_every_key(tmp_path):
    tr = make_trace([4, 2], heads=1)
    F = torch.rand(2, 4, 4)
    F[1, :, :2] = 0
    to_parquet(tr, tmp_path / "run", flow={"dense": F})
    tab = read_flow(tmp_path / "run")
    assert pa.compute.list_value_length(tab["weights"]).to_pylist() == [4] * 4 + [2] * 2
    back, _ = flow_tensor(tab, tr, "dense")
    F[1, :2] = 0  # pad rows are not stored
    assert torch.equal(back, F)


def test_flow_bad_shapes(tmp_path):
    tr = make_trace([4, 2], heads=1)
    with pytest.raises(ShapeError, match=r"expected \(batch=2, query, key=4\)"):
        to_parquet(tr, tmp_path / "run", flow={"x": torch.zeros(2, 4, 3)})
    with pytest.raises(ShapeError, match="query positions"):
        to_parquet(tr, tmp_path / "run", flow={"x": (torch.zeros(2, 1, 4), torch.zeros(2, 2))})
    with pytest.raises(DataError, match="row 0 of example 1 has query position 1, outside"):
        to_parquet(tr, tmp_path / "run", flow={"x": (torch.zeros(2, 1, 4), torch.tensor([[3], [1]]))})
    with pytest.raises(DataError, match="NaN"):
        to_parquet(tr, tmp_path / "run", flow={"x": torch.full((2, 4, 4), float("nan"))})
    assert not (tmp_path / "run").exists()


def attribution_rows():
    return {
        "example": [0, 0, 1],
        "method": ["flow", "flow", "flow"],
        "target": [4, 4, 2],
        "source_span": [1, 0, 0],
        "score": [0.75, 0.25, 1.0],
        "rank": [1, 2, 1],
        "source_name": ["question", "doc A", "doc A"],
    }


@pytest.mark.parametrize("kind", ["arrow", "pandas"])
def test_attributions_table(tmp_path, kind):
    tr = make_trace([5, 3])
    rows = attribution_rows()
    scores = pd.DataFrame(rows) if kind == "pandas" else pa.table(rows)
    to_parquet(tr, tmp_path / "run", attributions=scores)
    tab = read_attributions(tmp_path / "run")
    assert tab.column_names[:6] == ["example", "method", "target", "source_span", "score", "rank"]
    assert tab.schema.field("score").type == pa.float32() and tab.schema.field("rank").type == pa.int32()
    assert tab["source_name"].to_pylist() == rows["source_name"]
    assert tab["score"].to_pylist() == rows["score"]
    top = duckdb.sql("SELECT example, source_span FROM tab WHERE rank = 1 ORDER BY example").fetchall()
    assert top == [(0, 1), (1, 0)]


def test_token_level_attributions(tmp_path):
    tr = make_trace([5, 3])
    rows = attribution_rows()
    rows["source_token"] = rows.pop("source_span")
    to_parquet(tr, tmp_path / "run", attributions=pa.table(rows))
    tab = read_attributions(tmp_path / "run")
    assert tab.column_names[:6] == ["example", "method", "target", "source_token", "score", "rank"]
    assert tab.schema.field("source_token").type == pa.int32()


def test_bad_attributions_leave_existing_output(tmp_path):
    tr = make_trace([5, 3])
    to_parquet(tr, tmp_path / "run")
    rows = attribution_rows()
    del rows["rank"]
    with pytest.raises(DataError, match="lacks column.*rank"):
        to_parquet(tr, tmp_path / "run", attributions=pa.table(rows))
    with pytest.raises(BadArgumentError, match="pyarrow Table or pandas DataFrame"):
        to_parquet(tr, tmp_path / "run", attributions=[1, 2])
    rows = attribution_rows()
    rows["score"] = ["high", "low", "mid"]
    with pytest.raises(DataError, match="'score' cannot be read as float"):
        to_parquet(tr, tmp_path / "run", attributions=pa.table(rows))
    assert_same(tr, AttentionTrace.load(tmp_path / "run"))
    with pytest.raises(DataError, match="no flow table"):
        read_flow(tmp_path / "run")


def test_output_replaced_whole(tmp_path):
    out = tmp_path / "run"
    to_parquet(make_trace([5, 3], layers=(0, 1, 2)), out, attributions=pa.table(attribution_rows()))
    to_parquet(make_trace([4], layers=(7,)), out, overwrite=True)  # issue 17: replacing needs overwrite=True
    assert sorted(p.name for p in (out / "attention").iterdir()) == ["layer=7"]
    assert not (out / "attributions").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no temporary leftovers


def test_damaged_directories_raise_data_errors(tmp_path):
    import pyarrow.parquet as pq

    tr = make_trace([5, 3], layers=(0, 1), heads=2)
    run = to_parquet(tr, tmp_path / "run")
    man = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps({**man, "dtype": "int8"}))
    with pytest.raises(DataError, match="dtype 'int8'; this attnflow reads float16, bfloat16, float32, float64"):
        AttentionTrace.load(run)
    (run / "manifest.json").write_text(json.dumps(man))
    part = run / "attention" / "layer=1" / "part-0.parquet"
    t = pq.read_table(part)
    short = pa.array([w[:-1] for w in t["weights"].to_pylist()], t.schema.field("weights").type)
    pq.write_table(t.set_column(3, "weights", short), part)  # every row one weight short
    with pytest.raises(DataError, match="layer=1 row 0 holds 0 weights, expected 1; the file is damaged"):
        AttentionTrace.load(run)
    pq.write_table(t, part)
    assert_same(tr, AttentionTrace.load(run))
    flow = {"raw": tr.patterns.float().mean((1, 2))}
    tab = read_flow(to_parquet(tr, tmp_path / "flow", flow=flow))
    long = pa.array([w + [0.5] for w in tab["weights"].to_pylist()], pa.list_(pa.float32()))
    with pytest.raises(DataError, match="room for"):  # rows reaching past their example
        flow_tensor(tab.set_column(3, "weights", long), tr, "raw")
    part.unlink()
    part.parent.rmdir()
    with pytest.raises(DataError, match="holds no layer=1 table"):
        AttentionTrace.load(run)
