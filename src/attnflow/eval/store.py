"""What a run keeps on disk: its settings, committed parts, the final tables, and merged shard runs.

    out/config.json                       settings (RunConfig.to_json); resuming with other ones is refused
    out/parts/part-<index>/*.parquet      one committed batch: examples + attribution
    out/examples.parquet                  one row per selected example (EXAMPLE_SCHEMA)
    out/attribution.parquet               one row per (ok example, level, method) (ATTRIBUTION_SCHEMA)

    >>> check_out(Path("runs/demo"), config, resume=True)     # DataError if the settings differ
    >>> examples_t, attribution_t = collect(parts, todo, skipped)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from attnflow import _io
from attnflow.errors import DataError
from attnflow.eval import metrics as M
from attnflow.eval.config import RunConfig, parse_shard
from attnflow.eval.jobs import Job, part_name
from attnflow.eval.methods import METHOD_NAMES

LEVELS = ("sentence", "paragraph")

EXAMPLE_SCHEMA = pa.schema(
    [
        ("index", pa.int64()),
        ("id", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("question", pa.string()),
        ("answer", pa.string()),
        ("prediction", pa.string()),
        ("em", pa.float64()),
        ("f1", pa.float64()),
        ("prompt_tokens", pa.int64()),
        ("answer_tokens", pa.int64()),
        ("paragraphs", pa.list_(pa.string())),
        ("gold_paragraphs", pa.list_(pa.bool_())),
        ("sentences", pa.list_(pa.string())),
        ("sentence_text", pa.list_(pa.string())),
        ("gold_sentences", pa.list_(pa.bool_())),
    ]
)
ATTRIBUTION_SCHEMA = pa.schema(
    [("index", pa.int64()), ("id", pa.string()), ("level", pa.string()), ("method", pa.string())]
    + [("scores", pa.list_(pa.float64()))]
    + [(m, pa.float64()) for m in M.metric_names()]
)


# --- the out directory ------------------------------------------------------------------------
def prepare_out(out: Path, config: RunConfig, resume: bool) -> None:
    """Create `out`, or check that the run there has the same settings when resuming."""
    check_out(out, config, resume)
    out.mkdir(parents=True, exist_ok=True)
    _io.write_json(out / "config.json", config.to_json())


def check_out(out: Path, config: RunConfig, resume: bool) -> None:
    """DataError unless `out` is new, empty, or (with resume) a run with the same settings."""
    cfg_file = out / "config.json"
    if cfg_file.is_file():
        if not resume:
            raise DataError(f"{out} already holds an evaluation; pass --resume to continue it or choose another --out")
        old = json.loads(cfg_file.read_text())
        new = json.loads(json.dumps(config.to_json()))
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if diff:
            changes = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
            raise DataError(f"cannot resume {out} with other settings ({changes}); use the original ones or a new --out")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out} exists and holds no evaluation; choose another --out")


def check_part(path: Path, batch: list[Job]) -> None:
    """DataError unless the committed part at `path` holds exactly `batch`'s examples."""
    ids = pq.read_table(path / "examples.parquet", columns=["id"])["id"].to_pylist()
    if ids != [j.example.id for j in batch]:
        raise DataError(f"{path} holds other examples than this run would put there; the data file changed, use a new --out")


def commit_part(parts: Path, batch: list[Job], tables: dict[str, pa.Table]) -> None:
    """Write one batch's tables as `parts/part-<index>/<name>.parquet`, renamed into place whole."""
    with _io.atomic_dir(parts / part_name(batch)) as tmp:
        for name, table in tables.items():
            pq.write_table(table, tmp / f"{name}.parquet")


# --- tables ------------------------------------------------------------------------------------
def examples_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=EXAMPLE_SCHEMA)


def attribution_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=ATTRIBUTION_SCHEMA)


