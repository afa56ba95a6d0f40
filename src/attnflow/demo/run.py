"""`attnflow demo`: the embedded model organism end to end, offline, against a known ground truth.

It generates held-out task instances, lets the demo model answer them greedily
while attnflow records every layer's attention, composes rollout,
residual-inclusive flow and total attention (each plain and sink-aware),
attributes each answer token to the documents, checks the attribution against
the documents the generator knows support the answer, and writes Parquet tables
and an offline HTML viewer that opens on `VIEWER_FIRST`, the method that ranks
the supporting document first most often on the organism.

    $ attnflow demo --examples 32 --out attnflow-demo
    ...
    attnflow-demo/html/index.html

    >>> summary = run("attnflow-demo", examples=2, progress=False)   # the library call behind the command
    >>> print(format_summary(summary))
    attnflow demo: 2 held-out single-hop questions (seed 1234), 2-5 documents each
    answer accuracy (greedy): 2/2 = 100.0%
    <BLANKLINE>
    attribution of each answer token to the documents, against the supporting documents
      method                   top-1   top-2
      total attention         100.0%  100.0%
      total attention/sinks   100.0%  100.0%
      total attn/norm/sinks   100.0%  100.0%
      rollout (alpha 0.5)      50.0%  100.0%
      rollout/sinks            50.0%  100.0%
      measured rollout/sinks 100.0%  100.0%
      flow (residual)          50.0%  100.0%
      flow/sinks               50.0%  100.0%
      raw (last layer)         50.0%   50.0%
      random ranking           35.0%   70.0%
      top-1: the highest-scored document supports the answer; top-2: every supporting document ranks in the best two
      share of the answer rows on the excluded keys (<s>, sinks): total attention 0.5%, ...
    <BLANKLINE>
    seconds: load ..., trace ..., flow ..., attribute ..., write ...

Written under --out:
    parquet/        the trace, flow and attributions (attnflow.exporters.to_parquet)
    html/           the viewer (open html/index.html)
    examples.json   each instance: question, answer, generated answer, supporting documents
    summary.json    the figures the summary table prints
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from attnflow import _io
from attnflow.attention_trace import Span
from attnflow.attribution import attribute, flow_rows, text_spans
from attnflow.demo import task
from attnflow.errors import BadArgumentError
from attnflow.eval import metrics as M

EXCLUDE_KEYS = (0,)  # the <s> sink takes most attention and is no document; leave it out before composing
# (name, attnflow method, exclude_keys, heads): "rollout" and "flow" leave <s> out, "/sinks" every sink
# (attnflow.attribution: <s>, special tokens, keys detected as sinks), "sum" is total attention; "/norm" weighs
# each head by its keys' value norms ‖W_O^h v_j‖, "rollout_measured" mixes attention and residual by their
# measured norms (Kobayashi et al. 2020, 2021; the trace records the norms)
METHODS = (
    ("sum", "sum", EXCLUDE_KEYS, "mean"),
    ("sum/sinks", "sum", "sinks", "mean"),
    ("sum/norm/sinks", "sum", "sinks", "norm"),
    ("rollout", "rollout", EXCLUDE_KEYS, "mean"),
    ("rollout/sinks", "rollout", "sinks", "mean"),
    ("rollout_measured/sinks", "rollout_measured", "sinks", "mean"),
    ("flow", "flow", EXCLUDE_KEYS, "mean"),
    ("flow/sinks", "flow", "sinks", "mean"),
    ("raw", "raw", EXCLUDE_KEYS, "mean"),  # the last layer's attention, a baseline for the composed ones
)
# the best document ranking measured on the organism without training (`attnflow eval demo --limit 200
# --batch-size 8`, paragraph P@1: sum/norm/sinks 0.945, rollout_measured/norm/sinks 0.900, sum/sinks 0.870,
# rollout_measured/sinks 0.740, rollout 0.580, maxflow 0.310; held-out AT2 head weights 0.995): the viewer opens on it
VIEWER_FIRST = "sum/norm/sinks"


def document_spans(tok, prompt: str, char_spans: list[tuple[str, int, int]]) -> list[Span]:
    """One `document` Span per (title, char_start, char_end), then the `question` span, in positions of `tok(prompt)`."""
    q = prompt.index("question :")
    return text_spans(tok, prompt, char_spans) + text_spans(tok, prompt, [("question", q, len(prompt))], kind="question")


def support_hits(attributions: pa.Table, examples: list[task.Example]) -> dict[str, dict[str, float]]:
    """Per method: top-1 (the best document supports the answer) and top-2 (all supporting documents rank in the best two).

    `attributions` holds one row per (example, method, document) with the document's
    score; source_span indexes the example's spans, whose first ones are its
    documents.  top-1 is `metrics.precision_at_k(k=1)`, top-2 is `metrics.recall_at_k(k=2) == 1`
    (ties broken by document order, as the table's ranks).
    """
    rows = attributions.to_pylist()
    scores: dict[tuple[str, int], dict[int, float]] = {}  # (method, example) -> {document: score}
    for r in rows:
        scores.setdefault((r["method"], r["example"]), {})[r["source_span"]] = r["score"]
    out = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        top1 = top2 = 0.0
        for i, ex in enumerate(examples):
            s = np.array([scores[method, i][d] for d in range(len(ex.documents))])
            gold = _support(ex)
            top1 += M.precision_at_k(s, gold, 1)
            top2 += M.recall_at_k(s, gold, 2) == 1.0
        out[method] = {"top1": top1 / len(examples), "top2": top2 / len(examples)}
    return out


def random_baseline(examples: list[task.Example]) -> dict[str, float]:
    """Expected top-1 / top-2 of a uniformly random document ranking, exactly (`metrics.random_expectation`)."""
    top1 = sum(M.random_expectation(len(ex.documents), len(ex.support), ks=(1,))["precision@1"] for ex in examples)
    top2 = sum(M.random_all_at_k(len(ex.documents), len(ex.support), 2) for ex in examples)
    return {"top1": top1 / len(examples), "top2": top2 / len(examples)}


def _support(ex: task.Example) -> np.ndarray:
    """One bool per document: does it support the answer."""
    return np.isin(np.arange(len(ex.documents)), ex.support)


@contextmanager
def _timed(timings: dict, name: str):
    t0 = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - t0


def run(
    out: str | Path, examples: int = 32, two_hop: bool = False, seed: int = 1234, progress: bool = True, overwrite: bool = False
) -> dict:
    """Answer `examples` held-out instances, attribute, write everything under `out`; returns the summary.

    The summary is what `summary.json` holds (`format_summary` prints it), plus
    `viewer`, the path of the HTML viewer's index.html.  `out` must be new or empty, or (with
    `overwrite=True`) a demo run attnflow wrote: it is replaced whole, never merged into.

        >>> s = run("attnflow-demo", examples=2, progress=False)
        >>> list(s["attribution"]), s["viewer"]
        (['sum', 'sum/sinks', 'sum/norm/sinks', 'rollout', 'rollout/sinks', 'rollout_measured/sinks', 'flow', 'flow/sinks', 'raw'], PosixPath('attnflow-demo/html/index.html'))
        >>> sorted(p.name for p in Path("attnflow-demo").iterdir())
        ['examples.json', 'html', 'parquet', 'summary.json']
        >>> run("attnflow-demo", examples=2, progress=False)
        Traceback (most recent call last):
        attnflow.errors.DataError: attnflow-demo already holds an attnflow demo; pass overwrite=True (CLI: --overwrite) to replace it
    """
    from attnflow.demo import load
    from attnflow.exporters import to_html, to_parquet
    from attnflow.tracers import trace

    if examples < 1:
        raise BadArgumentError(f"examples={examples}; give at least 1")
    out, timings = Path(out), {}
    _io.check_output(out, "demo", overwrite)  # before the model runs
    if not progress:  # also transformers' "Loading weights" bar
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    instances = task.generate(examples, seed=seed, two_hop=two_hop)  # training uses seeds >= 10**6
    with _timed(timings, "load"):
        model = load()
    tok = model.tokenizer
    rendered = [task.render_prompt(ex) for ex in instances]
    spans = [document_spans(tok, text, char_spans) for text, char_spans in rendered]
    with _timed(timings, "trace"):
        tr = trace(model, [text for text, _ in rendered], max_new_tokens=1, heads="all", spans=spans,
                   dtype=torch.float32, progress=progress, norms=True)
    generated = [tr.tokens[b][tr.prompt_lengths[b]] for b in range(len(instances))]
    order = sorted(METHODS, key=lambda m: m[0] != VIEWER_FIRST)  # the viewer opens on the first flow
    with _timed(timings, "flow"):
        # validate=False: the patterns were recorded just above; checking them again for every method costs time
        flows = {name: flow_rows(tr, m, exclude_keys=ex, heads=h, validate=False) for name, m, ex, h in order if m != "raw"}
    with _timed(timings, "attribute"):
        tables = [named(attribute(tr, method=m, span_kind="document", exclude_keys=ex, heads=h, validate=False), name)
                  for name, m, ex, h in order]
        attributions = pa.concat_tables(tables)
    with _io.output_dir(out, "demo", overwrite) as tmp:
        with _timed(timings, "write"):
            to_parquet(tr, tmp / "parquet", flow=flows, attributions=attributions)
            to_html(tr, tmp / "html", flow=flows, attributions=attributions)
            summary = summarize(instances, generated, attributions, two_hop=two_hop, seed=seed)
            summary["attribution"] = {name: summary["attribution"][name] for name, *_ in METHODS}  # table order
            shares = excluded_shares(attributions)
            summary["excluded_share"] = {name: shares[name] for name, *_ in METHODS}
            _io.write_json(tmp / "examples.json", example_records(instances, generated))
        summary["seconds"] = {k: round(v, 3) for k, v in timings.items()}
        _io.write_json(tmp / "summary.json", summary)
    return summary | {"viewer": out / "html" / "index.html"}


def named(table: pa.Table, name: str) -> pa.Table:
    """The attributions table with its `method` column set to the demo's method name."""
    return table.set_column(table.schema.get_field_index("method"), "method", pa.array([name] * len(table), pa.string()))


