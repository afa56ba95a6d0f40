"""Side passes of an evaluation: content-free-query calibration (`--calibrate`) and the permutation check (`--shuffle-check`).

Content-free calibration (In-Context Reranking, Chen et al. 2024): each example is also
recorded with its question replaced by a content-free one (`RunConfig.calibrate`, "N/A"),
the same documents in the same order and the same completion (the gold answer in teacher
mode, the generated one in generate mode), and every attention method gains a calibrated
variant `<method>/cal` whose span scores are the real pass's minus the content-free pass's.
The content-free prompt is `prompts.build_prompt` of the example with the question
replaced, so it is rendered and tokenised like the real one.

The permutation check: the first `RunConfig.shuffle_check` evaluated examples (by index)
are also recorded with their documents shuffled (`shuffled_order`, seeded by the example's
index; with `--calibrate` also the shuffled content-free prompt).  Per method, the
Spearman correlation of a document's score across the two orders says whether the method
follows the document (content, near 1) or the slot it sits in (position, near 0 or below);
`top1_same` is how often the top document stays the same document, `top1_same_position`
how often it stays in the same slot.  One row per (example, method) goes to `shuffle.parquet`.

Each side prompt is recorded on its own after the real pass, forcing the real pass's
completion (teacher mode: the gold answer; generate mode: the generated one), so memory
stays that of one real pass (every head is recorded: SmolLM2 at 2,000 tokens is 2.2 GB).
Their cost goes to the examples table (`COST_FIELDS`): tokens and seconds.

    >>> shuffled_order(5, index=0), shuffled_order(5, index=0), shuffled_order(1, index=0)
    ([2, 1, 0, 4, 3], [2, 1, 0, 4, 3], [0])
    >>> spearman(np.array([0.1, 0.5, 0.3]), np.array([0.2, 0.6, 0.4])), spearman(np.array([1.0, 2.0]), np.array([2.0, 1.0]))
    (1.0, -1.0)
    >>> ALL_NAMES[:5]
    ('random', 'raw', 'raw/cal', 'raw/nosink', 'raw/nosink/cal')
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq

from attnflow import _io
from attnflow.eval import metrics as M
from attnflow.eval.jobs import Job
from attnflow.eval.methods import ATTENTION_NAMES, REFERENCE_NAMES

CAL = "/cal"
SHUFFLE_SEED = 19  # with the example's index: the shuffled order of its documents
# every method name in report order: each attention method followed by its calibrated variant
ALL_NAMES = tuple(x for m in ATTENTION_NAMES for x in ((m,) if m == "random" else (m, m + CAL))) + REFERENCE_NAMES  # no "loo/cal"
COST_FIELDS = [
    ("real_pass_tokens", pa.int64()),  # prompt + completion tokens of the real pass (with side passes only)
    ("real_pass_seconds", pa.float64()),
    ("calibrate_tokens", pa.int64()),  # the content-free pass
    ("calibrate_seconds", pa.float64()),
    ("shuffle_tokens", pa.int64()),  # the shuffled pass(es)
    ("shuffle_seconds", pa.float64()),
]
SHUFFLE_SCHEMA = pa.schema(
    [
        ("index", pa.int64()),
        ("id", pa.string()),
        ("method", pa.string()),
        ("order", pa.list_(pa.int64())),  # original index of the document in each slot of the shuffled prompt
        ("scores", pa.list_(pa.float64())),  # the shuffled pass's document scores, in the original order
        ("spearman", pa.float64()),
        ("top1_same", pa.float64()),
        ("top1_same_position", pa.float64()),
    ]
)
SHUFFLE_METRICS = ("spearman", "top1_same", "top1_same_position")


def shuffled_order(n: int, index: int) -> list[int]:
    """A seeded permutation of n documents, not the identity when n > 1: slot i holds document order[i]."""
    rng = np.random.default_rng([SHUFFLE_SEED, index])
    while True:
        order = rng.permutation(n).tolist()
        if n < 2 or order != list(range(n)):
            return order


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (ties averaged); NaN when fewer than 2 values, a NaN, or a constant side."""
    from scipy.stats import rankdata

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or np.isnan(a).any() or np.isnan(b).any():
        return float("nan")
    ra, rb = rankdata(a) - (len(a) + 1) / 2, rankdata(b) - (len(b) + 1) / 2
    denom = np.sqrt((ra**2).sum() * (rb**2).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def mark_shuffle(jobs: list[Job], k: int) -> None:
    """Mark the first k valid jobs (by example index) for the permutation check (`job.extra["shuffle"]`)."""
    for job in sorted((j for j in jobs if j.status == "ok"), key=lambda j: j.example.index)[:k]:
        job.extra["shuffle"] = True


# --- the side passes of one batch --------------------------------------------------------------
@dataclass
class Side:
    """One side prompt: `kind` content-free | shuffled | shuffled/content-free, of the batch's example `of`."""

    job: Job
    of: int
    kind: str
    order: list[int]  # shuffled: original index of each slot; else the identity


class SidePasses:
    """The side prompts of a batch (none without --calibrate and --shuffle-check) and what they add to its tables."""

    def __init__(self, batch: list[Job], tokenizer, config):
        from attnflow.eval.prompts import build_prompt, template_text

        self.config, self.batch, self.sides = config, batch, []
        template = template_text(config.prompt_template) if config.task == "hotpotqa" else None
        build = lambda ex: build_prompt(ex, tokenizer, None if config.chat_template else False, template, config.system)  # noqa: E731
        for b, job in enumerate(batch):
            ex = job.example
            n = len(ex.paragraphs)
            variants = []
            if config.calibrate is not None:
                variants.append(("content-free", replace(ex, question=config.calibrate), list(range(n))))
            if job.extra.get("shuffle"):
                order = shuffled_order(n, ex.index)
                moved = replace(ex, paragraphs=tuple(ex.paragraphs[i] for i in order))
                variants.append(("shuffled", moved, order))
                if config.calibrate is not None:
                    variants.append(("shuffled/content-free", replace(moved, question=config.calibrate), order))
            for kind, example, order in variants:
                self.sides.append(Side(Job(example, build(example), job.completion), b, kind, order))

    def __len__(self) -> int:
        return len(self.sides)

    @property
    def jobs(self) -> list[Job]:
        return [s.job for s in self.sides]

    def targets(self, answers, sides=None) -> list[list[int]]:
        """Each side prompt's rows producing its example's answer span: the real rows moved by the prompt-length difference."""
        sides = self.sides if sides is None else sides
        return [[r - len(self.batch[s.of].prompt) + len(s.job.prompt) for r in answers[s.of].rows] for s in sides]

    def finish(self, tr, answers, ex_rows: list[dict], attr_rows: list[dict], seconds: float, record) -> dict[str, pa.Table]:
        """Score the side passes; add the calibrated rows to `attr_rows` and the costs to `ex_rows`; {"shuffle": table}.

        Each side prompt is recorded by `record(prompts, completions)` on its own, forcing
        the real pass's completion (teacher mode: the gold answer; generate mode: the
        generated one, which `tr` holds), and scored like the real pass (`batch.score`).
        One at a time, so memory stays that of one real pass; on CPU batching saves little.
        `seconds`: the real pass's trace time.
        """
        from attnflow.eval.batch import attribution_rows, score

        if not self.sides:
            return {}
        B = len(self.batch)
        real_tokens = tr.lengths[:B]  # prompt + completion tokens of each pass
        real_seconds = [seconds * t / sum(real_tokens) for t in real_tokens]
        rows, tokens, side_seconds = {}, [], []
        for s in self.sides:
            completion = tr.input_ids[s.of, tr.pad_offsets[s.of] + tr.prompt_lengths[s.of] :].tolist()
            s.job.completion = completion
            clock = time.perf_counter()
            side_tr = record([s.job.prompt], [completion])
            scores, side_tr = score(side_tr, [s.job], self.targets(answers, [s]))
            side_seconds.append(time.perf_counter() - clock)
            tokens.append(side_tr.lengths[0])
            rows[(s.of, s.kind)] = attribution_rows(s.job, side_tr.pad_offsets[0], {m: v[0] for m, v in scores.items()})
        real = {}
        for r in attr_rows:
            real.setdefault(_index_of(self.batch, r["index"]), []).append(r)
        shuffle = []
        for b, job in enumerate(self.batch):
            mine = real.get(b, [])
            if (b, "content-free") in rows:
                attr_rows += calibrated_rows(mine, rows[(b, "content-free")], job.prompt)
            if (b, "shuffled") in rows:
                s = next(s for s in self.sides if s.of == b and s.kind == "shuffled")
                moved = rows[(b, "shuffled")]
                if (b, "shuffled/content-free") in rows:
                    moved = moved + calibrated_rows(moved, rows[(b, "shuffled/content-free")], s.job.prompt)
                    mine = mine + calibrated_rows(mine, rows[(b, "content-free")], job.prompt)
                shuffle += shuffle_rows(mine, moved, s.order)
            cost = dict.fromkeys(name for name, _ in COST_FIELDS)
            cost["real_pass_tokens"], cost["real_pass_seconds"] = real_tokens[b], real_seconds[b]
            for k, s in enumerate(self.sides):
                if s.of == b:
                    which = "calibrate" if s.kind == "content-free" else "shuffle"
                    cost[f"{which}_tokens"] = (cost[f"{which}_tokens"] or 0) + tokens[k]
                    cost[f"{which}_seconds"] = (cost[f"{which}_seconds"] or 0.0) + side_seconds[k]
            ex_rows[b] |= cost
        return {"shuffle": shuffle_table(shuffle)} if self.config.shuffle_check else {}


def _index_of(batch: list[Job], index: int) -> int:
    return next(b for b, j in enumerate(batch) if j.example.index == index)


def calibrated_rows(real: list[dict], free: list[dict], prompt) -> list[dict]:
    """`<method>/cal` rows: the real rows' span scores minus the content-free rows' (same level and method), with metrics."""
    gold = {"sentence": prompt.gold_sentences, "paragraph": prompt.gold_paragraphs}
    by = {(r["level"], r["method"]): r for r in free}
    out = []
    for r in real:
        if r["method"] == "random" or r["method"].endswith(CAL):
            continue
        values = np.asarray(r["scores"], np.float64) - np.asarray(by[(r["level"], r["method"])]["scores"], np.float64)
        out.append({"index": r["index"], "id": r["id"], "level": r["level"], "method": r["method"] + CAL,
                    "scores": values.tolist()} | M.example_metrics(values, gold[r["level"]]))  # fmt: skip
    return out


def shuffle_rows(real: list[dict], moved: list[dict], order: list[int]) -> list[dict]:
    """One row per method: the paragraph scores of the shuffled pass back in the original order, and their agreement."""
    by = {r["method"]: r for r in moved if r["level"] == "paragraph"}
    out = []
    for r in real:
        if r["level"] != "paragraph" or r["method"] not in by:
            continue
        n = len(order)
        back = np.empty(n)
        back[order] = np.asarray(by[r["method"]]["scores"], np.float64)  # slot i holds document order[i]
        a = np.asarray(r["scores"], np.float64)
        if r["method"] == "random":  # exact expectations of two independent random rankings
            rho, same, same_pos = 0.0, 1.0 / n, 1.0 / n
        else:
            top_real, top_slot = int(M.ranking(a)[0]), int(M.ranking(back[order])[0])
            rho, same, same_pos = spearman(a, back), float(order[top_slot] == top_real), float(top_slot == top_real)
        out.append({"index": r["index"], "id": r["id"], "method": r["method"], "order": list(order), "scores": back.tolist(),
                    "spearman": rho, "top1_same": same, "top1_same_position": same_pos})  # fmt: skip
    return out


def shuffle_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SHUFFLE_SCHEMA)


