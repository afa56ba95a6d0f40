"""What a run keeps on disk: its settings, committed parts, the final tables, and merged shard runs.

    out/config.json                       settings (RunConfig.to_json); resuming with other ones is refused
    out/parts/part-<index>/*.parquet      one committed batch: examples + attribution
    out/examples.parquet                  one row per selected example (EXAMPLE_SCHEMA)
    out/attribution.parquet               one row per (ok example, level, method) (ATTRIBUTION_SCHEMA)
    out/removals.parquet                  the answer's log-prob with each removed paragraph set (`eval.loo`)
    out/features.parquet                  AT2 features per example (`eval.at2`); at2_heads.safetensors: its weights
    out/costs.parquet                     seconds and forward passes per example: trace, methods, LOO (`eval.loo`)

    >>> out, config = Path("runs/demo"), RunConfig(task="demo", limit=3)
    >>> prepare_out(out, config, resume=False)
    >>> check_out(out, config, resume=True)                   # the same settings: resumable
    >>> check_out(out, RunConfig(task="demo", limit=3, seed=1), resume=True)
    Traceback (most recent call last):
    attnflow.errors.DataError: cannot resume runs/demo with other settings (seed: None -> 1); use the original ones or a new --out
    >>> check_out(out, RunConfig(task="demo", limit=5), resume=True)   # a larger limit only grows the run

Commit one batch, then collect what is committed (the runner's loop, `runner.evaluate`):

    >>> from attnflow.eval.batch import run_batch, skipped_table
    >>> from attnflow.eval.datasets import demo_examples
    >>> from attnflow.eval.jobs import batches, prepare
    >>> jobs = prepare(demo_examples(3, seed=0), tokenizer, config, limit_tokens=None)
    >>> first, rest = batches(jobs, 2)
    >>> commit_part(out / "parts", first, run_batch(first, model, tokenizer, config, out, views=0))
    >>> done = committed(out / "parts", jobs)                 # {example index: its part}
    >>> sorted(done), done[0].name
    ([0, 1], 'part-000000001')
    >>> [[j.example.index for j in b] for b in batches(jobs, 2, set(done))]   # what a resumed run does
    [[2]]
    >>> examples_t, attribution_t = collect(done, jobs, skipped_table(jobs, []))
    >>> examples_t["index"].to_pylist(), attribution_t.num_rows     # 2 examples x (2 levels x 23 methods + loo)
    ([0, 1], 94)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq

from attnflow import _io
from attnflow.errors import DataError
from attnflow.eval import metrics as M
from attnflow.eval.config import EXECUTION, GROWABLE, RunConfig, parse_shard
from attnflow.eval.jobs import Job, part_name
from attnflow.eval.calibrate import ALL_NAMES, COST_FIELDS, read_shuffle, write_shuffle

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
        ("question_type", pa.string()),  # HotPotQA "bridge" | "comparison"
        # generate mode: the generated text (up to the first special token) and its scores before extraction;
        # `prediction`, em, f1, contains are those of the extracted answer (`answers.answer_scores`)
        ("generated", pa.string()),
        ("contains", pa.float64()),
        ("em_raw", pa.float64()),
        ("f1_raw", pa.float64()),
        ("contains_raw", pa.float64()),
        # the attributed answer span: completion tokens [answer_start, answer_end) and their text
        ("completion_tokens", pa.int64()),
        ("answer_start", pa.int64()),
        ("answer_end", pa.int64()),
        ("answer_span", pa.string()),
        # the LOO reference (`eval.loo`; its cost per example is in costs.parquet, kept apart: wall-clock varies)
        ("answer_logp", pa.float64()),  # log p(answer span | full prompt), the base of every LOO drop
        ("loo_reason", pa.string()),  # why an evaluated example has no LOO rows
    ]
    + COST_FIELDS  # the side passes' cost (--calibrate, --shuffle-check; eval/calibrate.py), null without them
)
ATTRIBUTION_SCHEMA = pa.schema(
    [("index", pa.int64()), ("id", pa.string()), ("level", pa.string()), ("method", pa.string())]
    + [("scores", pa.list_(pa.float64()))]
    + [(m, pa.float64()) for m in M.metric_names() + list(M.LOO_METRICS)]
)
# per-part tables beside examples and attribution, gathered into out/<name>.parquet (`collect_table`)
EXTRA_TABLES = ("removals", "features", "costs")


# --- the out directory ------------------------------------------------------------------------
def prepare_out(out: Path, config: RunConfig, resume: bool) -> None:
    """Create `out`, or check that the run there has the same settings when resuming."""
    check_out(out, config, resume)
    out.mkdir(parents=True, exist_ok=True)
    _io.write_json(out / "config.json", config.to_json())


def check_out(out: Path, config: RunConfig, resume: bool) -> None:
    """DataError unless `out` is new, empty, or (with resume) a run with the same settings.

    A resumed run may grow (`check_growth`): a larger `limit`, or a shard whose rows
    include the old shard's; it evaluates only the new examples.
    """
    cfg_file = out / "config.json"
    if cfg_file.is_file():
        if not resume:
            raise DataError(f"{out} already holds an evaluation; pass --resume to continue it or choose another --out")
        old = read_config(cfg_file)
        new = json.loads(json.dumps(config.to_json()))
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in GROWABLE + EXECUTION)
        if diff:
            changes = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
            raise DataError(f"cannot resume {out} with other settings ({changes}); use the original ones or a new --out")
        check_growth(out, old, new)
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out} exists and holds no evaluation; choose another --out")


def check_growth(out: Path, old: dict, new: dict) -> None:
    """DataError unless every example the old run selects is selected again (a run only grows).

    Limits: the new one is None (all rows) or at least the old one.  Shards: rows with
    index % N == i include those of i'/N' when N divides N' and i' % N == i (None is 0/1).

    >>> check_growth(Path("o"), {"limit": 10, "shard": "1/4"}, {"limit": 20, "shard": "1/2"})   # grows
    """
    lo, ln = old.get("limit"), new.get("limit")
    if ln is not None and (lo is None or lo > ln):
        raise DataError(
            f"cannot resume {out} with --limit {ln}: it holds a run over {'every row' if lo is None else f'--limit {lo}'},"
            f" and a resumed run can only grow; pass --limit {lo} or more{'' if lo is not None else ' (or none)'}, or a new --out"
        )
    (io, no), (i, n) = parse_shard(old.get("shard")), parse_shard(new.get("shard"))
    if no % n or io % n != i:
        raise DataError(
            f"cannot resume {out} with --shard {new.get('shard')}: its rows do not include those of the run there"
            f" (--shard {old.get('shard')}); a resumed run can only grow; use a new --out"
        )


def committed(parts: Path, jobs: list[Job]) -> dict[int, Path]:
    """{example index: its committed part} for the parts under `parts`; DataError if a part holds another
    example than the current data has at that index (the data file changed)."""
    ids = {j.example.index: j.example.id for j in jobs}
    found: dict[int, Path] = {}
    for part in sorted(parts.iterdir()) if parts.is_dir() else []:
        if part.name.startswith(".") or not (part / "examples.parquet").is_file():
            continue  # a batch in flight when the run was killed
        t = read_part(part / "examples.parquet", columns=["index", "id"])
        for index, ex_id in zip(t["index"].to_pylist(), t["id"].to_pylist()):
            if index in ids and ids[index] != ex_id:
                raise DataError(f"{part} holds other examples than this run would put there; the data file changed, use a new --out")
            found[index] = part
    return found


def check_part(path: Path, batch: list[Job]) -> None:
    """DataError unless the committed part at `path` holds exactly `batch`'s examples."""
    ids = read_part(path / "examples.parquet", columns=["id"])["id"].to_pylist()
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