def excluded_shares(attributions: pa.Table) -> dict[str, float]:
    """Per method: the mean share of the answer rows that went to the excluded keys (one value per example)."""
    rows = attributions.select(["example", "method", "excluded_share"]).to_pylist()
    per = {(r["method"], r["example"]): r["excluded_share"] for r in rows}
    out: dict[str, list[float]] = {}
    for (method, _), v in per.items():
        out.setdefault(method, []).append(v)
    return {m: float(np.mean(v)) for m, v in out.items()}


def example_records(examples: list[task.Example], generated: list[str]) -> list[dict]:
    return [
        {"example": i, "question": ex.question, "answer": ex.answer, "generated": g, "correct": g == ex.answer,
         "support": ex.support, "documents": [d.title for d in ex.documents], "two_hop": ex.two_hop}
        for i, (ex, g) in enumerate(zip(examples, generated))
    ]


def summarize(
    examples: list[task.Example], generated: list[str], attributions: pa.Table, *, two_hop: bool, seed: int
) -> dict:
    """The figures of a run: answer accuracy, support hits per method, the random baseline."""
    correct = sum(g == ex.answer for g, ex in zip(generated, examples))
    return {
        "examples": len(examples),
        "two_hop": bool(two_hop),
        "seed": seed,
        "answer_accuracy": correct / len(examples),
        "attribution": support_hits(attributions, examples),
        "random": random_baseline(examples),
        "documents": [len(ex.documents) for ex in examples],
    }


def format_summary(s: dict) -> str:
    """The summary table `attnflow demo` prints."""
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
    names = {"sum": "total attention", "sum/sinks": "total attention/sinks", "rollout": "rollout (alpha 0.5)",
             "flow": "flow (residual)", "raw": "raw (last layer)", "sum/norm/sinks": "total attn/norm/sinks",
             "rollout_measured/sinks": "measured rollout/sinks"}
    for method, hits in s["attribution"].items():
        lines.append(f"  {names.get(method, method):<22}{hits['top1']:>8.1%}{hits['top2']:>8.1%}")
    lines.append(f"  {'random ranking':<22}{s['random']['top1']:>8.1%}{s['random']['top2']:>8.1%}")
    lines.append("  top-1: the highest-scored document supports the answer; "
                 "top-2: every supporting document ranks in the best two")
    if s.get("excluded_share"):
        shares = ", ".join(f"{names.get(m, m)} {v:.1%}" for m, v in s["excluded_share"].items())
        lines.append(f"  share of the answer rows on the excluded keys (<s>, sinks): {shares}")
    sec = s.get("seconds", {})
    lines += ["", "seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in sec.items())]
    return "\n".join(lines)
