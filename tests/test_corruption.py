"""Damaged saved traces (issue 17): every kind of damage is a one-line DataError naming the fault, never a wrong answer.

Each damage is applied to a freshly saved trace twice: with the manifest's sha256 table (so the
hash would catch it anyway) and without it (a trace written before hashes), so the structural
checks are shown to catch it on their own.  Damage the structure cannot see (a weight moved
within its row) is caught by the hash alone.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_parquet import assert_same, make_trace

import attnflow as af
from attnflow import codec
from attnflow.attention_trace import AttentionTrace
from attnflow.errors import DataError
from attnflow.exporters import read_flow, to_parquet

LAYER1 = Path("attention") / "layer=1" / "part-0.parquet"
TOKENS = Path("tokens") / "part-0.parquet"
SPANS = Path("spans") / "part-0.parquet"


def trace():
    return make_trace([5, 3], layers=(0, 1), heads=2)


# --- damage helpers -----------------------------------------------------------------------------
def manifest(run: Path, **changes) -> None:
    man = json.loads((run / "manifest.json").read_text())
    for k, v in changes.items():
        if v is DEL:
            del man[k]
        else:
            man[k] = v
    (run / "manifest.json").write_text(json.dumps(man))


DEL = object()


def table(run: Path, rel: Path, edit) -> None:
    """Rewrite one Parquet file with `edit(rows: list[dict]) -> rows` applied, keeping its schema."""
    t = pq.read_table(run / rel)
    pq.write_table(pa.Table.from_pylist(edit(t.to_pylist()), schema=t.schema), run / rel)


def column(run: Path, rel: Path, name: str, array: pa.Array) -> None:
    t = pq.read_table(run / rel)
    pq.write_table(t.set_column(t.schema.get_field_index(name), name, array), run / rel)


def rows_set(i: int, **values):
    def edit(rows):
        rows[i] = {**rows[i], **values}
        return rows

    return edit


def truncate(run):
    data = (run / LAYER1).read_bytes()
    (run / LAYER1).write_bytes(data[: len(data) // 2])


def duplicate_token_row(run):
    table(run, TOKENS, lambda rows: rows[:2] + [rows[1]] + rows[2:])


def drop_token_row(run):
    table(run, TOKENS, lambda rows: rows[:2] + rows[3:])


def duplicate_attention_row(run):
    table(run, LAYER1, lambda rows: rows + [rows[3]])


def drop_attention_row(run):
    table(run, LAYER1, lambda rows: rows[:3] + rows[4:])


def drop_query_row_of_every_head(run):  # layer 1 then records other rows than layer 0
    table(run, LAYER1, lambda rows: [r for r in rows if (r["example"], r["query"]) != (0, 4)])


def weights_row(i, weights):
    return lambda run: table(run, LAYER1, rows_set(i, weights=weights))


def nan_weight(run):
    table(run, LAYER1, lambda rows: [{**r, "weights": [float("nan")] * len(r["weights"])} if i == 2 else r for i, r in enumerate(rows)])


def extra_token_file(run):  # pyarrow reads every file of the folder: the rows would count twice
    shutil.copy(run / TOKENS, run / "tokens" / "part-1.parquet")


def example_column_as_strings(run):
    t = pq.read_table(run / TOKENS)
    column(run, TOKENS, "example", pa.array([str(x) for x in t["example"].to_pylist()]))


def null_token_ids(run):
    t = pq.read_table(run / TOKENS)
    column(run, TOKENS, "token_id", pa.array([None] * t.num_rows, pa.int64()))


# (name, damage, what the message must say)
STRUCTURAL = [
    ("truncated parquet", truncate, "cannot be read as Parquet"),
    ("manifest not JSON", lambda r: (r / "manifest.json").write_text('{"schema_version": 2, '), "is not valid JSON"),
    ("manifest a list", lambda r: (r / "manifest.json").write_text("[1, 2]"), "not an object"),
    ("manifest missing", lambda r: (r / "manifest.json").unlink(), "holds no manifest.json"),
    ("key missing: batch", lambda r: manifest(r, batch=DEL), "lacks 'batch'"),
    ("key missing: layers", lambda r: manifest(r, layers=DEL), "lacks 'layers'"),
    ("tokens folder missing", lambda r: shutil.rmtree(r / "tokens"), "holds no tokens table"),
    ("spans folder missing", lambda r: shutil.rmtree(r / "spans"), "holds no spans table"),
    ("layer folder missing", lambda r: shutil.rmtree(r / "attention" / "layer=1"), "holds no layer=1 table"),
    ("schema_version 99", lambda r: manifest(r, schema_version=99), "schema_version 99"),
    ("wrong dtype name", lambda r: manifest(r, dtype="float17"), "dtype 'float17'"),
    ("dtype not the tables'", lambda r: manifest(r, dtype="float16"), "column 'weights' has type"),
    ("layers traversal", lambda r: manifest(r, layers=[0, "1/../../x"]), "not a non-negative integer"),
    ("layers as a string", lambda r: manifest(r, layers="01"), "layers is '01', expected a list"),
    ("layers negative", lambda r: manifest(r, layers=[0, -1]), "holds -1, not a non-negative integer"),
    ("layers repeated", lambda r: manifest(r, layers=[1, 1]), "name a layer twice"),
    ("layer not recorded", lambda r: manifest(r, layers=[0, 5]), "holds no layer=5 table"),
    ("heads unknown", lambda r: manifest(r, heads="sum"), "heads is 'sum'"),
    ("num_heads a bool", lambda r: manifest(r, num_heads=True), "num_heads is True"),
    ("inflated num_heads", lambda r: manifest(r, num_heads=12), "rows are missing (or num_heads is wrong)"),
    ("deflated num_heads", lambda r: manifest(r, num_heads=1), "has head 1"),
    ("reduced heads with 2 heads", lambda r: manifest(r, heads="mean"), "keeps one head, but num_heads is 2"),
    ("inflated batch", lambda r: manifest(r, batch=3, prompt_lengths=[3, 1, 1]), "holds no tokens of example 2"),
    ("deflated batch", lambda r: manifest(r, batch=1, prompt_lengths=[3]), "is of example 1, outside the manifest's batch of 1"),
    ("prompt_lengths short", lambda r: manifest(r, prompt_lengths=[3]), "prompt_lengths has 1 entries for batch 2"),
    ("negative prompt_lengths", lambda r: manifest(r, prompt_lengths=[-3, 1]), "prompt_lengths is [-3, 1]"),
    ("prompt_lengths past the tokens", lambda r: manifest(r, prompt_lengths=[999, 1]), "prompt_lengths[0] is 999"),
    ("causal not a bool", lambda r: manifest(r, causal="yes"), "causal is 'yes'"),
    ("sha256 not hex", lambda r: manifest(r, sha256={"tokens/part-0.parquet": "xyz"}), "sha256 is not a map"),
    ("duplicated token row", duplicate_token_row, "position 1 twice"),
    ("missing token row", drop_token_row, "where 2 belongs"),
    ("negative token id", lambda r: table(r, TOKENS, rows_set(0, token_id=-5)), "token_id -5"),
    ("token ids null", null_token_ids, "'token_id' has 8 empty (null) values"),
    ("example column of strings", example_column_as_strings, "column 'example' has type string"),
    ("token role flipped", lambda r: table(r, TOKENS, rows_set(0, role="completion")), "roles disagree"),
    ("extra token file", extra_token_file, "tokens"),
    ("span past the tokens", lambda r: table(r, SPANS, rows_set(0, end=50)), "covers 0..50, outside its 5 tokens"),
    ("span ids duplicated", lambda r: table(r, SPANS, rows_set(1, span_id=0)), "are not 0, 1, 2"),
    ("span kind unknown", lambda r: table(r, SPANS, rows_set(0, kind="bogus")), "kind 'bogus'"),
    ("query index 999", lambda r: table(r, LAYER1, rows_set(0, query=999)), "has query 999, outside example 0's 5 tokens"),
    ("example index 7", lambda r: table(r, LAYER1, rows_set(0, example=7)), "is of example 7"),
    ("head index 9", lambda r: table(r, LAYER1, rows_set(0, head=9)), "has head 9"),
    ("duplicated attention row", duplicate_attention_row, "twice; a row is duplicated"),
    ("missing attention row", drop_attention_row, "rows are missing"),
    ("layers record other rows", drop_query_row_of_every_head, "records other query rows than layer=0"),
    ("NaN weights", nan_weight, "NaN or inf"),
    ("weight above 1", weights_row(1, [0.5, 3.0]), "weights from"),
    ("negative weight", weights_row(1, [1.5, -0.5]), "weights from -0.5"),
    ("row summing to 2", weights_row(2, [1.0, 1.0, 0.0]), "sums to 2"),
    ("row one weight short", weights_row(0, []), "row 0 holds 0 weights, expected 1"),
]


def saved(tmp_path: Path, hashed: bool) -> tuple[AttentionTrace, Path]:
    tr = trace()
    run = tr.save(tmp_path / "run")
    if not hashed:
        manifest(run, sha256=DEL)
    assert_same(tr, AttentionTrace.load(run))  # undamaged, it loads whole
    return tr, run


@pytest.mark.parametrize("hashed", [True, False], ids=["hashed", "unhashed"])
@pytest.mark.parametrize("damage", STRUCTURAL, ids=[d[0] for d in STRUCTURAL])
def test_damage_is_a_data_error(tmp_path, damage, hashed):
    _, damage_fn, message = damage
    _, run = saved(tmp_path, hashed)
    damage_fn(run)
    with pytest.raises(DataError) as err:
        AttentionTrace.load(run)
    msg = str(err.value)
    assert message in msg and "\n" not in msg
    assert str(run) in msg  # names the folder or the file


def test_at_least_twenty_kinds():
    assert len(STRUCTURAL) >= 20


HASH_ONLY = [
    # valid rows, wrong content: only the hash can see it
    ("weights moved within a row", weights_row(1, [0.25, 0.75]), "attention/layer=1/part-0.parquet does not match its sha256"),
    ("token id changed", lambda r: table(r, TOKENS, rows_set(0, token_id=12345)), "tokens/part-0.parquet does not match"),
    ("span renamed", lambda r: table(r, SPANS, rows_set(0, name="doc Z")), "spans/part-0.parquet does not match"),
    ("extra empty token file", lambda r: pq.write_table(pq.read_table(r / TOKENS).slice(0, 0), r / "tokens" / "part-1.parquet"),
     "tokens/part-1.parquet is not one of the files manifest.json lists"),
    ("hashed file renamed", lambda r: (r / LAYER1).rename(r / LAYER1.with_name("part-9.parquet")), "layer=1/part-9.parquet is not one of"),
]


@pytest.mark.parametrize("damage", HASH_ONLY, ids=[d[0] for d in HASH_ONLY])
def test_hash_catches_what_the_structure_cannot(tmp_path, damage):
    _, damage_fn, message = damage
    _, run = saved(tmp_path, hashed=True)
    weights = pq.read_table(run / LAYER1)["weights"].to_pylist()
    assert len(weights[1]) == 2  # weights_row(1, ...) keeps the row's width
    damage_fn(run)
    with pytest.raises(DataError) as err:
        AttentionTrace.load(run)
    assert message in str(err.value)


def test_unhashed_weight_move_is_the_one_thing_that_loads(tmp_path):
    """Without hashes a plausible edit loads: the reason hashes are recorded (the row is still a softmax row)."""
    _, run = saved(tmp_path, hashed=False)
    weights_row(1, [0.25, 0.75])(run)
    assert AttentionTrace.load(run).patterns[0, 1, 0, 1, :2].tolist() == [0.25, 0.75]


def test_duplicated_token_row_never_ranks_a_wrong_token(tmp_path):
    """The issue's case: a duplicated token row used to shift positions and rank the wrong token first."""
    tr, run = saved(tmp_path, hashed=False)
    expect = af.attribute(tr, method="raw", sources="tokens")
    assert af.attribute(AttentionTrace.load(run), method="raw", sources="tokens").equals(expect)
    duplicate_token_row(run)
    with pytest.raises(DataError, match="twice"):
        af.attribute(AttentionTrace.load(run), method="raw", sources="tokens")