# --- the run's shuffle table ----------------------------------------------------------------------
def collect_shuffle(done: dict[int, Path], jobs: list[Job]) -> pa.Table:
    """The committed shuffle rows of `jobs`' examples, sorted by (index, method order); empty when none."""
    wanted = pa.array(sorted(j.example.index for j in jobs if j.example.index in done), pa.int64())
    files = [d / "shuffle.parquet" for d in sorted({done[i] for i in wanted.to_pylist()})]
    tables = [pq.read_table(f, schema=SHUFFLE_SCHEMA) for f in files if f.is_file()]
    tables = [t.filter(pa.compute.is_in(t["index"], value_set=wanted)) for t in tables]
    return sort_shuffle(pa.concat_tables(tables) if tables else shuffle_table([]))


def sort_shuffle(t: pa.Table) -> pa.Table:
    method = np.array([ALL_NAMES.index(x) for x in t["method"].to_pylist()], dtype=np.int64)
    return t.take(pa.array(np.lexsort((method, t["index"].to_numpy())))).combine_chunks()


def read_shuffle(dirs: list[Path]) -> pa.Table | None:
    """The shuffle tables of finished runs (shards) concatenated; None when none has one."""
    tables = [pq.read_table(d / "shuffle.parquet", schema=SHUFFLE_SCHEMA) for d in dirs if (d / "shuffle.parquet").is_file()]
    return sort_shuffle(pa.concat_tables(tables)) if tables else None


