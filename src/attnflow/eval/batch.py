"""One batch of an evaluation: trace it, read the answers, score every method at both levels.

Row t of a composed matrix produces token t+1, so an answer's scores come from
the rows before its tokens (`methods.answer_rows`); the rows' composed flow is
averaged (`methods.key_scores`) and summed over each sentence and paragraph.

    >>> tables = run_batch(batch, model, tokenizer, config, Path("runs/demo"), views=0)
    >>> tables["examples"].num_rows, tables["attribution"].num_rows     # 2 examples, 2 levels x 11 methods
    (2, 44)
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import torch

from attnflow.eval import metrics as M
from attnflow.eval.config import RunConfig
from attnflow.eval.datasets import Problem
from attnflow.eval.jobs import Job
from attnflow.eval.methods import METHOD_NAMES, answer_rows, key_scores, random_scores, span_sums
from attnflow.eval.store import attribution_table, examples_table
from attnflow.eval.views import write_views


def run_batch(batch: list[Job], model, tokenizer, config: RunConfig, out: Path, views: int) -> dict[str, pa.Table]:
    """Trace one batch, answer, score every method at both levels: {examples, attribution} tables.

    Writes the attention views of examples with index < `views` under `out/views/`.
    """
    from attnflow.tracers import trace

    prompts = [j.prompt for j in batch]
    teacher = config.mode == "teacher"
    tr = trace(
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
    answers = [answer_ids(tr, b, stop) for b in range(len(batch))]
    rows, mask = answer_rows(tr.prompt_lengths, [len(a) for a in answers], tr.pad_offsets)
    targets = [(r[m] - pad).tolist() for r, m, pad in zip(rows, mask, tr.pad_offsets)]  # unpadded rows
    scores = {k: v.double().cpu() for k, v in key_scores(tr, targets).items()}
    ex_rows, attr_rows = [], []
    for b, job in enumerate(batch):
        text = tokenizer.decode(answers[b], skip_special_tokens=True).strip()
        prediction = text.splitlines()[0].strip() if text else ""
        ex_rows.append(example_row(job, prediction, len(answers[b]), teacher))
        attr_rows += attribution_rows(job, tr.pad_offsets[b], {k: v[b] for k, v in scores.items()})
    write_views(tr, batch, targets, out, views)
    return {"examples": examples_table(ex_rows), "attribution": attribution_table(attr_rows)}


def answer_ids(tr, b: int, stop: set[int]) -> list[int]:
    """The completion's token ids up to (not including) the first special token."""
    ids = tr.input_ids[b, tr.pad_offsets[b] + tr.prompt_lengths[b] :].tolist()
    for n, t in enumerate(ids):
        if t in stop:
            return ids[:n]
    return ids


def example_row(job: Job, prediction: str | None, answer_tokens: int | None, teacher: bool) -> dict:
    """The examples table's row of one job (`prediction=None`: not evaluated)."""
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


def skipped_table(jobs: list[Job], problems: list[Problem]) -> pa.Table:
    """The examples rows of jobs not evaluated (too long) and of malformed rows."""
    rows = [example_row(j, None, None, False) for j in jobs if j.status != "ok"]
    for pr in problems:
        rows.append({"index": pr.index, "id": pr.id, "status": "malformed", "reason": pr.reason})
    return examples_table(rows)
