"""The resumable evaluation runner behind `attnflow eval hotpotqa|demo`.

    attnflow eval demo --out runs/demo --limit 200
    attnflow eval hotpotqa --model M --data hotpot_dev_distractor_v1.json --out runs/hp --shard 0/4
    attnflow eval merge runs/hp-0 runs/hp-1 runs/hp-2 runs/hp-3 --out runs/hp

Work is cut into fixed batches of `batch_size` consecutive valid examples
(`jobs.py`).  Each finished batch is committed as one directory
`parts/part-<index>/` (`examples.parquet`, `attribution.parquet`), built under a
temporary name and renamed into place, so a kill loses at most the batch in
flight.  `resume=True` skips the examples already committed; since batches are
cut the same way and every computation is deterministic (the random baseline is
an exact expectation), the final tables equal those of an uninterrupted run.
`config.json` records the settings; resuming with different ones is refused
(`store.py`), except a run that grows: a larger `limit` (or a shard holding the
old one's rows) evaluates only the new examples and rewrites tables and summary;
a smaller one is refused, saying why.  (With batch_size > 1 the new examples are
batched among themselves, so their padding, and float rounding, may differ from a
fresh run's; with batch_size 1 the tables are equal.)

Out directory when done:

    config.json          settings of the run
    parts/               committed batches (kept, so a finished run can be extended or audited)
    examples.parquet     one row per selected example: status ok | too_long | malformed, answer, EM/F1, gold
    attribution.parquet  one row per (ok example, level, method): span scores and every metric
    shuffle.parquet      --shuffle-check K: one row per (shuffled example, method) (eval/calibrate.py)
    removals.parquet     LOO: the answer's log-prob with each removed paragraph set (eval/loo.py)
    features.parquet     AT2 features per example; at2_heads.safetensors: the weights fit on all (eval/at2.py)
    costs.parquet        seconds and forward passes per example (trace, methods, LOO), apart: wall-clock varies
    summary.parquet, summary.md, precision_recall.png, explorer.html, views/<index>/  (report.py)

    >>> config = RunConfig(task="demo", limit=2, seed=0)    # 2 examples keep this example to a few seconds
    >>> examples, problems = select_examples(config)
    >>> model, tokenizer = load_model(config)
    >>> facts = evaluate(examples, problems, model, tokenizer, "runs/demo", config, progress=False, views=0)
    >>> print(facts["text"])
    2 examples evaluated (generate mode); skipped: 0 too long, 0 malformed
    answer (extracted): EM 1.000 [1.000, 1.000], F1 1.000 [1.000, 1.000], CONTAINS 1.000 [1.000, 1.000]
    answer (first line, before extraction): EM 1.000 [1.000, 1.000], F1 1.000 [1.000, 1.000], CONTAINS 1.000 [1.000, 1.000]
    attribution over the extracted answer's tokens (examples.parquet: answer_start/answer_end/answer_span)
    views: 0 written, 0.0 MB (budget 200 MB, --views 0)
    note: flow = 2^L x rollout(alpha 0.5) and flow_normalized = rollout(alpha 0.5), so the three rank alike
    loo: the drop in the answer span's log-prob (forced in) when a document is removed; spearman_loo: ...
    cost per example (mean): attention trace ... s, all attention methods ... s; loo ... s (4.5 forwards, 1 full + 1 per document, prefix KV reused); top-2 removals ... s (5.5 forwards)
    at2: non-negative [layer, head] weights fit by scipy nnls to the LOO drops ... 2-fold CV by example: held-out ...
    <BLANKLINE>
    paragraph level, 2 examples (mean [95% bootstrap CI]; '/nosink' excludes the first token)
    | method | P@1 | P@2 | R@2 | R@5 | MRR | nDCG | AUROC | Spearman(LOO) | drop@1 | drop@2 |
    |---|---|---|---|---|---|---|---|---|---|---|
    | random | 0.350 [0.200, 0.500] | 0.350 [0.200, 0.500] | 0.700 [0.400, 1.000] | 1.000 [1.000, 1.000] | 0.603 [0.457, 0.750] | 0.703 [0.590, 0.815] | 0.500 [0.500, 0.500] | 0.000 [0.000, 0.000] | 1.918 [1.036, 2.801] | 5.878 [1.697, 10.058] |
    | raw | 0.500 [0.000, 1.000] | 0.250 [0.000, 0.500] | 0.500 [0.000, 1.000] | 1.000 [1.000, 1.000] | 0.600 [0.200, 1.000] | 0.693 [0.387, 1.000] | 0.500 [0.000, 1.000] | 0.150 [-0.700, 1.000] | 2.798 [-0.006, 5.601] | 5.028 [-0.002, 10.058] |
    ...
    | rollout | 0.500 [0.000, 1.000] | 0.500 [0.500, 0.500] | 1.000 [1.000, 1.000] | 1.000 [1.000, 1.000] | 0.750 [0.500, 1.000] | 0.815 [0.631, 1.000] | 0.875 [0.750, 1.000] | 0.350 [-0.300, 1.000] | 2.798 [-0.006, 5.601] | 5.079 [0.099, 10.058] |
    ...
    | loo | 1.000 [1.000, 1.000] | 0.500 [0.500, 0.500] | 1.000 [1.000, 1.000] | 1.000 [1.000, 1.000] | 1.000 [1.000, 1.000] | 1.000 [1.000, 1.000] | 1.000 [1.000, 1.000] | 1.000 [1.000, 1.000] | 5.391 [5.181, 5.601] | 7.411 [4.765, 10.058] |
    ...
"""

