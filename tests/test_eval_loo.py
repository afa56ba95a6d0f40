"""Leave-one-out ablation (eval/loo.py): prefix reuse == fresh forwards of the shortened prompts, drops by hand,
logits only at the answer rows, the LOO metrics of a batch against independent recomputation."""

import sys
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import torch

from attnflow.errors import BadArgumentError
from attnflow.eval import metrics as M
from attnflow.eval.loo import AnswerScorer, wanted_pairs

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import tiny_model  # noqa: E402


def fresh_logprob(module, ids: list[int], targets: list[int]) -> float:
    """Σ log p(ids[t] | ids[:t]) from one plain forward with full logits, in float64."""
    with torch.no_grad():
        logits = module(torch.tensor([ids])).logits[0].double()  # [seq, vocab]
    logp = logits.log_softmax(-1)
    return float(sum(logp[t - 1, ids[t]] for t in targets))


def shortened(ids: list[int], targets: list[int], ranges) -> tuple[list[int], list[int]]:
    keep = [i for i in range(len(ids)) if not any(s <= i < e for s, e in ranges)]
    return [ids[i] for i in keep], [keep.index(t) for t in targets]


@pytest.mark.parametrize("family", ["llama", "gpt2", "mistral"])
def test_prefix_reuse_equals_fresh_forwards_of_the_shortened_prompt(family):
    model = tiny_model(family).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 100, (40,), generator=g).tolist()
    targets = [36, 37, 38, 39]
    scorer = AnswerScorer(model, ids, targets)
    assert scorer.reuse == (family != "mistral")  # a sliding-window cache has no prefix to crop
    assert scorer.full == pytest.approx(fresh_logprob(model, ids, targets), abs=1e-4)
    cases = [[(5, 11)], [(0, 4)], [(20, 36)], [(3, 8), (15, 22)], [(30, 33), (2, 6)], [(12, 12)]]
    for ranges in cases:
        short, new_targets = shortened(ids, targets, ranges)
        want = fresh_logprob(model, short, new_targets)
        assert scorer.logprob(ranges) == pytest.approx(want, abs=1e-4), (family, ranges)
    assert scorer.forwards == 1 + len(cases) - 1  # the empty range costs nothing


def test_drops_by_hand_on_a_tiny_model():
    """drop = logp(full) - logp(without the document), each side from its own full-vocabulary forward."""
    model = tiny_model("llama", seed=3).eval()
    docs = [(1, 6), (6, 12), (12, 18)]
    ids = [1] + list(range(10, 27)) + [40, 41, 42, 43]  # BOS, 3 documents of 17 tokens, then the answer
    targets = [19, 20, 21]
    scorer = AnswerScorer(model, ids, targets)
    full = fresh_logprob(model, ids, targets)
    for s, e in docs:
        short = ids[:s] + ids[e:]
        by_hand = full - fresh_logprob(model, short, [t - (e - s) for t in targets])
        assert scorer.full - scorer.logprob([(s, e)]) == pytest.approx(by_hand, abs=1e-4)
    # removing nothing drops nothing; removing a token that is scored is refused
    assert scorer.logprob([]) == scorer.full
    with pytest.raises(BadArgumentError, match="before the first scored token"):
        scorer.logprob([(18, 21)])
    with pytest.raises(BadArgumentError, match="before the first scored token"):
        scorer.logprob([(0, 20), (3, 5)])  # an earlier-starting range that reaches a target


def test_logits_only_at_the_answer_rows():
    model = tiny_model("llama").eval()
    seen = []
    hook = model.lm_head.register_forward_hook(lambda m, inp, out: seen.append(tuple(out.shape)))
    try:
        scorer = AnswerScorer(model, list(range(4, 34)), [28, 29])
        scorer.logprob([(3, 9)])
    finally:
        hook.remove()
    assert seen == [(1, 2, 100), (1, 2, 100)]  # two rows each, never [seq, vocab]


def test_wanted_pairs_are_the_distinct_top2_or_all():
    assert wanted_pairs(4, [[0.4, 0.3, 0.2, 0.1], [0.1, 0.5, 0.5, 0.0], [0.9, 0.8, 0.0, 0.0]], "methods") == {(0, 1), (1, 2)}
    assert wanted_pairs(3, [[np.nan, 1.0, 0.0]], "methods") == set()  # a skipped method (NaN scores) removes nothing
    assert wanted_pairs(5, [], "all") == set(combinations(range(5), 2))


@pytest.fixture(scope="module")
def demo_batch():
    import attnflow as af
    from attnflow.eval.batch import run_batch
    from attnflow.eval.config import RunConfig
    from attnflow.eval.datasets import demo_examples
    from attnflow.eval.jobs import batches, prepare

    model = af.demo.load()
    config = RunConfig(task="demo", mode="teacher", loo_pairs="all")
    batch, = batches(prepare(demo_examples(3, seed=1), model.tokenizer, config, None), 3)
    return model, batch, run_batch(batch, model, model.tokenizer, config, Path("unused"), views=0)


