"""The resumable evaluation runner behind `attnflow eval hotpotqa|demo|merge`.

    attnflow eval demo --out runs/demo --limit 200
    attnflow eval hotpotqa --model M --data hotpot_dev_distractor_v1.json --out runs/hp --shard 0/4
    attnflow eval merge runs/hp-0 runs/hp-1 runs/hp-2 runs/hp-3 --out runs/hp

Work is cut into fixed batches of `--batch-size` consecutive valid examples.
Each finished batch is committed as one directory `parts/part-<index>/`
(`examples.parquet`, `attribution.parquet`), built under a temporary name and
renamed into place, so a kill loses at most the batch in flight.  `--resume`
skips the committed batches; since batches are cut the same way and every
computation is deterministic (the random baseline is an exact expectation), the
final tables equal those of an uninterrupted run.  `config.json` records the
settings; resuming with different ones is refused.

Out directory when done:

    config.json          settings of the run
    parts/               committed batches (kept, so a finished run can be extended or audited)
    examples.parquet     one row per selected example: status ok | too_long | malformed, answer, EM/F1, gold
    attribution.parquet  one row per (ok example, level, method): span scores and every metric
    summary.parquet, summary.md, precision_recall.png, explorer.html, views/<index>/  (report.py)

Examples are selected by `--limit N` (the first N rows of the file) then by
`--shard i/N` (rows with index % N == i, i from 0), so merged shards equal one
run over the same limit.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from attnflow import _io
from attnflow.errors import BadArgumentError, DataError
from attnflow.eval import metrics as M
from attnflow.eval.datasets import Problem, QAExample, demo_examples, load_hotpotqa
from attnflow.eval.methods import METHOD_NAMES, answer_rows, key_scores, random_scores, span_sums
from attnflow.eval.prompts import Prompt, build_prompt

LEVELS = ("sentence", "paragraph")
DEFAULT_NEW_TOKENS = {"demo": 3, "hotpotqa": 16}
DEFAULT_DEMO_EXAMPLES = 200
VIEW_LIMIT = 50  # default: attention views for the examples with index < 50


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides an evaluation's results (and nothing that doesn't)."""

    task: str  # "hotpotqa" | "demo"
    model: str | None = None  # None: the embedded demo model
    data: str | None = None
    seed: int | None = None
    two_hop: bool = False
    mode: str = "generate"  # "generate" | "teacher"
    limit: int | None = None
    shard: str | None = None  # "i/N"
    max_context_tokens: int | None = None
    max_new_tokens: int | None = None
    batch_size: int = 1
    dtype: str = "float32"  # model weights
    device_map: str | None = None

    @property
    def shard_pair(self) -> tuple[int, int]:
        return parse_shard(self.shard)

    @property
    def new_tokens(self) -> int:
        return self.max_new_tokens or DEFAULT_NEW_TOKENS[self.task]

    def to_json(self) -> dict:
        return asdict(self)


def parse_shard(text: str | None) -> tuple[int, int]:
    """"i/N" -> (i, N) with 0 <= i < N; None -> (0, 1)."""
    if text is None:
        return 0, 1
    try:
        i, n = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise BadArgumentError(f"--shard {text!r}; use i/N with 0 <= i < N, e.g. 0/4") from None
    if not 0 <= i < n:
        raise BadArgumentError(f"--shard {text!r}; use i/N with 0 <= i < N, e.g. 0/4")
    return i, n