from __future__ import annotations

import sys
from pathlib import Path

from attnflow.eval.batch import run_batch, skipped_table
from attnflow.eval.calibrate import collect_shuffle, mark_shuffle, write_shuffle
from attnflow.eval.config import RunConfig
from attnflow.eval.datasets import Problem, QAExample
from attnflow.eval.jobs import batches, part_name, prepare, select_examples
from attnflow.eval.at2 import with_at2
from attnflow.eval.store import collect, collect_table, commit_part, committed, extra_schemas, prepare_out, write_tables
from attnflow.eval.views import DEFAULT_VIEW_BYTES, ViewBudget, estimate_bytes, views_summary

__all__ = ["RunConfig", "evaluate", "load_model", "max_positions", "select_examples"]

VIEW_LIMIT = 50  # default: attention views for the examples with index < 50


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
    """The model's `max_position_embeddings`, or None when its config has none."""
    cfg = getattr(getattr(model, "_module", model), "config", None)
    return getattr(cfg, "max_position_embeddings", None)


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
    views_bytes: int | None = DEFAULT_VIEW_BYTES,
) -> dict:
    """Evaluate `examples` into `out` (see the module docstring); returns the report's facts.

    `views`: write an attention view (views/<index>/index.html) for examples with index < views,
    while `views/` stays within `views_bytes` bytes (None: no limit); the estimate is printed first.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    prepare_out(out, config, resume)
    jobs = prepare(examples, tokenizer, config, config.max_context_tokens or max_positions(model))
    mark_shuffle(jobs, config.shuffle_check)
    parts = out / "parts"
    done = committed(parts, jobs)
    todo = batches(jobs, config.batch_size, set(done))
    budget = ViewBudget(out, views, views_bytes)
    announce_views(todo, model, config, budget, progress)
    n_ok = sum(j.status == "ok" for j in jobs)
    bar = tqdm(total=n_ok, initial=n_ok - sum(len(b) for b in todo), desc="eval", unit="ex", disable=not progress)
    for batch in todo:
        commit_part(parts, batch, run_batch(batch, model, tokenizer, config, out, budget))
        done |= {j.example.index: parts / part_name(batch) for j in batch}
        bar.update(len(batch))
    bar.close()
    examples_t, attribution_t = collect(done, jobs, skipped_table(jobs, problems))
    extra = {name: collect_table(done, jobs, name, schema) for name, schema in extra_schemas().items()}
    # AT2 is fit over every example of the run (held-out folds): recomputed whenever the tables are
    attribution_t, at2_facts = with_at2(out, examples_t, attribution_t, extra["features"], extra["removals"])
    write_tables(out, examples_t, attribution_t, extra)
    shuffle_t = collect_shuffle(done, jobs) if config.shuffle_check else None
    write_shuffle(out, shuffle_t)
    if not report:
        return {}
    from attnflow.eval.report import write_report

    candidates = [j.example.index for j in jobs if j.status == "ok"]
    facts = views_summary(out, [out], candidates, views, views_bytes)
    return write_report(out, examples_t, attribution_t, config.to_json(), views=facts, at2=at2_facts, costs=extra["costs"],
                        shuffle=shuffle_t)


def announce_views(todo, model, config: RunConfig, budget: ViewBudget, progress: bool) -> None:
    """Print the estimated size of the views this run will write, before writing any."""
    wanted = [j for b in todo for j in b if j.example.index < budget.count]
    if not wanted:
        return
    layers = num_layers(model)
    extra = config.new_tokens if config.mode == "generate" else 0
    sizes = [estimate_bytes(len(j.prompt) + len(j.completion or ()) + extra, layers) for j in wanted]
    limit = "no byte limit" if budget.max_bytes is None else f"budget {budget.max_bytes / 1e6:.0f} MB for views/"
    print(
        f"attnflow: views: {len(wanted)} examples wanted, estimated {sum(sizes) / 1e6:.1f} MB "
        f"({max(sizes) / 1e6:.1f} MB the largest); {limit} (--views N, --views-bytes B)",
        file=sys.stderr,
    )


def num_layers(model) -> int:
    cfg = getattr(getattr(model, "_module", model), "config", None)
    return int(getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", 1))