def test_batch_loo_rows_and_metrics_recompute_from_fresh_forwards(demo_batch):
    model, batch, tables = demo_batch
    module = model._module
    attribution = tables["attribution"].to_pylist()
    removals = tables["removals"].to_pylist()
    for job in batch:
        ex = job.example
        ids = job.prompt.input_ids + job.completion
        P = len(job.prompt)
        targets = list(range(P, len(ids)))
        full = fresh_logprob(module, ids, targets)
        spans = [(s.start, s.end) for s in job.prompt.paragraph_spans]

        def drop(removed):
            short, t = shortened(ids, targets, [spans[k] for k in removed])
            return full - fresh_logprob(module, short, t)

        rows = {(r["level"], r["method"]): r for r in attribution if r["index"] == ex.index}
        loo = rows[("paragraph", "loo")]
        want = [drop([k]) for k in range(len(spans))]
        np.testing.assert_allclose(loo["scores"], want, atol=1e-4)
        assert ("sentence", "loo") not in rows  # sentence LOO is off by default
        pairs = {tuple(r["removed"]): r["drop"] for r in removals if r["index"] == ex.index}
        assert set(pairs) == {()} | {(k,) for k in range(len(spans))} | set(combinations(range(len(spans)), 2))
        for pair in combinations(range(len(spans)), 2):
            assert pairs[pair] == pytest.approx(drop(pair), abs=1e-4)
        drops = np.array(want)
        for (level, method), r in rows.items():
            if level == "sentence":
                assert r["spearman_loo"] is None and r["drop@1"] is None
                continue
            if method == "random":
                assert r["drop@1"] == pytest.approx(drops.mean(), abs=1e-4)
                assert r["drop@2"] == pytest.approx(np.mean([drop(p) for p in combinations(range(len(spans)), 2)]), abs=1e-4)
                assert r["spearman_loo"] == 0.0
                continue
            order = M.ranking(np.array(r["scores"]))
            assert r["drop@1"] == pytest.approx(drops[order[0]], abs=1e-4), method
            assert r["drop@2"] == pytest.approx(drop(sorted(order[:2].tolist())), abs=1e-4), method
            rho = np.corrcoef(np.argsort(np.argsort(r["scores"])), np.argsort(np.argsort(drops)))[0, 1]
            if len(set(r["scores"])) == len(spans):  # no ties: Spearman = Pearson of the plain ranks
                assert r["spearman_loo"] == pytest.approx(rho, abs=1e-9), method
        assert loo["drop@1"] == pytest.approx(drops.max(), abs=1e-4) and loo["spearman_loo"] == pytest.approx(1.0)
    costs = tables["costs"].to_pylist()
    assert [c["loo_forwards"] for c in costs] == [1 + j.prompt.n_paragraphs for j in batch]
    assert [c["pair_forwards"] for c in costs] == [len(list(combinations(range(j.prompt.n_paragraphs), 2))) for j in batch]
    assert all(c["trace_s"] > 0 and c["loo_s"] > 0 for c in costs)


def test_sentence_loo_rows_when_asked_and_random_drop2_from_drawn_pairs():
    import attnflow as af
    from attnflow.eval.batch import run_batch
    from attnflow.eval.config import RunConfig
    from attnflow.eval.datasets import demo_examples
    from attnflow.eval.jobs import batches, prepare

    model = af.demo.load()
    config = RunConfig(task="demo", mode="teacher", loo_sentences=True, loo_pairs="methods")
    batch, = batches(prepare(demo_examples(1, seed=2), model.tokenizer, config, None), 1)
    tables = run_batch(batch, model, model.tokenizer, config, Path("unused"), views=0)
    rows = {(r["level"], r["method"]): r for r in tables["attribution"].to_pylist()}
    n = len(batch[0].prompt.sentence_spans)
    assert len(rows[("sentence", "loo")]["scores"]) == n
    assert tables["costs"]["loo_forwards"][0].as_py() == 1 + batch[0].prompt.n_paragraphs + n
    got = rows[("sentence", "rollout")]["spearman_loo"]
    want = M.spearman(np.array(rows[("sentence", "rollout")]["scores"]), np.array(rows[("sentence", "loo")]["scores"]))
    assert got == pytest.approx(want, nan_ok=True)
    # --loo-pairs methods: random's drop@2 is the mean drop of the pairs drawn for it, which were removed
    from attnflow.eval.loo import random_pairs

    job = batch[0]
    drawn = random_pairs(job.prompt.n_paragraphs, job.example.index, config.seed)
    removed = {tuple(r["removed"]): r["drop"] for r in tables["removals"].to_pylist()}
    assert len(drawn) == min(2, len(list(combinations(range(job.prompt.n_paragraphs), 2)))) and set(drawn) <= set(removed)
    assert rows[("paragraph", "random")]["drop@2"] == pytest.approx(np.mean([removed[p] for p in drawn]))
    # sentence level: drop@1 is the top sentence's own drop, drop@2 a fresh forward without the top-2 sentences
    ids = job.prompt.input_ids + job.completion
    P = len(job.prompt)
    targets = list(range(P, len(ids)))
    module = model._module
    full = fresh_logprob(module, ids, targets)
    spans = [(x.start, x.end) for x in job.prompt.sentence_spans]
    sentence_drops = np.array(rows[("sentence", "loo")]["scores"])
    methods = [m for (level, m) in rows if level == "sentence" and m not in ("random", "loo")]
    assert len(methods) >= 5
    for method in methods[:3] + ["loo"]:
        r = rows[("sentence", method)]
        order = M.ranking(np.array(r["scores"]))
        assert r["drop@1"] == pytest.approx(sentence_drops[order[0]], abs=1e-4), method
        short, t = shortened(ids, targets, [spans[k] for k in sorted(order[:2].tolist())])
        assert r["drop@2"] == pytest.approx(full - fresh_logprob(module, short, t), abs=1e-4), method
    rnd = rows[("sentence", "random")]
    assert rnd["drop@1"] == pytest.approx(sentence_drops.mean()) and np.isfinite(rnd["drop@2"])
    # every pair forward is counted: the paragraph pairs kept in the removals table, then the sentence pairs
    scored = [rows[("sentence", m)]["scores"] for m in methods] + [sentence_drops]
    sentence_pairs = wanted_pairs(n, scored, "methods") | set(random_pairs(n, job.example.index, config.seed))
    paragraph_pairs = len(removed) - 1 - job.prompt.n_paragraphs
    assert tables["costs"]["pair_forwards"][0].as_py() == paragraph_pairs + len(sentence_pairs)


