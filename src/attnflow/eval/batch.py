"""One batch of an evaluation: trace it, read the answers, score every method at both levels.

Row t of a composed matrix produces token t+1, so an answer's scores come from
the rows before its tokens; only the answer span's tokens count (`read_answer`: the
extracted answer in generate mode, the gold answer in teacher mode).  The rows'
composed flow is averaged (`methods.key_scores`, one trace for every method) and
summed over each sentence and paragraph.

    >>> from attnflow.eval.datasets import demo_examples
    >>> from attnflow.eval.jobs import batches, prepare
    >>> config = RunConfig(task="demo")
    >>> batch, = batches(prepare(demo_examples(2, seed=0), tokenizer, config, limit_tokens=None), 2)
    >>> tables = run_batch(batch, model, tokenizer, config, Path("runs/demo"), views=0)
    >>> sorted(tables)
    ['attribution', 'costs', 'examples', 'features', 'removals']
    >>> tables["examples"].num_rows, tables["attribution"].num_rows     # 2 examples, 2 levels x 23 methods + loo
    (2, 94)
    >>> tables["examples"].select(["index", "answer", "prediction", "em"]).to_pylist()
    [{'index': 1, 'answer': 'banjo', 'prediction': 'banjo', 'em': 1.0},
     {'index': 0, 'answer': 'madrid', 'prediction': 'madrid', 'em': 1.0}]
    >>> row = tables["attribution"].to_pylist()[1]
    >>> row["level"], row["method"], row["scores"], row["mrr"]           # the gold sentence ranks first
    ('sentence', 'raw', [0.08, 0.11], 1.0)

The leave-one-out reference (`eval.loo`) and a method measured against it: example 0's
rollout ranks document 3 first, whose removal costs the answer nothing (drop@1), while
removing the gold document 2 drops its log-prob by 5.2:

    >>> rows = {(r["index"], r["method"]): r for r in tables["attribution"].to_pylist() if r["level"] == "paragraph"}
    >>> rows[0, "loo"]["scores"], [round(x, 2) for x in rows[0, "rollout"]["scores"]]
    ([-0.01, 5.18, -0.01, 0.0, 0.01], [0.09, 0.13, 0.17, 0.04, 0.05])
    >>> r = rows[0, "rollout"]; r["spearman_loo"], round(r["drop@1"], 2), round(r["drop@2"], 2)
    (-0.3, -0.01, 0.1)
    >>> tables["costs"].select(["index", "loo_forwards", "pair_forwards"]).to_pylist()  # demo: every pair removed
    [{'index': 1, 'loo_forwards': 3, 'pair_forwards': 1}, {'index': 0, 'loo_forwards': 6, 'pair_forwards': 10}]
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import torch

from attnflow.attribution import exclusion_mask
from attnflow.eval import metrics as M
from attnflow.eval.answers import answer_scores, locate, token_span
from attnflow.eval.calibrate import SidePasses
from attnflow.eval.config import RunConfig
from attnflow.eval.datasets import Problem
from attnflow.eval.jobs import Job
from attnflow.eval.methods import ATTENTION_NAMES, key_scores, random_scores, reduce_heads, span_scores, span_sums
from attnflow.eval.store import attribution_table, examples_table
from attnflow.eval.views import write_views
from attnflow.tokens import PARTIAL


def run_batch(batch: list[Job], model, tokenizer, config: RunConfig, out: Path, views) -> dict[str, pa.Table]:
    """Trace one batch, answer, score every method at both levels over the answer span:
    {examples, attribution, removals (with config.loo), features}.

    `removals` holds the answer's log-prob with each removed paragraph set (`eval.loo`),
    `features` each example's AT2 features (`eval.at2`), `costs` the cost per example:
    trace_s, methods_s (composing every attention method), loo_s, loo_forwards, pair_s,
    pair_forwards.  `views` (a `views.ViewBudget`, or an int: examples with index < views, no byte budget)
    decides which examples get an attention view under `out/views/`.
    """
    from attnflow.eval import at2, loo

    prompts = [j.prompt for j in batch]
    teacher = config.mode == "teacher"
    side = SidePasses(batch, tokenizer, config)  # eval/calibrate.py: content-free / shuffled prompts (none by default)
    t0 = time.perf_counter()
    tr = record(model, tokenizer, prompts, [j.completion for j in batch] if teacher else None,
                None if teacher else config.new_tokens, config.memory_budget)  # fmt: skip
    trace_s = (time.perf_counter() - t0) / len(batch)
    stop = set(tokenizer.all_special_ids)
    answers = [read_answer(tr, b, job, stop, teacher) for b, job in enumerate(batch)]
    targets = [a.rows for a in answers]  # unpadded query rows producing the answer span's tokens
    features = [
        at2.feature_row(job.example.index, job.example.id,
                        at2.example_features(tr, b, targets[b], [(s.start, s.end) for s in job.prompt.paragraph_spans]))
        for b, job in enumerate(batch)
    ]  # fmt: skip
    t0 = time.perf_counter()
    scores, tr = score(tr, batch, targets)  # tr: heads averaged from here on (the per-head patterns are dropped)
    ex_rows, attr_rows = [], []
    for b, job in enumerate(batch):
        attr_rows += attribution_rows(job, tr.pad_offsets[b], {k: v[b] for k, v in scores.items()})
    methods_s = (time.perf_counter() - t0) / len(batch)
    ex_rows = [example_row(job, answers[b]) for b, job in enumerate(batch)]
    forced = lambda ps, completions: record(model, tokenizer, ps, completions, None, config.memory_budget)  # noqa: E731
    tables = side.finish(tr, answers, ex_rows, attr_rows, trace_s * len(batch), forced)  # + "/cal" rows, costs, {"shuffle"}
    costs = [{} for _ in batch]
    if config.loo:  # fills the LOO metrics of attr_rows (the "/cal" ones too) and adds the "loo" rows
        loo_rows, removals, costs = loo.score_batch(model, tr, batch, answers, attr_rows, config)
        attr_rows += loo_rows
        tables["removals"] = loo.removal_table(removals)
    cost_rows = []
    for b, job in enumerate(batch):
        c = costs[b]
        ex_rows[b] |= {k: c.get(k) for k in ("answer_logp", "loo_reason")}
        cost_rows.append({"index": job.example.index, "id": job.example.id, "trace_s": trace_s, "methods_s": methods_s} | c)
    write_views(tr, batch, targets, out, views)
    tables = {"examples": examples_table(ex_rows), "attribution": attribution_table(attr_rows)} | tables
    return tables | {"features": at2.feature_table(features), "costs": loo.cost_table(cost_rows)}


SPAN_PREFIX = "spans:"  # score keys holding [batch, span] scores (sentences then paragraphs), not [batch, key]


def score(tr, batch: list[Job], targets: list[list[int]]) -> tuple[dict[str, torch.Tensor], "AttentionTrace"]:
    """Every attention method's scores of the batch's targets (float64, cpu) and the trace with its heads averaged.

    Key scores `[batch, key]` by method name (`methods.key_scores`); maxflow's span scores
    (`methods.span_scores`: each sentence, then each paragraph, as a whole) under
    `SPAN_PREFIX + name` as `[batch, span]`.
    """
    mean = reduce_heads(tr)
    sinks = exclusion_mask(mean, "sinks")  # [batch, key]: detected once, for the key and the span methods
    reduced = {"mean": mean}  # the head reductions key_scores makes, so the mean is not made twice
    scores = {k: v.double().cpu() for k, v in key_scores(tr, targets, reduced=reduced, sinks=sinks).items()}
    spans = [job.prompt.sentence_spans + job.prompt.paragraph_spans for job in batch]
    S = max(len(x) for x in spans)
    starts = torch.zeros(len(batch), S, dtype=torch.long)
    ends = torch.zeros(len(batch), S, dtype=torch.long)
    for b, xs in enumerate(spans):
        pad = mean.pad_offsets[b]
        starts[b, : len(xs)] = torch.tensor([x.start + pad for x in xs])
        ends[b, : len(xs)] = torch.tensor([x.end + pad for x in xs])
    for name, v in span_scores(mean, targets, starts, ends, sinks=sinks).items():
        scores[SPAN_PREFIX + name] = v
    return scores, mean


def record(model, tokenizer, prompts: list, completions: list | None, new_tokens: int | None,
           memory_budget: int | None = None):
    """Trace `prompts` (eval Prompts) in one batch, every head (float16) and the norms: forcing `completions`, or
    generating `new_tokens`; `memory_budget` bytes bound one layer's transient (None: the trace's default).
    The methods reduce the heads (`methods.key_scores`), AT2 weighs them."""
    from attnflow.tracers import trace

    return trace(
        model,
        [p.input_ids for p in prompts],
        tokenizer=tokenizer,
        max_new_tokens=new_tokens,
        completions=completions,
        heads="all",
        dtype=torch.float16,
        norms=True,
        batch_size=len(prompts),
        progress=False,
        spans=[p.spans for p in prompts],
        **({} if memory_budget is None else {"memory_budget": memory_budget}),
    )


def loo_row(job: Job, level: str, drops, loo_metrics: dict) -> dict:
    """The "loo" method's attribution row: its scores are the drops; ranked against the gold items like any method."""
    gold = job.prompt.gold_paragraphs if level == "paragraph" else job.prompt.gold_sentences
    ex = job.example
    return {"index": ex.index, "id": ex.id, "level": level, "method": "loo", "scores": list(map(float, drops))} | (
        M.example_metrics(drops, gold) | loo_metrics
    )


