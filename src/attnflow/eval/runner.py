"""The resumable evaluation runner behind `attnflow eval hotpotqa|demo`.

    attnflow eval demo --out runs/demo --limit 200
    attnflow eval hotpotqa --model M --data hotpot_dev_distractor_v1.json --out runs/hp --shard 0/4
    attnflow eval merge runs/hp-0 runs/hp-1 runs/hp-2 runs/hp-3 --out runs/hp

Work is cut into fixed batches of `batch_size` consecutive valid examples
(`jobs.py`).  Each finished batch is committed as one directory
`parts/part-<index>/` (`examples.parquet`, `attribution.parquet`), built under a
temporary name and renamed into place, so a kill loses at most the batch in
flight.  `resume=True` skips the committed batches; since batches are cut the
same way and every computation is deterministic (the random baseline is an
exact expectation), the final tables equal those of an uninterrupted run.
`config.json` records the settings; resuming with different ones is refused
(`store.py`).

Out directory when done:

    config.json          settings of the run
    parts/               committed batches (kept, so a finished run can be extended or audited)
    examples.parquet     one row per selected example: status ok | too_long | malformed, answer, EM/F1, gold
    attribution.parquet  one row per (ok example, level, method): span scores and every metric
    summary.parquet, summary.md, precision_recall.png, explorer.html, views/<index>/  (report.py)

    >>> config = RunConfig(task="demo", limit=200)
    >>> examples, problems = select_examples(config)
    >>> model, tokenizer = load_model(config)
    >>> facts = evaluate(examples, problems, model, tokenizer, "runs/demo", config)
    >>> print(facts["text"])
"""

from __future__ import annotations

from pathlib import Path

from attnflow.eval.batch import run_batch, skipped_table
from attnflow.eval.config import RunConfig
from attnflow.eval.datasets import Problem, QAExample
from attnflow.eval.jobs import batches, part_name, prepare, select_examples
from attnflow.eval.store import check_part, collect, commit_part, prepare_out, write_tables

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
) -> dict:
    """Evaluate `examples` into `out` (see the module docstring); returns the report's facts.

    `views`: write an attention view (views/<index>/index.html) for examples with index < views.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    prepare_out(out, config, resume)
    jobs = prepare(examples, tokenizer, config, config.max_context_tokens or max_positions(model))
    todo = batches(jobs, config.batch_size)
    parts = out / "parts"
    done = [b for b in todo if (parts / part_name(b)).is_dir()]
    for b in done:
        check_part(parts / part_name(b), b)
    bar = tqdm(
        total=sum(len(b) for b in todo), initial=sum(len(b) for b in done), desc="eval", unit="ex", disable=not progress
    )
    for batch in todo:
        if (parts / part_name(batch)).is_dir():
            continue
        commit_part(parts, batch, run_batch(batch, model, tokenizer, config, out, views))
        bar.update(len(batch))
    bar.close()
    examples_t, attribution_t = collect(parts, todo, skipped_table(jobs, problems))
    write_tables(out, examples_t, attribution_t)
    if not report:
        return {}
    from attnflow.eval.report import write_report

    return write_report(out, examples_t, attribution_t, config.to_json())
