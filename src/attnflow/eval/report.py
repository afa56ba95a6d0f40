"""The evaluation report: summary table (printed, Parquet, Markdown), a precision/recall@k plot, an explorer page.

    >>> from attnflow.eval.runner import RunConfig, evaluate, select_examples
    >>> config, out = RunConfig(task="demo", limit=2, seed=0), Path("runs/demo")
    >>> _ = evaluate(*select_examples(config), model, tokenizer, out, config, progress=False, views=0, report=False)
    >>> examples_table = pq.read_table(out / "examples.parquet")
    >>> attribution_table = pq.read_table(out / "attribution.parquet")
    >>> facts = write_report(out, examples_table, attribution_table, config.to_json())
    >>> print(facts["text"])
    2 examples evaluated (generate mode); skipped: 0 too long, 0 malformed
    answer (extracted): EM 1.000 [1.000, 1.000], F1 1.000 [1.000, 1.000], CONTAINS 1.000 [1.000, 1.000]
    ...
    paragraph level, 2 examples (mean [95% bootstrap CI]; '/nosink' excludes the first token)
    | method | P@1 | P@2 | R@2 | R@5 | MRR | nDCG | AUROC | Spearman(LOO) | drop@1 | drop@2 |
    ...
    >>> sorted(p.name for p in out.iterdir())
    ['at2_heads.safetensors', 'attribution.parquet', 'config.json', 'costs.parquet', 'examples.parquet',
     'explorer.html', 'features.parquet', 'parts', 'precision_recall.png', 'removals.parquet', 'summary.md',
     'summary.parquet']
    >>> print(markdown_table(facts["summary"], "paragraph", ("precision@1", "mrr")))
    | method | P@1 | MRR |
    |---|---|---|
    | random | 0.350 [0.200, 0.500] | 0.603 [0.457, 0.750] |
    | raw | 0.500 [0.000, 1.000] | 0.600 [0.200, 1.000] |
    ...
    | maxflow/sinks | 0.000 [0.000, 0.000] | 0.500 [0.500, 0.500] |
    ...
    | rollout_measured/norm/sinks | 1.000 [1.000, 1.000] | 1.000 [1.000, 1.000] |
    | at2 | 0.500 [0.000, 1.000] | 0.625 [0.250, 1.000] |
    | loo | 1.000 [1.000, 1.000] | 1.000 [1.000, 1.000] |

`summary.parquet` is long: one row per (level, method, metric) with mean, ci_low,
ci_high and n (examples where the metric is defined), plus answer rows
(level "answer": em, f1 and containment after and before extraction) and
position-bias rows (subset "position", `position_bias`).  Intervals are percentile bootstraps over
examples (1000 resamples, seed 0).
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from attnflow import _io
from attnflow.eval import metrics as M
from attnflow.eval import calibrate as C
from attnflow.eval.calibrate import ALL_NAMES
from attnflow.eval.methods import METHOD_NAMES

LEVELS = ("paragraph", "sentence")
SHORT = {"precision": "P", "recall": "R", "mrr": "MRR", "ndcg": "nDCG", "auroc": "AUROC", "spearman_loo": "Spearman(LOO)"}
HEADLINE = ("precision@1", "precision@2", "recall@2", "recall@5", "mrr", "ndcg", "auroc") + M.LOO_METRICS
METRICS = tuple(M.metric_names()) + M.LOO_METRICS  # every summarised metric column of the attribution table
SUBSETS = ("all", "correct", "wrong")  # correct / wrong: examples whose extracted answer has EM 1 / 0; + question types
SUMMARY_SCHEMA = pa.schema(
    [
        ("subset", pa.string()),
        ("level", pa.string()),
        ("method", pa.string()),
        ("metric", pa.string()),
        ("mean", pa.float64()),
        ("ci_low", pa.float64()),
        ("ci_high", pa.float64()),
        ("n", pa.int64()),
    ]
)


def summarize(examples: pa.Table, attribution: pa.Table, shuffle: pa.Table | None = None) -> pa.Table:
    """Mean and bootstrap CI of every metric per (subset, level, method), answer scores, position bias.

    Subsets of the examples: "all"; "correct" and "wrong" (generate mode) by the exact
    match of the extracted answer (attribution of answers the model got right); one per
    question type ("bridge", "comparison" for HotPotQA).  Answer rows (level "answer"):
    subset "all" holds EM and F1 of the extracted answer, "extracted" and "raw" hold EM,
    F1 and containment after and before extraction.  Subset "position" holds `position_bias`;
    "shuffle" and "cost" the permutation check and the side passes' cost (`calibrate.summary_rows`).
    """
    rows = []
    em_of = dict(zip(examples["index"].to_pylist(), examples["em"].to_pylist()))
    type_of = dict(zip(examples["index"].to_pylist(), examples["question_type"].to_pylist()))
    index_col = attribution["index"].to_pylist()
    em = np.array([em_of.get(i) for i in index_col], dtype=object)
    kind = np.array([type_of.get(i) for i in index_col], dtype=object)
    level_col = np.array(attribution["level"].to_pylist(), dtype=object)
    method_col = np.array(attribution["method"].to_pylist(), dtype=object)
    values_of = {m: attribution[m].to_numpy(zero_copy_only=False).astype(np.float64) for m in METRICS}
    subsets = {
        "all": np.ones(len(em), bool),
        "correct": em == 1.0,
        "wrong": em == 0.0,
    } | {t: kind == t for t in sorted({t for t in type_of.values() if t})}
    for subset, in_subset in subsets.items():
        for level in LEVELS:
            for method in ALL_NAMES:
                sel = in_subset & (level_col == level) & (method_col == method)
                if not sel.any():
                    continue
                for metric in METRICS:
                    mean, lo, hi, n = M.bootstrap_ci(values_of[metric][sel])
                    if not n and metric in M.LOO_METRICS:  # not measured (e.g. sentence level without loo_sentences)
                        continue
                    stats = dict(mean=mean, ci_low=lo, ci_high=hi, n=n)
                    rows.append(dict(subset=subset, level=level, method=method, metric=metric) | stats)
    rows += answer_rows(examples)
    rows += position_bias(examples, attribution)
    rows += C.summary_rows(examples, shuffle)
    return pa.Table.from_pylist(rows, schema=SUMMARY_SCHEMA)


ANSWER_ROWS = (  # (subset, metric, examples column)
    ("all", "em", "em"),
    ("all", "f1", "f1"),
    ("extracted", "em", "em"),
    ("extracted", "f1", "f1"),
    ("extracted", "contains", "contains"),
    ("raw", "em", "em_raw"),
    ("raw", "f1", "f1_raw"),
    ("raw", "contains", "contains_raw"),
)


def answer_rows(examples: pa.Table) -> list[dict]:
    """Answer EM/F1/containment rows (generate mode): after extraction ("all", "extracted") and before ("raw")."""
    ok = np.array(examples["status"].to_pylist()) == "ok"
    rows = []
    for subset, metric, column in ANSWER_ROWS:
        values = np.array([np.nan if v is None else v for v in examples[column].to_pylist()], dtype=np.float64)[ok]
        if len(values) and not np.isnan(values).all():
            mean, lo, hi, n = M.bootstrap_ci(values)
            stats = dict(mean=mean, ci_low=lo, ci_high=hi, n=n)
            rows.append(dict(subset=subset, level="answer", method="-", metric=metric) | stats)
    return rows


def position_bias(examples: pa.Table, attribution: pa.Table) -> list[dict]:
    """Does a method read content or position?  Per method, over the paragraph-level rows (documents):

    top1_first / top1_last  fraction of examples whose top-ranked document is the first / the last
    rank@p                  mean rank (1 = best) of the document at position p (1 = first)
    rank@last               mean rank of the last document

    The "random" row holds the exact expectations (1/n, 1/n, (n+1)/2).  The "gold" row
    is the same for the gold documents: how often the first / the last document is gold,
    and the mean rank of each position in the gold ranking (gold documents tied at
    (g+1)/2, the others at g+(n-g+1)/2), so a method that follows content matches it.
    """
    rows_by = {}
    for r in attribution.select(["index", "level", "method", "scores"]).to_pylist():
        if r["level"] == "paragraph":
            rows_by.setdefault(r["method"], []).append(np.asarray(r["scores"], dtype=np.float64))
    gold = [np.asarray(g, bool) for g, s in zip(examples["gold_paragraphs"].to_pylist(), examples["status"].to_pylist())
            if s == "ok" and g]  # fmt: skip
    out = []
    for method in [*ALL_NAMES, "gold"]:
        if method == "gold":
            ranked = [_gold_ranks(g) for g in gold] if rows_by else []
        elif method == "random":
            ranked = [np.full(len(s), (len(s) + 1) / 2) for s in rows_by.get(method, [])]
        else:
            ranked = [_ranks(s) for s in rows_by.get(method, [])]
        if not ranked:
            continue
        if method == "gold":
            first = [float(g[0]) for g in gold]
            last = [float(g[-1]) for g in gold]
        elif method == "random":
            first = last = [1.0 / len(r) for r in ranked]
        else:
            first = [float(r[0] == 1) for r in ranked]
            last = [float(r[-1] == 1) for r in ranked]
        values = {"top1_first": first, "top1_last": last, "rank@last": [r[-1] for r in ranked]}
        for p in range(1, max(len(r) for r in ranked) + 1):
            values[f"rank@{p}"] = [r[p - 1] for r in ranked if len(r) >= p]
        for metric, v in values.items():
            mean, lo, hi, n = M.bootstrap_ci(np.asarray(v, dtype=np.float64))
            out.append(dict(subset="position", level="paragraph", method=method, metric=metric,
                            mean=mean, ci_low=lo, ci_high=hi, n=n))  # fmt: skip
    return out


def _ranks(scores: np.ndarray) -> np.ndarray:
    """Rank (1 = best) of each candidate under `metrics.ranking` (ties by document order)."""
    r = np.empty(len(scores))
    r[M.ranking(scores)] = np.arange(1, len(scores) + 1)
    return r


def _gold_ranks(gold: np.ndarray) -> np.ndarray:
    g, n = int(gold.sum()), len(gold)
    return np.where(gold, (g + 1) / 2, g + (n - g + 1) / 2)


def position_table(summary: pa.Table, positions: int = 10) -> str:
    """Markdown: per method, top-1 = first / last document and the mean rank of documents 1..positions."""
    cells = {(r["method"], r["metric"]): r["mean"] for r in summary.to_pylist() if r["subset"] == "position"}
    methods = [m for m in [*ALL_NAMES, "gold"] if (m, "top1_first") in cells]
    ps = [p for p in range(1, positions + 1) if any((m, f"rank@{p}") in cells for m in methods)]
    head = ["top1=first", "top1=last"] + [f"rank doc{p}" for p in ps] + ["rank last"]
    lines = ["| method | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for m in methods:
        keys = ["top1_first", "top1_last"] + [f"rank@{p}" for p in ps] + ["rank@last"]
        vals = [cells.get((m, k)) for k in keys]
        lines.append(f"| {m} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in vals) + " |")
    return "\n".join(lines)


def _label(metric: str) -> str:
    name, _, k = metric.partition("@")
    return f"{SHORT.get(name, name)}@{k}" if k else SHORT.get(name, name)


def markdown_table(summary: pa.Table, level: str, metrics=HEADLINE, subset: str = "all") -> str:
    """A Markdown table for one level: one row per method, `mean [low, high]` per metric."""
    cells = {
        (r["method"], r["metric"]): r for r in summary.to_pylist() if r["level"] == level and r["subset"] == subset
    }
    methods = [m for m in ALL_NAMES if any((m, x) in cells for x in metrics)]
    lines = ["| method | " + " | ".join(_label(m) for m in metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for method in methods:
        vals = []
        for metric in metrics:
            r = cells.get((method, metric))
            vals.append("-" if r is None or r["n"] == 0 else f"{r['mean']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]")
        lines.append(f"| {method} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def counts(examples: pa.Table) -> dict[str, int]:
    status = examples["status"].to_pylist()
    return {s: status.count(s) for s in ("ok", "too_long", "malformed")}


def summary_text(
    summary: pa.Table, examples: pa.Table, config: dict, full: bool = False, views: dict | None = None,
    at2: dict | None = None, costs: pa.Table | None = None,
) -> str:
    """The printed report: counts, answer scores, views, one table per level and the position bias
    (every metric and subset when `full`)."""
    c = counts(examples)
    mode = config.get("mode", "generate")
    parts = [
        f"{c['ok']} examples evaluated ({mode} mode); skipped: {c['too_long']} too long, {c['malformed']} malformed"
    ]
    rows = summary.to_pylist()
    for subset, label in (("extracted", "answer (extracted)"), ("raw", "answer (first line, before extraction)")):
        ans = {r["metric"]: r for r in rows if r["level"] == "answer" and r["subset"] == subset}
        if ans:
            parts.append(
                f"{label}: "
                + ", ".join(f"{k.upper()} {r['mean']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]" for k, r in ans.items())
            )
    if mode == "teacher":
        parts.append("attribution over the gold answer's tokens (teacher forcing)")
    elif any(r["level"] == "answer" for r in rows):
        parts.append("attribution over the extracted answer's tokens (examples.parquet: answer_start/answer_end/answer_span)")
    if views is not None:
        parts.append(views_line(views))
    metrics = METRICS if full else HEADLINE
    parts.append(
        "note: flow = 2^L x rollout(alpha 0.5) and flow_normalized = rollout(alpha 0.5), so the three rank alike"
    )
    parts += loo_lines(costs, at2)
    own_tables = ("position", "shuffle", "cost")  # printed in their own tables below, not as metric tables
    subsets = sorted({r["subset"] for r in rows if r["level"] in LEVELS and r["subset"] not in own_tables},
                     key=lambda x: (x != "all", x not in ("correct", "wrong"), x))  # fmt: skip
    for subset in subsets if full else ("all",):
        for level in LEVELS:
            n = max((r["n"] for r in rows if r["level"] == level and r["subset"] == subset), default=0)
            if not n:
                continue
            which = {"all": "", "correct": ", only examples answered correctly (EM 1)",
                     "wrong": ", only examples answered wrongly (EM 0)"}.get(subset, f", only {subset} questions")  # fmt: skip
            cal = "; '/cal': minus the content-free pass's scores" if any(r["method"].endswith("/cal") for r in rows) else ""
            parts.append(
                f"\n{level} level, {n} examples{which} (mean [95% bootstrap CI]; '/nosink' excludes the first token{cal})"
            )
            parts.append(markdown_table(summary, level, metrics, subset))
    if any(r["subset"] == "position" for r in rows):
        parts.append(
            "\nposition bias (documents): how often the top-1 document is the first / the last one, and the mean rank"
            " (1 = best) of the document at each position; 'gold' is the same for the gold documents"
        )
        parts.append(position_table(summary))
    parts += C.report_parts(summary, config)  # --calibrate / --shuffle-check: cost lines, the shuffle check
    return "\n".join(parts)


def loo_lines(costs: pa.Table | None, at2: dict | None) -> list[str]:
    """What the LOO reference measures, what it cost beside the attention trace, and how AT2 was fit."""
    from attnflow.eval.at2 import at2_line
    from attnflow.eval.loo import cost_line

    cost = cost_line(costs) if costs is not None else None
    if cost is None or "loo" not in cost:
        return [cost] if cost else []
    lines = [
        "loo: the drop in the answer span's log-prob (forced in) when a document is removed; spearman_loo: a method's"
        " document scores against those drops; drop@k: the drop when its top-k documents are removed together"
        " (random: exact expectations, or with --loo-pairs methods the mean drop of 2 uniformly drawn pairs; '-' where"
        " the pair was not removed)",
        cost,
    ]
    return lines + ([at2_line(at2)] if at2 is not None else [])


def views_line(v: dict) -> str:
    budget = "no byte limit" if v["max_bytes"] is None else f"budget {v['max_bytes'] / 1e6:.0f} MB"
    line = f"views: {v['written']} written, {v['bytes'] / 1e6:.1f} MB ({budget}, --views {v['count']})"
    if v["missing"]:
        line += f"; {len(v['missing'])} of the first {v['count']} left out for the byte budget"
    return line


def plot(summary: pa.Table, path: Path) -> None:
    """precision@k and recall@k against k, one line per method, one row of panels per level (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in summary.to_pylist() if r["subset"] == "all"]
    levels = [lv for lv in LEVELS if any(r["level"] == lv for r in rows)]
    fig, axes = plt.subplots(max(len(levels), 1), 2, figsize=(11, 4 * max(len(levels), 1)), squeeze=False)
    colors = plt.get_cmap("tab10")
    for i, level in enumerate(levels):
        for j, kind in enumerate(("precision", "recall")):
            ax = axes[i, j]
            for m_idx, method in enumerate(METHOD_NAMES):
                pts = sorted(
                    (int(r["metric"].split("@")[1]), r["mean"], r["ci_low"], r["ci_high"])
                    for r in rows
                    if r["level"] == level and r["method"] == method and r["metric"].startswith(kind + "@")
                )
                if not pts:
                    continue
                k, mean, lo, hi = (np.array(x, dtype=float) for x in zip(*pts))
                color = "black" if method == "random" else colors((m_idx - 1) // 2)
                style = "--" if method.endswith("/nosink") else "-"
                ax.plot(k, mean, style, marker="o", color=color, label=method, lw=2 if method == "random" else 1.2)
                ax.fill_between(k, lo, hi, color=color, alpha=0.08)
            ax.set_title(f"{kind}@k, {level} level")
            ax.set_xlabel("k")
            ax.set_xscale("log")
            ax.set_xticks(list(M.KS), [str(k) for k in M.KS])
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
    axes[0, 1].legend(fontsize=7, loc="lower right")
    fig.subplots_adjust(left=0.06, right=0.98, top=0.95, bottom=0.07, hspace=0.3, wspace=0.15)
    with _io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


def write_report(
    out: Path, examples: pa.Table, attribution: pa.Table, config: dict, views_from=None, views: dict | None = None,
    shuffle: pa.Table | None = None,
    at2: dict | None = None, costs: pa.Table | None = None,
) -> dict:
    """summary.parquet, summary.md, precision_recall.png, explorer.html in `out`; returns {"text", "summary"}.

    `views`: `views.views_summary` facts, reported in the text (written count and size);
    `shuffle`: the permutation check's table (`calibrate.SHUFFLE_SCHEMA`), when the run made one; `at2`: the
    facts of the AT2 fit (`at2.with_at2`); `costs`: the costs table (`loo.COST_SCHEMA`), its means printed.
    """
    out = Path(out)
    summary = summarize(examples, attribution, shuffle)
    with _io.atomic_path(out / "summary.parquet") as tmp:
        pq.write_table(summary, tmp)
    extra = {"views": views, "at2": at2, "costs": costs}
    text = summary_text(summary, examples, config, **extra)
    full = summary_text(summary, examples, config, full=True, **extra)
    cfg = json.dumps(config, sort_keys=True)
    _io.write_text(out / "summary.md", f"# attnflow evaluation\n\nsettings: `{cfg}`\n\n{full}\n")
    if len(summary):
        plot(summary, out / "precision_recall.png")
    write_explorer(out, examples, attribution, views_from or [out])
    return {"text": text, "summary": summary}


# --- explorer page -------------------------------------------------------------------------------
EXPLORER_LIMIT = 500  # examples listed on the page (the tables hold all)


def write_explorer(out: Path, examples: pa.Table, attribution: pa.Table, views_from: list[Path]) -> None:
    """explorer.html: self-contained, offline; every text goes in through textContent (never markup)."""
    ex_rows = examples.to_pylist()[:EXPLORER_LIMIT]
    wanted = {r["index"] for r in ex_rows}
    scores: dict[int, dict] = {}
    for r in attribution.select(["index", "level", "method", "scores"]).to_pylist():
        if r["index"] in wanted:
            scores.setdefault(r["index"], {}).setdefault(r["level"], {})[r["method"]] = [
                round(float(x), 6) for x in r["scores"]
            ]
    items = []
    for r in ex_rows:
        view = next(
            (d / "views" / f"{r['index']:09d}" / "index.html" for d in views_from
             if (d / "views" / f"{r['index']:09d}" / "index.html").is_file()),
            None,
        )  # fmt: skip
        items.append(
            {k: r[k] for k in ("index", "id", "status", "reason", "question", "answer", "prediction", "em", "f1",
                               "contains", "generated", "answer_span", "question_type")}  # fmt: skip
            | {
                "paragraphs": r["paragraphs"] or [],
                "gold_paragraphs": r["gold_paragraphs"] or [],
                "sentences": r["sentences"] or [],
                "sentence_text": r["sentence_text"] or [],
                "gold_sentences": r["gold_sentences"] or [],
                "sentence_paragraph": _paragraph_of(r["sentences"] or []),
                "scores": scores.get(r["index"], {}),
                "view": None if view is None else os.path.relpath(view, out).replace(os.sep, "/"),
            }
        )
    present = set(attribution["method"].to_pylist())
    methods = [m for m in ALL_NAMES if m in present] or list(METHOD_NAMES)
    data = json.dumps({"methods": methods, "examples": items, "total": examples.num_rows})
    data = data.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")  # safe inside <script>
    page = EXPLORER_HTML.replace("__DATA__", data).replace("__TITLE__", html.escape(f"attnflow evaluation: {out.name}"))
    _io.write_text(out / "explorer.html", page)


def _paragraph_of(names: list[str]) -> list[int]:
    """Paragraph index of each sentence named "title [i]": sent_id 0 starts the next paragraph."""
    starts = np.array([name.rsplit(" [", 1)[-1] == "0]" for name in names], dtype=np.int64)
    return (np.cumsum(starts) - 1).tolist()


EXPLORER_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>__TITLE__</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:0;display:flex;height:100vh}
#list{width:28%;overflow:auto;border-right:1px solid #ccc}
#list div{padding:6px 8px;border-bottom:1px solid #eee;cursor:pointer}
#list div.sel{background:#e8f0ff}
#list .bad{color:#999}
#main{flex:1;overflow:auto;padding:12px 18px}
.doc{border:1px solid #ccc;border-left:6px solid #ccc;margin:6px 0;padding:6px 8px;border-radius:4px}
.doc.gold{border-left-color:#2a9d3a}
.doc.top{background:#fff4d6}
.doc.gold.top{background:#dcf5dc}
.sent{padding:1px 2px;border-radius:2px}
.sent.gold{text-decoration:underline 2px #2a9d3a}
.bar{display:inline-block;height:8px;background:#e07b00;vertical-align:middle;margin-left:6px}
.meta{color:#555}
.key span{display:inline-block;padding:1px 6px;margin-right:6px;border-radius:3px}
</style></head><body>
<div id="list"></div>
<div id="main">
<p>Method: <select id="method"></select> &nbsp; top-k: <input id="k" type="number" min="1" max="10" value="2" style="width:3em">
&nbsp; <span class="key"><span style="border-left:6px solid #2a9d3a">gold document</span><span style="background:#fff4d6">attributed (top-k)</span><span style="background:#dcf5dc">both</span><span style="text-decoration:underline 2px #2a9d3a">gold sentence</span></span></p>
<div id="detail"></div>
</div>
<script id="data" type="application/json">__DATA__</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const el = (tag, cls, text) => { const e = document.createElement(tag); if (cls) e.className = cls; if (text != null) e.textContent = String(text); return e; };
const sel = document.getElementById("method"), kIn = document.getElementById("k");
for (const m of D.methods) { const o = el("option", null, m); o.value = m; sel.appendChild(o); }
sel.value = D.methods.includes("rollout/nosink") ? "rollout/nosink" : D.methods[0];
let current = 0;
const list = document.getElementById("list");
list.appendChild(el("div", "meta", D.examples.length + " of " + D.total + " examples"));
const marks = [];
D.examples.forEach((ex, i) => {
  const d = el("div", ex.status === "ok" ? "" : "bad");
  const mark = el("span", "meta"); marks.push(mark); d.appendChild(mark);
  d.appendChild(document.createTextNode((ex.status === "ok" ? "" : "[" + ex.status + "] ") + ex.question));
  d.onclick = () => { current = i; show(); };
  d.dataset.i = i; list.appendChild(d);
});
function topk(scores, k) {
  const order = scores.map((s, i) => [s, i]).sort((a, b) => b[0] - a[0] || a[1] - b[1]);
  return new Set(order.slice(0, k).map(x => x[1]));
}
function markList() {  // is the top-ranked paragraph gold, for the chosen method?
  D.examples.forEach((ex, i) => {
    const ps = (ex.scores.paragraph || {})[sel.value];
    const hit = ps && ex.gold_paragraphs[[...topk(ps, 1)][0]];
    marks[i].textContent = (!ps ? "" : (hit ? "doc\u2713 " : "doc\u2717 ")) +
      (ex.em == null ? "" : (ex.em ? "ans\u2713 " : "ans\u2717 "));
    marks[i].title = "doc: is the top-ranked document gold (for this method); ans: is the extracted answer right (EM)";
    marks[i].style.color = hit ? "#2a9d3a" : "#c0392b";
  });
}
function show() {
  markList();
  for (const d of list.children) d.classList.toggle("sel", d.dataset.i == current);
  const ex = D.examples[current], m = sel.value, k = Math.max(1, parseInt(kIn.value) || 1);
  const box = document.getElementById("detail"); box.replaceChildren();
  box.appendChild(el("h3", null, ex.question));
  box.appendChild(el("p", "meta", "id " + ex.id + " · gold answer: " + ex.answer +
    (ex.prediction != null ? " · model: " + ex.prediction + " (EM " + ex.em + ", F1 " + (ex.f1 == null ? "-" : ex.f1.toFixed(2)) + ", contains " + ex.contains + ")" : "")));
  if (ex.generated != null) box.appendChild(el("p", "meta", "generated: " + ex.generated));
  if (ex.answer_span != null) box.appendChild(el("p", "meta", "attributed tokens: " + JSON.stringify(ex.answer_span)));
  if (ex.status !== "ok") { box.appendChild(el("p", null, "skipped (" + ex.status + "): " + ex.reason)); return; }
  if (ex.view) { const a = el("a", null, "attention view of this example"); a.href = ex.view; box.appendChild(a); }
  const ps = (ex.scores.paragraph || {})[m] || [], ss = (ex.scores.sentence || {})[m] || [];
  const top = topk(ps, k), pmax = Math.max(1e-12, ...ps), smax = Math.max(1e-12, ...ss);
  let s = 0;
  ex.paragraphs.forEach((title, p) => {
    const d = el("div", "doc" + (ex.gold_paragraphs[p] ? " gold" : "") + (top.has(p) ? " top" : ""));
    const h = el("div", null); h.appendChild(el("b", null, title));
    h.appendChild(el("span", "meta", "  score " + (ps[p] ?? 0).toPrecision(3)));
    const bar = el("span", "bar"); bar.style.width = (120 * (ps[p] ?? 0) / pmax) + "px"; h.appendChild(bar);
    d.appendChild(h);
    const body = el("div");
    while (s < ex.sentences.length && ex.sentence_paragraph[s] === p) {
      const t = el("span", "sent" + (ex.gold_sentences[s] ? " gold" : ""), ex.sentence_text[s]);
      t.style.background = "rgba(224,123,0," + (0.6 * (ss[s] ?? 0) / smax).toFixed(3) + ")";
      t.title = "score " + (ss[s] ?? 0).toPrecision(3);
      body.appendChild(t); body.appendChild(document.createTextNode(" ")); s++;
    }
    d.appendChild(body); box.appendChild(d);
  });
}
sel.onchange = show; kIn.oninput = show;
if (D.examples.length) show();
</script></body></html>
"""