def collect(done: dict[int, Path], jobs: list[Job], skipped: pa.Table) -> tuple[pa.Table, pa.Table]:
    """The run's full tables: the committed rows of `jobs`' examples plus the `skipped` example rows,
    sorted by (index, level, method order)."""
    wanted = pa.array(sorted(j.example.index for j in jobs if j.example.index in done), pa.int64())
    dirs = sorted({done[i] for i in wanted.to_pylist()})
    ex = [_rows_of(read_part(d / "examples.parquet", schema=EXAMPLE_SCHEMA), wanted) for d in dirs]
    at = [_rows_of(read_part(d / "attribution.parquet", schema=ATTRIBUTION_SCHEMA), wanted) for d in dirs]
    ex.append(skipped)
    return sort_examples(pa.concat_tables(ex)), sort_attribution(pa.concat_tables(at) if at else attribution_table([]))


def collect_table(done: dict[int, Path], jobs: list[Job], name: str, schema: pa.Schema) -> pa.Table | None:
    """The committed rows of `parts/*/<name>.parquet` (an EXTRA_TABLES name) of `jobs`' examples; None if no part has one."""
    wanted = pa.array(sorted(j.example.index for j in jobs if j.example.index in done), pa.int64())
    dirs = [d for d in sorted({done[i] for i in wanted.to_pylist()}) if (d / f"{name}.parquet").is_file()]
    if not dirs:
        return None
    t = pa.concat_tables([_rows_of(read_part(d / f"{name}.parquet", schema=schema), wanted) for d in dirs])
    return t.take(pa.array(np.argsort(t["index"].to_numpy(), kind="stable"))).combine_chunks()