@dataclass
class Answer:
    """What one example answered, and which of its completion tokens are attributed."""

    completion: int  # completion tokens up to (not including) the first special token
    start: int  # attributed span: completion tokens [start, end)
    end: int
    span_text: str
    rows: list[int]  # unpadded query rows producing the span's tokens (the stop row for an empty span)
    generated: str | None = None  # generate mode: the completion's text
    scores: dict | None = None  # generate mode: `answers.answer_scores`


def read_answer(tr, b: int, job: Job, stop: set[int], teacher: bool) -> Answer:
    """The completion of example b and its answer span.

    Teacher mode: the forced gold answer's tokens (special tokens such as an end of
    turn are never part of it).  Generate mode: the completion's text is the join of
    its display strings (`tr.text`, exactly the text each token covers), the answer is
    extracted from it (`answers.answer_scores`), located in it (`answers.locate`) and
    mapped to the tokens covering it (`answers.token_span`); when the extracted answer
    is empty or not found verbatim, the whole completion is attributed.
    """
    P = tr.prompt_lengths[b]
    ids = tr.input_ids[b, tr.pad_offsets[b] + P :].tolist()
    m = next((n for n, t in enumerate(ids) if t in stop), len(ids))
    display = tr.display(b)[P : P + m]
    text = "".join(piece for piece in display if piece != PARTIAL)
    scores = None
    start, end = 0, m
    if not teacher:
        scores = answer_scores(text, job.example.answer, job.example.question)
        chars = locate(scores["prediction"], text)
        if chars is not None:
            start, end = token_span(display, chars, PARTIAL)
            if end <= start:
                start, end = 0, m
    rows = list(range(P - 1 + start, P - 1 + end)) or [P - 1 + m]
    span = "".join(piece for piece in display[start:end] if piece != PARTIAL)
    return Answer(m, start, end, span, rows, None if teacher else text, scores)