def config_from_args(args) -> RunConfig:
    task = args.eval_command
    if args.batch_size < 1:
        raise BadArgumentError(f"--batch-size {args.batch_size}; use a positive integer")
    for name in ("limit", "max_context_tokens", "max_new_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise BadArgumentError(f"--{name.replace('_', '-')} {value}; use a positive integer")
    parse_shard(args.shard)
    data = str(Path(args.data).resolve()) if task == "hotpotqa" else None
    model = getattr(args, "model", None)
    return RunConfig(
        task=task,
        model=str(Path(model).resolve()) if model and Path(model).exists() else model,
        data=data,
        seed=getattr(args, "seed", None) if task == "demo" else None,
        two_hop=bool(getattr(args, "two_hop", False)),
        mode=args.mode,
        limit=args.limit if task == "hotpotqa" else (args.limit or DEFAULT_DEMO_EXAMPLES),
        shard=args.shard,
        max_context_tokens=args.max_context_tokens,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        dtype=getattr(args, "dtype", "float32"),
        device_map=getattr(args, "device_map", None),
    )


# --- selecting examples ---------------------------------------------------------------------
def select_examples(config: RunConfig) -> tuple[list[QAExample], list[Problem]]:
    """The examples (and malformed rows) of this run: the first `limit` rows, then this shard's."""
    if config.task == "demo":
        examples, problems = demo_examples(config.limit, seed=config.seed, two_hop=config.two_hop), []
    else:
        examples, problems = load_hotpotqa(config.data)
    i, n = config.shard_pair
    keep = lambda index: (config.limit is None or index < config.limit) and index % n == i  # noqa: E731
    return [e for e in examples if keep(e.index)], [p for p in problems if keep(p.index)]


def load_model(config: RunConfig):
    """(model for attnflow.trace, tokenizer)."""
    from attnflow.tracers import load

    if config.task == "demo" and config.model is None:
        from attnflow.demo import MODEL_DIR, load_hf

        if not (MODEL_DIR / "model.safetensors").is_file():
            load_hf()  # raises ModelNotFoundError, saying how to get the weights
        model = load(MODEL_DIR, dtype=config.dtype, device_map=config.device_map)
    else:
        model = load(config.model, dtype=config.dtype, device_map=config.device_map)
    return model, model.tokenizer


def max_positions(model) -> int | None:
    cfg = getattr(getattr(model, "_module", model), "config", None)
    return getattr(cfg, "max_position_embeddings", None)


# --- the run --------------------------------------------------------------------------------
@dataclass
class Job:
    """A prepared example: its prompt, forced completion (teacher mode) and status."""

    example: QAExample
    prompt: Prompt | None = None
    completion: list[int] | None = None
    status: str = "ok"
    reason: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def prepare(examples: list[QAExample], tokenizer, config: RunConfig, limit_tokens: int | None) -> list[Job]:
    """Prompts for every example; those over `limit_tokens` (prompt + answer budget) are marked too_long."""
    jobs = []
    for ex in examples:
        prompt = build_prompt(ex, tokenizer)
        job = Job(ex, prompt)
        if config.mode == "teacher":
            job.completion = list(tokenizer(prompt.answer_prefix + ex.answer, add_special_tokens=False)["input_ids"])
            need = len(prompt) + len(job.completion)
        else:
            need = len(prompt) + config.new_tokens
        if limit_tokens is not None and need > limit_tokens:
            job.status, job.reason = "too_long", f"{len(prompt)} prompt tokens + answer > {limit_tokens}"
        jobs.append(job)
    return jobs


def batches(jobs: list[Job], batch_size: int) -> list[list[Job]]:
    ok = [j for j in jobs if j.status == "ok"]
    return [ok[i : i + batch_size] for i in range(0, len(ok), batch_size)]


def part_name(batch: list[Job]) -> str:
    return f"part-{batch[0].example.index:09d}"


def evaluate(
    examples: list[QAExample],
    problems: list[Problem],
    model,
    tokenizer,
    out: str | Path,
    config: RunConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    report: bool = True,
    views: int = VIEW_LIMIT,
) -> dict:
    """Evaluate `examples` into `out` (see the module docstring); returns the report's facts.

    `views`: write an attention view (views/<index>/index.html) for examples with index < views.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    prepare_out(out, config, resume)
    limit_tokens = config.max_context_tokens or max_positions(model)
    jobs = prepare(examples, tokenizer, config, limit_tokens)
    todo = batches(jobs, config.batch_size)
    parts = out / "parts"
    done = [b for b in todo if (parts / part_name(b)).is_dir()]
    for b in done:
        _check_part(parts / part_name(b), b)
    bar = tqdm(
        total=sum(len(b) for b in todo), initial=sum(len(b) for b in done), desc="eval", unit="ex", disable=not progress
    )
    for batch in todo:
        if (parts / part_name(batch)).is_dir():
            continue
        tables = run_batch(batch, model, tokenizer, config, out, views)
        with _io.atomic_dir(parts / part_name(batch)) as tmp:
            for name, table in tables.items():
                pq.write_table(table, tmp / f"{name}.parquet")
        bar.update(len(batch))
    bar.close()
    examples_t, attribution_t = collect(parts, todo, jobs, problems)
    write_table(examples_t, out / "examples.parquet")
    write_table(attribution_t, out / "attribution.parquet")
    if not report:
        return {}
    from attnflow.eval.report import write_report

    return write_report(out, examples_t, attribution_t, config.to_json())


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


def _check_part(path: Path, batch: list[Job]) -> None:
    ids = pq.read_table(path / "examples.parquet", columns=["id"])["id"].to_pylist()
    if ids != [j.example.id for j in batch]:
        raise DataError(f"{path} holds other examples than this run would put there; the data file changed, use a new --out")


# --- one batch --------------------------------------------------------------------------------
def run_batch(
    batch: list[Job], model, tokenizer, config: RunConfig, out: Path, views: int = VIEW_LIMIT
) -> dict[str, pa.Table]:
    """Trace one batch, answer, score every method at both levels: {examples, attribution} tables."""
    import attnflow

    prompts = [j.prompt for j in batch]
    teacher = config.mode == "teacher"
    tr = attnflow.trace(
        model,
        [p.input_ids for p in prompts],
        tokenizer=tokenizer,
        max_new_tokens=None if teacher else config.new_tokens,
        completions=[j.completion for j in batch] if teacher else None,
        heads="mean",
        dtype=torch.float32,
        batch_size=len(batch),
        progress=False,
        spans=[p.spans for p in prompts],
    )
    stop = set(tokenizer.all_special_ids)
    answers = [_answer_ids(tr, b, stop) for b in range(len(batch))]
    rows, mask = answer_rows(tr.prompt_lengths, [len(a) for a in answers], tr.pad_offsets)
    scores = {k: v.double().cpu() for k, v in key_scores(tr.patterns, tr.attention_mask, rows, mask).items()}
    ex_rows, attr_rows = [], []
    for b, job in enumerate(batch):
        text = tokenizer.decode(answers[b], skip_special_tokens=True).strip()
        prediction = text.splitlines()[0].strip() if text else ""
        ex_rows.append(example_row(job, prediction, len(answers[b]), teacher))
        attr_rows += attribution_rows(job, tr.pad_offsets[b], {k: v[b] for k, v in scores.items()})
    write_views(tr, batch, rows, mask, out, views)
    return {"examples": examples_table(ex_rows), "attribution": attribution_table(attr_rows)}


def _answer_ids(tr, b: int, stop: set[int]) -> list[int]:
    """The completion's token ids up to (not including) the first special token."""
    ids = tr.input_ids[b, tr.pad_offsets[b] + tr.prompt_lengths[b] :].tolist()
    for n, t in enumerate(ids):
        if t in stop:
            return ids[:n]
    return ids


def example_row(job: Job, prediction: str | None, answer_tokens: int | None, teacher: bool) -> dict:
    ex, p = job.example, job.prompt
    generate = prediction is not None and not teacher
    return {
        "index": ex.index,
        "id": ex.id,
        "status": job.status,
        "reason": job.reason,
        "question": ex.question,
        "answer": ex.answer,
        "prediction": prediction if generate else None,
        "em": M.exact_match(prediction, ex.answer) if generate else None,
        "f1": M.f1_score(prediction, ex.answer) if generate else None,
        "prompt_tokens": len(p) if p is not None else None,
        "answer_tokens": answer_tokens,
        "paragraphs": [q.title for q in ex.paragraphs],
        "gold_paragraphs": [q.title in ex.gold_titles for q in ex.paragraphs],
        "sentences": [f"{q.title} [{i}]" for q in ex.paragraphs for i in range(len(q.sentences))],
        "sentence_text": [s.strip() for q in ex.paragraphs for s in q.sentences],
        "gold_sentences": [(q.title, i) in set(ex.supporting) for q in ex.paragraphs for i in range(len(q.sentences))],
    }


def attribution_rows(job: Job, pad: int, scores: dict[str, torch.Tensor]) -> list[dict]:
    """One row per (level, method) of one example, with its span scores and metrics."""
    p, ex = job.prompt, job.example
    rows = []
    for level, spans, gold in (
        ("sentence", p.sentence_spans, p.gold_sentences),
        ("paragraph", p.paragraph_spans, p.gold_paragraphs),
    ):
        starts = torch.tensor([[s.start + pad for s in spans]])
        ends = torch.tensor([[s.end + pad for s in spans]])
        for name in METHOD_NAMES:
            if name == "random":  # the exact expectation over random rankings, not one draw
                values, metrics = random_scores(len(spans)), M.random_expectation(len(spans), int(gold.sum()))
            else:
                values = span_sums(scores[name][None], starts, ends)[0].numpy()
                metrics = M.example_metrics(values, gold)
            rows.append(
                {"index": ex.index, "id": ex.id, "level": level, "method": name, "scores": values.tolist()} | metrics
            )
    return rows


# --- tables ------------------------------------------------------------------------------------
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


def examples_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=EXAMPLE_SCHEMA)