def extra_schemas() -> dict[str, pa.Schema]:
    from attnflow.eval.at2 import FEATURE_SCHEMA
    from attnflow.eval.loo import COST_SCHEMA, REMOVAL_SCHEMA

    return {"removals": REMOVAL_SCHEMA, "features": FEATURE_SCHEMA, "costs": COST_SCHEMA}


def _rows_of(table: pa.Table, indices: pa.Array) -> pa.Table:
    return table.filter(pa.compute.is_in(table["index"], value_set=indices))


def sort_examples(t: pa.Table) -> pa.Table:
    return t.take(pa.array(np.argsort(t["index"].to_numpy(), kind="stable"))).combine_chunks()


def sort_attribution(t: pa.Table) -> pa.Table:
    level = np.array([LEVELS.index(x) for x in t["level"].to_pylist()], dtype=np.int64)
    method = np.array([ALL_NAMES.index(x) for x in t["method"].to_pylist()], dtype=np.int64)
    order = np.lexsort((method, level, t["index"].to_numpy()))
    return t.take(pa.array(order)).combine_chunks()


def write_tables(out: Path, examples: pa.Table, attribution: pa.Table, extra: dict[str, pa.Table | None] | None = None) -> None:
    """`out/examples.parquet`, `out/attribution.parquet` (and `out/<name>.parquet` of each `extra` table),
    each written to a temporary name and renamed."""
    tables = {"examples": examples, "attribution": attribution} | {k: v for k, v in (extra or {}).items() if v is not None}
    for name, table in tables.items():
        with _io.atomic_path(out / f"{name}.parquet") as tmp:
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
        configs.append(read_config(d / "config.json"))
        ex.append(read_part(d / "examples.parquet", schema=EXAMPLE_SCHEMA))
        at.append(read_part(d / "attribution.parquet", schema=ATTRIBUTION_SCHEMA))
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

    _io.check_inputs(out, shards.dirs)  # merging into a shard run would overwrite it
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; give a folder for the merged run")
    out.mkdir(parents=True, exist_ok=True)
    merged = dict(_unsharded(shards.configs[0]), shard=None, merged_from=[c["shard"] for c in shards.configs])
    _io.write_json(out / "config.json", merged)
    examples = sort_examples(pa.concat_tables(shards.examples))
    attribution = sort_attribution(pa.concat_tables(shards.attribution))
    extra = {}
    for name, schema in extra_schemas().items():  # tables a shard run without LOO lacks
        found = [read_part(d / f"{name}.parquet", schema=schema) for d in shards.dirs if (d / f"{name}.parquet").is_file()]
        extra[name] = pa.concat_tables(found) if found else None
    from attnflow.eval.at2 import with_at2

    attribution, at2_facts = with_at2(out, examples, attribution, extra["features"], extra["removals"])  # one fit
    write_tables(out, examples, attribution, extra)
    shuffle = read_shuffle(shards.dirs)
    write_shuffle(out, shuffle)
    from attnflow.eval.views import views_summary

    views = views_summary(out, shards.dirs, [], None, None)
    return write_report(out, examples, attribution, merged, views_from=shards.dirs, views=views, at2=at2_facts,
                        costs=extra["costs"], shuffle=shuffle)


def _unsharded(config: dict) -> dict:
    return {k: v for k, v in config.items() if k != "shard"}


# --- reading a run ------------------------------------------------------------------------------
def read_part(file: Path, **kwargs) -> pa.Table:
    """One Parquet table of a run; StorageError when the system refuses, DataError when the file is damaged."""
    try:
        return pq.read_table(file, **kwargs)
    except (OSError, pa.ArrowException, ValueError) as err:
        damaged = f"{file} cannot be read as Parquet ({str(err).splitlines()[0]}); run the evaluation again into a new --out"
        raise _io.read_failure(err, file, damaged) from None


def read_config(file: Path) -> dict:
    """A run's config.json; StorageError when the system refuses, DataError when it is not a JSON object."""
    with _io.storage_errors(file, "read"):
        text = file.read_text(encoding="utf-8")
    try:
        config = json.loads(text)
    except ValueError as err:
        raise DataError(f"{file} is not valid JSON ({err}); run the evaluation again into a new --out") from None
    if not isinstance(config, dict):
        raise DataError(f"{file} holds a JSON {type(config).__name__}, not an object; run the evaluation again")
    return config