def test_flow_and_attribution_tables_are_hash_checked(tmp_path):
    tr = trace()
    run = to_parquet(tr, tmp_path / "run", flow={"raw": tr.patterns.float().mean((1, 2))})
    man = json.loads((run / "manifest.json").read_text())
    assert set(man["sha256"]) == {p.relative_to(run).as_posix() for p in run.rglob("*.parquet")}
    assert read_flow(run).num_rows == 8
    t = pq.read_table(run / "flow" / "part-0.parquet")
    pq.write_table(t.slice(0, 7), run / "flow" / "part-0.parquet")
    with pytest.raises(DataError, match="flow/part-0.parquet does not match its sha256"):
        read_flow(run)


def test_rewriting_an_unchanged_table_keeps_its_hash(tmp_path):
    """A table read back and written again is byte-identical, so repairs by rewriting load again."""
    _, run = saved(tmp_path, hashed=True)
    for rel in (TOKENS, SPANS, LAYER1):
        before = (run / rel).read_bytes()
        pq.write_table(pq.read_table(run / rel), run / rel)
        assert (run / rel).read_bytes() == before
    AttentionTrace.load(run)


# --- traversal -----------------------------------------------------------------------------------------
def test_traversal_manifest_touches_nothing_outside(tmp_path, monkeypatch):
    """`layers: [0, "1/../../../outside"]` is refused before any path is built; no file outside is opened."""
    _, run = saved(tmp_path / "in", hashed=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(run / LAYER1, outside / "part-0.parquet")  # what the traversal would have read
    evil = "1/../../../../outside"
    assert (run / "attention" / f"layer={evil}").resolve() == outside.resolve()
    manifest(run, layers=[0, evil])
    before = {p: p.read_bytes() for p in outside.iterdir()}

    opened = []
    real_read_table = codec.pq.read_table
    monkeypatch.setattr(codec.pq, "read_table", lambda where, *a, **k: opened.append(Path(where)) or real_read_table(where, *a, **k))
    watching = [True]

    def audit(event, args):
        if watching[0] and event == "open" and isinstance(args[0], (str, bytes, Path)):
            opened.append(Path(args[0] if not isinstance(args[0], bytes) else args[0].decode()))

    sys.addaudithook(audit)
    try:
        with pytest.raises(DataError, match="not a non-negative integer"):
            AttentionTrace.load(run)
    finally:
        watching[0] = False
    near = [p.resolve() for p in opened if p.is_absolute() and tmp_path.resolve() in p.resolve().parents]
    assert near and all(run.resolve() in p.parents for p in near), near  # the manifest, nothing else
    assert not any(outside.resolve() in p.parents for p in near)
    assert {p: p.read_bytes() for p in outside.iterdir()} == before


def test_traversal_layers_on_save_write_nothing(tmp_path):
    tr = trace()
    tr.layers = [0, "1/../../../../outside"]
    (tmp_path / "out").mkdir()
    with pytest.raises(DataError, match="not a non-negative integer"):
        tr.save(tmp_path / "out" / "run")
    assert [p.name for p in tmp_path.rglob("*")] == ["out"]  # no run, no temporary, nothing outside


def test_old_traces_without_hashes_still_load(tmp_path):
    """Written before hashes (no sha256, no kind) they load, checked structurally, and can be replaced."""
    tr, run = saved(tmp_path, hashed=False)
    manifest(run, kind=DEL)
    assert_same(tr, AttentionTrace.load(run))
    other = make_trace([4], layers=(3,), heads=2)
    other.save(run, overwrite=True)  # recognised as a trace by its manifest
    assert_same(other, AttentionTrace.load(run))


def test_real_trace_round_trip_validates(tmp_path):
    """A trace recorded from a model (fp16, sums of rounded weights) passes every check."""
    from tiny_models import prompts_ids, tiny_model

    tr = af.trace(tiny_model("llama"), prompts_ids((5, 9, 7)), progress=False)
    back = AttentionTrace.load(tr.save(tmp_path / "t"))
    assert_same(tr, back)
    sums = back.patterns.float().sum(-1)  # [batch, layer, head, query]
    sums = sums[(back.query_positions >= 0)[:, None, None, :].expand_as(sums)]
    assert torch.allclose(sums, torch.ones_like(sums), atol=1e-2)
    assert np.isfinite(back.patterns.float().numpy()).all()