def attribution_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=ATTRIBUTION_SCHEMA)


def skipped_rows(jobs: list[Job], problems: list[Problem]) -> list[dict]:
    rows = [example_row(j, None, None, False) for j in jobs if j.status != "ok"]
    for pr in problems:
        rows.append({"index": pr.index, "id": pr.id, "status": "malformed", "reason": pr.reason})
    return rows


def collect(parts: Path, todo: list[list[Job]], jobs: list[Job], problems: list[Problem]) -> tuple[pa.Table, pa.Table]:
    """The run's full tables: committed parts plus skipped rows, sorted by (index, level, method order)."""
    ex = [pq.read_table(parts / part_name(b) / "examples.parquet", schema=EXAMPLE_SCHEMA) for b in todo]
    at = [pq.read_table(parts / part_name(b) / "attribution.parquet", schema=ATTRIBUTION_SCHEMA) for b in todo]
    ex.append(examples_table(skipped_rows(jobs, problems)))
    return sort_examples(pa.concat_tables(ex)), sort_attribution(pa.concat_tables(at) if at else attribution_table([]))


def sort_examples(t: pa.Table) -> pa.Table:
    return t.take(pa.array(np.argsort(t["index"].to_numpy(), kind="stable"))).combine_chunks()


def sort_attribution(t: pa.Table) -> pa.Table:
    level = np.array([LEVELS.index(x) for x in t["level"].to_pylist()], dtype=np.int64)
    method = np.array([METHOD_NAMES.index(x) for x in t["method"].to_pylist()], dtype=np.int64)
    order = np.lexsort((method, level, t["index"].to_numpy()))
    return t.take(pa.array(order)).combine_chunks()