def test_demo_eval_end_to_end_has_loo_and_at2_rows_and_no_loo_turns_them_off(tmp_path, capsys):
    import pyarrow.parquet as pq

    from attnflow.cli import main
    from attnflow.eval.at2 import load_head_weights

    args = ["eval", "demo", "--limit", "5", "--seed", "4", "--no-progress", "--views", "0", "--mode", "teacher"]
    assert main([*args, "--out", str(tmp_path / "on")]) == 0
    text = capsys.readouterr().out
    at = pq.read_table(tmp_path / "on" / "attribution.parquet").to_pylist()
    for method in ("loo", "at2"):
        rows = [r for r in at if r["method"] == method]
        assert [r["index"] for r in rows] == list(range(5)) and {r["level"] for r in rows} == {"paragraph"}
    assert "| at2 |" in text and "| loo |" in text and "cost per example" in text and "held-out scores only" in text
    w = load_head_weights(tmp_path / "on" / "at2_heads.safetensors", raw=True)
    assert w.shape == (4, 8) and (w >= 0).all()
    costs = pq.read_table(tmp_path / "on" / "costs.parquet").to_pylist()
    assert len(costs) == 5 and all(c["loo_forwards"] >= 2 for c in costs)
    assert main([*args, "--no-loo", "--out", str(tmp_path / "off")]) == 0
    off = pq.read_table(tmp_path / "off" / "attribution.parquet")
    assert not {"loo", "at2"} & set(off["method"].to_pylist()) and not (tmp_path / "off" / "removals.parquet").exists()
    # the attention methods' scores do not depend on LOO
    key = lambda rows: {(r["index"], r["level"], r["method"]): r["scores"] for r in rows if r["method"] not in ("loo", "at2")}  # noqa: E731
    assert key(off.to_pylist()) == key(at)


def test_score_detects_the_sinks_once_and_gives_the_span_methods_the_same_mask(monkeypatch):
    """batch.score finds the "/sinks" keys once per batch; maxflow/sinks equals span_scores detecting them itself."""
    import attnflow as af
    from attnflow.eval import batch as B
    from attnflow.eval import methods
    from attnflow.eval.config import RunConfig
    from attnflow.eval.datasets import demo_examples
    from attnflow.eval.jobs import batches, prepare

    model = af.demo.load()
    config = RunConfig(task="demo", mode="teacher")
    batch, = batches(prepare(demo_examples(2, seed=3), model.tokenizer, config, None), 2)
    tr = B.record(model, model.tokenizer, [j.prompt for j in batch], [j.completion for j in batch], None)
    targets = [[len(j.prompt) - 1 + i for i in range(len(j.completion))] for j in batch]
    calls = []
    real = B.exclusion_mask
    monkeypatch.setattr(B, "exclusion_mask", lambda *a, **k: (calls.append("batch"), real(*a, **k))[1])
    monkeypatch.setattr(methods, "exclusion_mask", lambda *a, **k: (calls.append("methods"), real(*a, **k))[1])
    scores, mean = B.score(tr, batch, targets)
    assert calls == ["batch"]
    monkeypatch.setattr(methods, "exclusion_mask", real)
    starts, ends = [], []
    for b, job in enumerate(batch):
        xs = job.prompt.sentence_spans + job.prompt.paragraph_spans
        starts.append([x.start + mean.pad_offsets[b] for x in xs])
        ends.append([x.end + mean.pad_offsets[b] for x in xs])
    S = max(len(s) for s in starts)
    pad = lambda rows: torch.tensor([r + [0] * (S - len(r)) for r in rows])  # noqa: E731
    alone = methods.span_scores(mean, targets, pad(starts), pad(ends))  # detects the sinks itself
    for name in alone:
        torch.testing.assert_close(scores[B.SPAN_PREFIX + name], alone[name], equal_nan=True)