def example_row(job: Job, answer: Answer | None) -> dict:
    """The examples table's row of one job (`answer=None`: not evaluated)."""
    ex, p = job.example, job.prompt
    s = (answer.scores if answer is not None else None) or {}
    return {
        "index": ex.index,
        "id": ex.id,
        "status": job.status,
        "reason": job.reason,
        "question": ex.question,
        "answer": ex.answer,
        "prediction": s.get("prediction"),
        "em": s.get("em"),
        "f1": s.get("f1"),
        "prompt_tokens": len(p) if p is not None else None,
        "answer_tokens": None if answer is None else answer.end - answer.start,
        "paragraphs": [q.title for q in ex.paragraphs],
        "gold_paragraphs": [q.title in ex.gold_titles for q in ex.paragraphs],
        "sentences": [f"{q.title} [{i}]" for q in ex.paragraphs for i in range(len(q.sentences))],
        "sentence_text": [s_.strip() for q in ex.paragraphs for s_ in q.sentences],
        "gold_sentences": [(q.title, i) in set(ex.supporting) for q in ex.paragraphs for i in range(len(q.sentences))],
        "question_type": ex.kind,
        "generated": None if answer is None else answer.generated,
        "contains": s.get("contains"),
        "em_raw": s.get("em_raw"),
        "f1_raw": s.get("f1_raw"),
        "contains_raw": s.get("contains_raw"),
        "completion_tokens": None if answer is None else answer.completion,
        "answer_start": None if answer is None else answer.start,
        "answer_end": None if answer is None else answer.end,
        "answer_span": None if answer is None else answer.span_text,
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
        first = 0 if level == "sentence" else len(p.sentence_spans)  # where this level's spans start in `score`'s
        for name in ATTENTION_NAMES:
            if name == "random":  # the exact expectation over random rankings, not one draw
                values, metrics = random_scores(len(spans)), M.random_expectation(len(spans), int(gold.sum()))
            else:
                if SPAN_PREFIX + name in scores:  # a span's own score (maxflow from the span as a whole)
                    values = scores[SPAN_PREFIX + name][first : first + len(spans)].numpy()
                else:
                    values = span_sums(scores[name][None], starts, ends)[0].numpy()
                metrics = M.example_metrics(values, gold)
            rows.append(
                {"index": ex.index, "id": ex.id, "level": level, "method": name, "scores": values.tolist()} | metrics
            )
    return rows


def skipped_table(jobs: list[Job], problems: list[Problem]) -> pa.Table:
    """The examples rows of jobs not evaluated (too long) and of malformed rows."""
    rows = [example_row(j, None) for j in jobs if j.status != "ok"]
    for pr in problems:
        rows.append({"index": pr.index, "id": pr.id, "status": "malformed", "reason": pr.reason})
    return examples_table(rows)
