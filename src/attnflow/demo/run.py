"""`attnflow demo`: the embedded model organism end to end, offline, against a known ground truth.

It generates held-out task instances, lets the demo model answer them greedily
while attnflow records every layer's attention, composes rollout and
residual-inclusive flow, attributes each answer token to the documents, checks
the attribution against the documents the generator knows support the answer,
and writes Parquet tables and an offline HTML viewer.

    $ attnflow demo --examples 32 --out attnflow-demo
    ...
    attnflow-demo/html/index.html

Written under --out:
    parquet/        the trace, flow and attributions (attnflow.exporters.to_parquet)
    html/           the viewer (open html/index.html)
    examples.json   each instance: question, answer, generated answer, supporting documents
    summary.json    the figures the summary table prints
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import torch

from attnflow import _io
from attnflow.attribution import text_spans
from attnflow.demo import task
from attnflow.errors import BadArgumentError
from attnflow.attention_trace import Span

METHODS = ("rollout", "flow", "raw")  # raw = the last layer's attention, a baseline for the composed ones
EXCLUDE_KEYS = (0,)  # the <s> sink takes most attention and is no document; leave it out before composing


def document_spans(tok, prompt: str, char_spans: list[tuple[str, int, int]]) -> list[Span]:
    """One `document` Span per (title, char_start, char_end), then the `question` span, in positions of `tok(prompt)`."""
    q = prompt.index("question :")
    return text_spans(tok, prompt, char_spans) + text_spans(tok, prompt, [("question", q, len(prompt))], kind="question")


def support_hits(attributions: pa.Table, examples: list[task.Example]) -> dict[str, dict[str, float]]:
    """Per method: top-1 (the best document supports the answer) and top-2 (all supporting documents rank in the best two).

    `attributions` holds one row per (example, method, document) with the document's
    rank; source_span indexes the example's spans, whose first ones are its documents.
    """
    rows = attributions.to_pylist()
    best: dict[tuple[str, int], dict[int, int]] = {}  # (method, example) -> {document: rank}
    for r in rows:
        best.setdefault((r["method"], r["example"]), {})[r["source_span"]] = r["rank"]
    out = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        top1 = top2 = 0
        for i, ex in enumerate(examples):
            ranks = best[method, i]  # document -> rank, 1 = highest score
            top1 += min(ranks, key=ranks.get) in ex.support
            top2 += all(ranks[s] <= 2 for s in ex.support)
        out[method] = {"top1": top1 / len(examples), "top2": top2 / len(examples)}
    return out


def random_baseline(examples: list[task.Example]) -> dict[str, float]:
    """Expected top-1 / top-2 of a uniformly random document ranking, exactly."""
    top1 = sum(len(ex.support) / len(ex.documents) for ex in examples)
    top2 = 0.0
    for ex in examples:
        n, k = len(ex.documents), len(ex.support)
        top2 += 1.0 if n <= 2 else (2 / n if k == 1 else 2 / (n * (n - 1)))
    return {"top1": top1 / len(examples), "top2": top2 / len(examples)}


@contextmanager
def _timed(timings: dict, name: str):
    t0 = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - t0


def run_demo(args) -> int:
    """`attnflow demo [--out DIR] [--examples N] [--two-hop] [--seed S] [--no-progress]`; returns the exit code."""
    import attnflow as af
    from attnflow import demo

    if args.examples < 1:
        raise BadArgumentError(f"--examples {args.examples}; give at least 1")
    out, timings = Path(args.out), {}
    if args.no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    examples = task.generate(args.examples, seed=args.seed, two_hop=args.two_hop)  # training uses seeds >= 10**6
    with _timed(timings, "load"):
        model = demo.load()
    tok = model.tokenizer
    rendered = [task.render_prompt(ex) for ex in examples]
    spans = [document_spans(tok, text, char_spans) for text, char_spans in rendered]
    with _timed(timings, "trace"):
        tr = af.trace(model, [text for text, _ in rendered], max_new_tokens=1, heads="all", spans=spans,
                      dtype=torch.float32, progress=not args.no_progress)
    generated = [tr.tokens[b][tr.prompt_lengths[b]] for b in range(len(examples))]
    with _timed(timings, "flow"):
        flows = {m: af.attribution.flow_rows(tr, m, exclude_keys=EXCLUDE_KEYS) for m in ("rollout", "flow")}
    with _timed(timings, "attribute"):
        tables = [af.attribute(tr, method=m, span_kind="document", exclude_keys=EXCLUDE_KEYS) for m in METHODS]
        attributions = pa.concat_tables(tables)
    with _timed(timings, "write"):
        af.exporters.to_parquet(tr, out / "parquet", flow=flows, attributions=attributions)
        index = af.exporters.to_html(tr, out / "html", flow=flows, attributions=attributions) / "index.html"
        summary = summarize(examples, generated, attributions, args)
        _io.write_json(out / "examples.json", example_records(examples, generated))
    summary["seconds"] = {k: round(v, 3) for k, v in timings.items()}
    _io.write_json(out / "summary.json", summary)
    print(format_summary(summary))
    print(index)
    return 0


def example_records(examples: list[task.Example], generated: list[str]) -> list[dict]:
    return [
        {"example": i, "question": ex.question, "answer": ex.answer, "generated": g, "correct": g == ex.answer,
         "support": ex.support, "documents": [d.title for d in ex.documents], "two_hop": ex.two_hop}
        for i, (ex, g) in enumerate(zip(examples, generated))
    ]


def summarize(examples: list[task.Example], generated: list[str], attributions: pa.Table, args) -> dict:
    correct = sum(g == ex.answer for g, ex in zip(generated, examples))
    return {
        "examples": len(examples),
        "two_hop": bool(args.two_hop),
        "seed": args.seed,
        "answer_accuracy": correct / len(examples),
        "attribution": support_hits(attributions, examples),
        "random": random_baseline(examples),
        "documents": [len(ex.documents) for ex in examples],
    }


def format_summary(s: dict) -> str:
    kind = "two-hop" if s["two_hop"] else "single-hop"
    n = s["examples"]
    lines = [
        f"attnflow demo: {n} held-out {kind} questions (seed {s['seed']}), "
        f"{min(s['documents'])}-{max(s['documents'])} documents each",
        f"answer accuracy (greedy): {round(s['answer_accuracy'] * n)}/{n} = {s['answer_accuracy']:.1%}",
        "",
        "attribution of each answer token to the documents, against the supporting documents",
        f"  {'method':<22}{'top-1':>8}{'top-2':>8}",
    ]
    names = {"rollout": "rollout (alpha 0.5)", "flow": "flow (residual)", "raw": "raw (last layer)"}
    for method, hits in s["attribution"].items():
        lines.append(f"  {names.get(method, method):<22}{hits['top1']:>8.1%}{hits['top2']:>8.1%}")
    lines.append(f"  {'random ranking':<22}{s['random']['top1']:>8.1%}{s['random']['top2']:>8.1%}")
    lines.append("  top-1: the highest-scored document supports the answer; "
                 "top-2: every supporting document ranks in the best two")
    sec = s.get("seconds", {})
    lines += ["", "seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in sec.items())]
    return "\n".join(lines)