def write_table(table: pa.Table, path: Path) -> None:
    with _io.atomic_path(path) as tmp:
        pq.write_table(table, tmp)


# --- attention views ----------------------------------------------------------------------------
def write_views(tr, batch: list[Job], rows, mask, out: Path, limit: int) -> None:
    """One offline attention view per example with index < `limit`, with its answer rows' rollout.

    Written before the batch's part is committed, so a committed part has its views.
    """
    from attnflow import flow
    from attnflow.exporters import to_html

    for b, job in enumerate(batch):
        if job.example.index >= limit:
            continue
        item = tr.item(b)
        q = (rows[b][mask[b]] - tr.pad_offsets[b]).unsqueeze(0)  # [1, rows], unpadded
        composed = {
            name: (flow.compose(item.patterns, method, rows=q, exclude_keys=(0,) if sink else ()), q)
            for name, method, sink in (("rollout", "rollout", False), ("rollout/nosink", "rollout", True))
        }
        to_html(item, out / "views" / f"{job.example.index:09d}", flow=composed)


# --- command line -----------------------------------------------------------------------------
def run_eval_command(args) -> int:
    """`attnflow eval hotpotqa|demo`: evaluate, write the report, print the summary table."""
    config = config_from_args(args)
    out = Path(args.out)
    check_out(out, config, args.resume)  # before the slow part
    examples, problems = select_examples(config)
    for pr in problems[:20]:
        print(f"attnflow: skipping malformed example {pr.id} (row {pr.index}): {pr.reason}", file=sys.stderr)
    if len(problems) > 20:
        print(f"attnflow: ... and {len(problems) - 20} more malformed examples", file=sys.stderr)
    model, tokenizer = load_model(config)
    facts = evaluate(
        examples,
        problems,
        model,
        tokenizer,
        out,
        config,
        resume=args.resume,
        progress=not args.no_progress,
        views=getattr(args, "views", VIEW_LIMIT),
    )
    print(facts["text"])
    return 0


