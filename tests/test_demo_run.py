"""`attnflow demo`: the printed figures are recomputed from the Parquet it writes, independently."""

from __future__ import annotations

import json
import os
import re
from itertools import permutations

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pyarrow.dataset as ds
import pytest
import torch

import attnflow as af
from attnflow.cli import main
from attnflow.demo import task
from attnflow.demo.run import EXCLUDE_KEYS, random_baseline

N = 6


def table(out, name):
    return ds.dataset(out / "parquet" / name, format="parquet", partitioning="hive").to_table().to_pylist()


@pytest.fixture(scope="module", params=[False, True], ids=["single_hop", "two_hop"])
def run(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    argv = ["demo", "--out", str(out), "--examples", str(N), "--seed", "99", "--no-progress"]
    from contextlib import redirect_stdout
    from io import StringIO

    buf = StringIO()
    with redirect_stdout(buf):
        code = main(argv + (["--two-hop"] if request.param else []))
    assert code == 0
    return out, buf.getvalue(), request.param


def printed_figures(stdout: str) -> dict[str, tuple[float, float]]:
    rows = {}
    for label, key in (("rollout", "rollout"), ("flow", "flow"), ("raw", "raw"), ("random ranking", "random")):
        m = re.search(rf"^  {re.escape(label)}\b.*?([\d.]+)%\s+([\d.]+)%$", stdout, re.M)
        assert m, f"no {label} row in:\n{stdout}"
        rows[key] = (float(m.group(1)) / 100, float(m.group(2)) / 100)
    return rows


def test_prints_the_viewer_path_last(run):
    out, stdout, _ = run
    last = stdout.strip().splitlines()[-1]
    assert last == str(out / "html" / "index.html") and os.path.isfile(last)


def test_examples_are_the_held_out_instances_and_accuracy_matches_the_tokens_table(run):
    out, stdout, two_hop = run
    records = json.loads((out / "examples.json").read_text())
    examples = task.generate(N, seed=99, two_hop=two_hop)
    assert [r["answer"] for r in records] == [ex.answer for ex in examples]
    assert [r["support"] for r in records] == [ex.support for ex in examples]
    tokens = table(out, "tokens")
    lengths = {}
    for t in tokens:
        lengths[t["example"]] = max(lengths.get(t["example"], 0), t["position"] + 1)
    generated = [next(t["token"] for t in tokens if t["example"] == b and t["position"] == lengths[b] - 1) for b in range(N)]
    assert generated == [r["generated"] for r in records]
    correct = sum(g == ex.answer for g, ex in zip(generated, examples))
    assert f"answer accuracy (greedy): {correct}/{N} = {correct / N:.1%}" in stdout


def test_document_spans_hold_exactly_the_document_tokens(run):
    out, _, two_hop = run
    examples = task.generate(N, seed=99, two_hop=two_hop)
    tokens = table(out, "tokens")
    for s in table(out, "spans"):
        if s["kind"] != "document":
            continue
        words = [t["token"] for t in sorted(tokens, key=lambda t: t["position"])
                 if t["example"] == s["example"] and s["start"] <= t["position"] < s["end"]]
        doc = examples[s["example"]].documents[s["span_id"]]
        assert (s["name"], words) == (doc.title, doc.text.split())


def test_printed_attribution_figures_recompute_from_the_attributions_table(run):
    out, stdout, two_hop = run
    examples = task.generate(N, seed=99, two_hop=two_hop)
    printed = printed_figures(stdout)
    rows = table(out, "attributions")
    for method in ("rollout", "flow", "raw"):
        top1 = top2 = 0
        for b, ex in enumerate(examples):
            scores = {r["source_span"]: r["score"] for r in rows if r["example"] == b and r["method"] == method}
            assert sorted(scores) == list(range(len(ex.documents)))  # every document scored, only documents
            order = sorted(scores, key=lambda s: (-scores[s], s))
            top1 += order[0] in ex.support
            top2 += set(ex.support) <= set(order[:2])
        assert printed[method] == pytest.approx((top1 / N, top2 / N), abs=5e-4), method
    # the random baseline by enumerating every ranking of a few documents
    for ex in examples:
        n = len(ex.documents)
        perms = list(permutations(range(n)))
        hit1 = sum(p[0] in ex.support for p in perms) / len(perms)
        hit2 = sum(set(ex.support) <= set(p[:2]) for p in perms) / len(perms)
        assert random_baseline([ex]) == pytest.approx({"top1": hit1, "top2": hit2})
    assert printed["random"] == pytest.approx(tuple(random_baseline(examples).values()), abs=5e-4)


def rollout_reference(A: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """float64 rollout of one example's patterns [layer, head, query, key], BOS column excluded, by a plain loop."""
    A = A.double().mean(1)
    A[:, :, list(EXCLUDE_KEYS)] = 0
    A = A / A.sum(-1, keepdim=True).clamp_min(1e-300)
    R = torch.eye(A.shape[-1], dtype=torch.float64)
    for layer in range(A.shape[0]):
        Ahat = alpha * A[layer] + (1 - alpha) * torch.eye(A.shape[-1], dtype=torch.float64)
        R = (Ahat / Ahat.sum(-1, keepdim=True)) @ R
    return R


def test_attribution_scores_recompute_from_the_attention_table(run):
    out, _, _ = run
    tr = af.AttentionTrace.load(out / "parquet")
    rows = table(out, "attributions")
    for b in range(N):
        one = tr.item(b)
        last = one.prompt_lengths[0] - 1  # the row that produced the answer token
        R = rollout_reference(one.patterns[0])[last]
        R = R / R.sum()
        docs = [s for s in one.spans[0] if s.kind == "document"]
        expected = torch.stack([R[s.start : s.end].sum() for s in docs])
        written = torch.tensor([r["score"] for r in sorted(rows, key=lambda r: r["source_span"])
                                if r["example"] == b and r["method"] == "rollout"], dtype=torch.float64)
        torch.testing.assert_close(written, expected, atol=1e-5, rtol=1e-4)