def write_shuffle(out: Path, table: pa.Table | None) -> None:
    if table is not None and table.num_rows:
        with _io.atomic_path(out / "shuffle.parquet") as tmp:
            pq.write_table(table, tmp)


# --- the report -------------------------------------------------------------------------------------
def summary_rows(examples: pa.Table, shuffle: pa.Table | None) -> list[dict]:
    """Summary rows: subset "shuffle" (per method: spearman, top1_same, top1_same_position) and subset "cost"
    (per pass: mean tokens and seconds per example)."""
    out = []
    if shuffle is not None and shuffle.num_rows:
        method_col = np.array(shuffle["method"].to_pylist(), dtype=object)
        for method in ALL_NAMES:
            sel = method_col == method
            if not sel.any():
                continue
            for metric in SHUFFLE_METRICS:
                mean, lo, hi, n = M.bootstrap_ci(shuffle[metric].to_numpy(zero_copy_only=False).astype(np.float64)[sel])
                out.append(dict(subset="shuffle", level="paragraph", method=method, metric=metric,
                                mean=mean, ci_low=lo, ci_high=hi, n=n))  # fmt: skip
    names = set(examples.column_names)
    for method, prefix in (("real", "real_pass"), ("content-free", "calibrate"), ("shuffle", "shuffle")):
        for metric in ("tokens", "seconds"):
            col = f"{prefix}_{metric}"
            if col not in names:
                continue
            v = np.array([np.nan if x is None else x for x in examples[col].to_pylist()], dtype=np.float64)
            if len(v) and not np.isnan(v).all():
                mean, lo, hi, n = M.bootstrap_ci(v)
                out.append(dict(subset="cost", level="-", method=method, metric=metric, mean=mean, ci_low=lo, ci_high=hi, n=n))
    return out