def merge_command(args) -> int:
    """`attnflow eval merge SHARD_DIRS... --out DIR`: concatenate finished shard runs and report."""
    from attnflow.eval.report import write_report

    configs, ex, at = [], [], []
    for d in map(Path, args.shards):
        if not (d / "config.json").is_file():
            raise DataError(f"{d} holds no evaluation (no config.json); pass the --out directories of the shard runs")
        if not (d / "examples.parquet").is_file() or not (d / "attribution.parquet").is_file():
            raise DataError(f"shard run {d} is not finished; rerun its command with --resume, then merge")
        configs.append(json.loads((d / "config.json").read_text()))
        ex.append(pq.read_table(d / "examples.parquet", schema=EXAMPLE_SCHEMA))
        at.append(pq.read_table(d / "attribution.parquet", schema=ATTRIBUTION_SCHEMA))
    base = {k: v for k, v in configs[0].items() if k != "shard"}
    for d, c in zip(args.shards, configs):
        if {k: v for k, v in c.items() if k != "shard"} != base:
            raise DataError(f"shard run {d} has other settings than {args.shards[0]}; merge runs of one evaluation")
    shards = [parse_shard(c["shard"]) for c in configs]
    names = [c["shard"] for c in configs]
    if len({n for _, n in shards}) != 1 or any(c["shard"] is None for c in configs):
        raise DataError(f"shards {names} do not split one run; merge the --shard i/N runs of one N")
    if len(set(shards)) != len(shards):
        raise DataError(f"the same shard is given twice ({names}); give each shard once")
    missing = sorted(set(range(shards[0][1])) - {i for i, _ in shards})
    if missing:
        print(f"attnflow: warning: merging without shards {missing} of {shards[0][1]}", file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    merged = dict(base, shard=None, merged_from=[c["shard"] for c in configs])
    _io.write_json(out / "config.json", merged)
    examples_t, attribution_t = sort_examples(pa.concat_tables(ex)), sort_attribution(pa.concat_tables(at))
    write_table(examples_t, out / "examples.parquet")
    write_table(attribution_t, out / "attribution.parquet")
    facts = write_report(out, examples_t, attribution_t, merged, views_from=[Path(d) for d in args.shards])
    print(facts["text"])
    return 0