def collect(parts: Path, todo: list[list[Job]], skipped: pa.Table) -> tuple[pa.Table, pa.Table]:
    """The run's full tables: committed parts plus the `skipped` example rows, sorted by (index, level, method order)."""
    ex = [pq.read_table(parts / part_name(b) / "examples.parquet", schema=EXAMPLE_SCHEMA) for b in todo]
    at = [pq.read_table(parts / part_name(b) / "attribution.parquet", schema=ATTRIBUTION_SCHEMA) for b in todo]
    ex.append(skipped)
    return sort_examples(pa.concat_tables(ex)), sort_attribution(pa.concat_tables(at) if at else attribution_table([]))


def sort_examples(t: pa.Table) -> pa.Table:
    return t.take(pa.array(np.argsort(t["index"].to_numpy(), kind="stable"))).combine_chunks()


def sort_attribution(t: pa.Table) -> pa.Table:
    level = np.array([LEVELS.index(x) for x in t["level"].to_pylist()], dtype=np.int64)
    method = np.array([METHOD_NAMES.index(x) for x in t["method"].to_pylist()], dtype=np.int64)
    order = np.lexsort((method, level, t["index"].to_numpy()))
    return t.take(pa.array(order)).combine_chunks()


def write_tables(out: Path, examples: pa.Table, attribution: pa.Table) -> None:
    """`out/examples.parquet` and `out/attribution.parquet`, each written to a temporary name and renamed."""
    for table, name in ((examples, "examples.parquet"), (attribution, "attribution.parquet")):
        with _io.atomic_path(out / name) as tmp:
            pq.write_table(table, tmp)


# --- merging shard runs ---------------------------------------------------------------------------
@dataclass
class Shards:
    """Finished `--shard i/N` runs of one evaluation, checked to fit together."""

    dirs: list[Path]
    configs: list[dict]
    examples: list[pa.Table]
    attribution: list[pa.Table]
    missing: list[int]  # shard indices of the N that were not given

    @property
    def n_shards(self) -> int:
        return parse_shard(self.configs[0]["shard"])[1]


def read_shards(dirs: list[Path]) -> Shards:
    """Read finished shard runs; DataError unless they are distinct shards of one run with the same settings."""
    configs, ex, at = [], [], []
    for d in dirs:
        if not (d / "config.json").is_file():
            raise DataError(f"{d} holds no evaluation (no config.json); pass the --out directories of the shard runs")
        if not (d / "examples.parquet").is_file() or not (d / "attribution.parquet").is_file():
            raise DataError(f"shard run {d} is not finished; rerun its command with --resume, then merge")
        configs.append(json.loads((d / "config.json").read_text()))
        ex.append(pq.read_table(d / "examples.parquet", schema=EXAMPLE_SCHEMA))
        at.append(pq.read_table(d / "attribution.parquet", schema=ATTRIBUTION_SCHEMA))
    base = _unsharded(configs[0])
    for d, c in zip(dirs, configs):
        if _unsharded(c) != base:
            raise DataError(f"shard run {d} has other settings than {dirs[0]}; merge runs of one evaluation")
    names = [c["shard"] for c in configs]
    shards = [parse_shard(n) for n in names]
    if any(n is None for n in names) or len({n for _, n in shards}) != 1:
        raise DataError(f"shards {names} do not split one run; merge the --shard i/N runs of one N")
    if len(set(shards)) != len(shards):
        raise DataError(f"the same shard is given twice ({names}); give each shard once")
    missing = sorted(set(range(shards[0][1])) - {i for i, _ in shards})
    return Shards(list(dirs), configs, ex, at, missing)


def merge(shards: Shards, out: Path) -> dict:
    """Write the merged run (config, tables, report) of `shards` under `out`; returns the report's facts."""
    from attnflow.eval.report import write_report

    out.mkdir(parents=True, exist_ok=True)
    merged = dict(_unsharded(shards.configs[0]), shard=None, merged_from=[c["shard"] for c in shards.configs])
    _io.write_json(out / "config.json", merged)
    examples = sort_examples(pa.concat_tables(shards.examples))
    attribution = sort_attribution(pa.concat_tables(shards.attribution))
    write_tables(out, examples, attribution)
    return write_report(out, examples, attribution, merged, views_from=shards.dirs)


def _unsharded(config: dict) -> dict:
    return {k: v for k, v in config.items() if k != "shard"}