def report_parts(summary: pa.Table, config: dict) -> list[str]:
    """The cost lines and the shuffle-check table for the printed report (nothing without side passes)."""
    rows = summary.to_pylist()
    cost = {(r["method"], r["metric"]): r for r in rows if r["subset"] == "cost"}
    parts = []
    real_t, real_s = cost.get(("real", "tokens")), cost.get(("real", "seconds"))
    for method, label in (("content-free", f"content-free pass (--calibrate {config.get('calibrate')!r})"),
                          ("shuffle", "shuffled pass (--shuffle-check)")):  # fmt: skip
        t, s = cost.get((method, "tokens")), cost.get((method, "seconds"))
        if t is None:
            continue
        line = f"{label}: {t['n']} examples, {t['mean']:.0f} tokens and {s['mean']:.3f} s per example"
        if real_t is not None and real_s is not None and real_s["mean"] > 0:
            line += f" ({t['mean'] / real_t['mean']:.2f}x the real pass's tokens, {s['mean'] / real_s['mean']:.2f}x its time)"
        parts.append(line)
    if parts and config.get("mode") == "teacher":
        parts.append("(teacher mode: the side passes are batched with the real pass; seconds are that call's time split by tokens)")
    if any(r["subset"] == "shuffle" for r in rows):
        n = max(r["n"] for r in rows if r["subset"] == "shuffle")
        parts.append(
            f"\nshuffle check, {n} examples with their documents shuffled: mean per-example Spearman correlation of a"
            " document's score across the two orders (content-following methods near 1), how often the top-1 document"
            " stays the same document, and how often it stays in the same slot (position-following)"
        )
        parts.append(shuffle_markdown(summary))
    return parts


def shuffle_markdown(summary: pa.Table) -> str:
    """Markdown: one row per method, `mean [low, high]` of spearman, top1_same, top1_same_position."""
    cells = {(r["method"], r["metric"]): r for r in summary.to_pylist() if r["subset"] == "shuffle"}
    methods = [m for m in ALL_NAMES if (m, "spearman") in cells]
    lines = ["| method | Spearman | top-1 same doc | top-1 same slot |", "|---|---|---|---|"]
    for m in methods:
        vals = []
        for metric in SHUFFLE_METRICS:
            r = cells[(m, metric)]
            vals.append("-" if r["n"] == 0 else f"{r['mean']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]")
        lines.append(f"| {m} | " + " | ".join(vals) + " |")
    return "\n".join(lines)
