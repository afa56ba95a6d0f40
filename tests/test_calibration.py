"""Content-free-query calibration (af.attribute(calibrate=...), eval --calibrate) and the permutation check (--shuffle-check).

Every calibrated score is checked against a content-free pass built and scored by hand.
"""

import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from scipy.stats import spearmanr
from transformers import LlamaForCausalLM

import attnflow as af
from attnflow.calibration import content_free_prompts, content_free_trace
from attnflow.cli import main
from attnflow.demo.tokenizer import build_tokenizer
from attnflow.errors import BadArgumentError
from attnflow.eval import prompts as EP
from attnflow.eval.calibrate import ALL_NAMES, shuffled_order, spearman
from attnflow.eval.methods import METHOD_NAMES, REFERENCE_NAMES
from attnflow.eval.runner import RunConfig, evaluate, select_examples
from attnflow.prompting import Document, build_prompt

sys.path.insert(0, str(Path(__file__).parent))
from test_eval_datasets import FIXTURE, bpe_tokenizer  # noqa: E402
from test_eval_runner import tiny_llama  # noqa: E402
from tiny_models import tiny_model, tiny_tokenizer  # noqa: E402

DOCS = [Document("paris", "alice lives in paris ."), Document("london", "bob lives in london .")]
QUESTION = "where does alice live ?"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with the word-level test tokenizer, saved so af.load gives it a tokenizer."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer(chat_template=True).save_pretrained(path)
    return path


# --- the question span ---------------------------------------------------------------------------
@pytest.mark.parametrize("chat", [False, True])
def test_question_span_covers_the_question_plain_and_chat(chat):
    for tok in (tiny_tokenizer(chat_template=True), bpe_tokenizer(chat=True)):
        p = build_prompt(QUESTION, tok, documents=DOCS, chat=chat)
        q = p.spans[-1]
        assert [s.kind for s in p.spans] == ["document", "document", "question"] and q.name == "question"
        assert p.text[q.char_start : q.char_end] == QUESTION
        ids = tok(p.text, add_special_tokens=not chat)["input_ids"]
        assert tok.decode(ids[q.start : q.end]).strip() == QUESTION  # exactly the question's tokens
        assert q.start >= p.spans[1].end


@pytest.mark.parametrize("chat", [False, True])
def test_eval_prompts_record_the_question(chat):
    tok = bpe_tokenizer(chat=chat)
    from attnflow.eval.datasets import load_hotpotqa

    ex = load_hotpotqa(FIXTURE)[0][1]
    p = EP.build_prompt(ex, tok)
    q = p.question_span
    assert q.kind == "question" and p.text[q.char_start : q.char_end] == ex.question
    assert tok.decode(p.input_ids[q.start : q.end]).strip() == ex.question
    assert all(s.kind == "sentence" for s in p.sentence_spans) and len(p.sentence_spans) == len(p.sentence_keys)
    demo = EP.build_prompt(select_examples(RunConfig(task="demo", limit=1, seed=0))[0][0], build_tokenizer())
    assert demo.text[demo.question_span.char_start : demo.question_span.char_end] == "what is the city of peggy ?"


# --- af.attribute(calibrate=...) against a content-free pass made by hand ------------------------------
def _hand_shares(tr, b, names, exclude_first=False):
    """Rollout (alpha 0.5) shares of each named span, averaged over the completion rows, in float64 from tr's patterns."""
    one = tr.item(b)
    A = one.patterns[0].double().mean(1)  # [layer, query, key]
    if exclude_first:
        A = A.clone()
        A[..., 0] = 0  # row 0 keeps nothing (it is never reached from a later row once column 0 is gone)
        A = A / A.sum(-1, keepdim=True).clamp_min(1e-300)
    eye = torch.eye(A.shape[-1], dtype=torch.float64)
    R = eye
    for layer in A:
        R = (0.5 * layer + 0.5 * eye) @ R
    P, n = one.prompt_lengths[0], one.lengths[0]
    rows = R[P - 1 : n - 1]
    rows = rows / rows.sum(-1, keepdim=True)
    spans = {s.name: s for s in one.spans[0]}
    return np.array([float(rows[:, spans[x].start : spans[x].end].sum(-1).mean()) for x in names])


def test_content_free_calibration_matches_a_pass_built_by_hand(tiny_dir):
    model = af.load(tiny_dir)
    tok = model.tokenizer
    prompts = [build_prompt(QUESTION, tok, documents=DOCS), build_prompt("where does bob live ?", tok, documents=DOCS[::-1])]
    tr = af.trace(model, [p.prompt for p in prompts], spans=[p.spans for p in prompts], completions=[" paris", " london"],
                  heads="mean", dtype=torch.float32, progress=False)  # fmt: skip
    # by hand: the question's text replaced by the content-free one, the whole text tokenised again
    free_text = [p.text.replace(q, "the cat") for p, q in zip(prompts, [QUESTION, "where does bob live ?"])]
    free_ids = [tok(t)["input_ids"] for t in free_text]
    ids, spans, completions = content_free_prompts(tr, tok, "the cat")
    assert ids == free_ids  # the token splice equals re-tokenising the text (word-level tokenizer)
    for t, sp, p in zip(free_text, spans, prompts):
        for s, orig in zip(sp[:2], p.spans[:2]):  # documents: same names, relocated onto the same text
            assert t[s.char_start : s.char_end] == p.text[orig.char_start : orig.char_end]
        assert t[sp[2].char_start : sp[2].char_end] == "the cat"
    hand = af.trace(model, free_ids, spans=spans, completions=completions, heads="mean", dtype=torch.float32, progress=False)
    recorded = content_free_trace(tr, model, "the cat")
    assert torch.equal(recorded.patterns, hand.patterns) and torch.equal(recorded.input_ids, hand.input_ids)
    for by in ("subtract", "divide"):
        got = af.attribute(tr, "rollout", span_kind="document", exclude_keys=(), calibrate="content-free", model=model,
                           content_free="the cat", calibrate_by=by).to_pydict()  # fmt: skip
        for b, p in enumerate(prompts):
            names = [s.name for s in p.spans[:2]]
            real, free = _hand_shares(tr, b, names), _hand_shares(hand, b, names)
            want = real - free if by == "subtract" else real / free
            sel = [i for i, e in enumerate(got["example"]) if e == b]
            np.testing.assert_allclose([got["plain_score"][i] for i in sel], real, atol=1e-6)
            np.testing.assert_allclose([got["content_free_score"][i] for i in sel], free, atol=1e-6)
            np.testing.assert_allclose([got["score"][i] for i in sel], want, rtol=1e-5, atol=1e-6)
            order = np.argsort(-want, kind="stable")
            assert [got["rank"][sel[i]] for i in order] == [1, 2]
    # a recorded content-free trace gives the same table; position exclusions and per-target rows too
    kw = dict(span_kind="document", exclude_keys=(0,), reduce=None)
    a = af.attribute(tr, "rollout", calibrate=hand, **kw).to_pydict()
    for b, p in enumerate(prompts):
        names = [s.name for s in p.spans[:2]]
        want = _hand_shares(tr, b, names, exclude_first=True) - _hand_shares(hand, b, names, exclude_first=True)
        rows = [i for i, e in enumerate(a["example"]) if e == b]
        assert len(rows) == 2 * (tr.lengths[b] - tr.prompt_lengths[b])  # one group per completion token
        mean = np.array([np.mean([a["score"][i] for i in rows if a["source_span"][i] == j]) for j in range(2)])
        np.testing.assert_allclose(mean, want, atol=1e-6)
    assert a["share"] == af.attribute(tr, "rollout", **kw).to_pydict()["share"]  # the real pass's accounting


def test_calibration_refuses_what_it_cannot_match(tiny_dir):
    model = af.load(tiny_dir)
    tok = model.tokenizer
    p = build_prompt(QUESTION, tok, documents=DOCS)
    tr = af.trace(model, [p.prompt], spans=[p.spans], completions=[" paris"], heads="mean", progress=False)
    free = content_free_trace(tr, model)
    other = af.trace(model, [p.prompt], spans=[p.spans], completions=[" london"], heads="mean", progress=False)
    renamed = af.trace(model, [p.prompt], spans=[[s.__class__("x", s.kind, s.start, s.end) for s in p.spans]],
                       completions=[" paris"], heads="mean", progress=False)  # fmt: skip
    bare = af.trace(model, [p.prompt], spans=[p.spans[:2]], completions=[" paris"], heads="mean", progress=False)
    cases = [
        (dict(calibrate=other), "completion differs"),
        (dict(calibrate=renamed, span_kind="document"), "has no span of that name"),
        (dict(calibrate="content-free"), "pass model="),
        (dict(calibrate="nothing"), "calibrate='nothing'"),
        (dict(calibrate=free, sources="tokens"), "sources='spans'"),
        (dict(calibrate=free, targets=[3]), "counted from the end"),
        (dict(calibrate=free, calibrate_by="ratio"), "calibrate_by='ratio'"),
    ]
    for kw, match in cases:
        with pytest.raises(BadArgumentError, match=match):
            af.attribute(tr, "rollout", **kw)
    with pytest.raises(BadArgumentError, match="question spans"):
        af.attribute(bare, "rollout", calibrate="content-free", model=model)
    assert af.attribute(tr, "rollout", calibrate=free).num_rows == 3  # both documents and the question


# --- the evaluation -------------------------------------------------------------------------------
def test_eval_calibrated_scores_match_eager_content_free_pass(tmp_path):
    tok = build_tokenizer()
    model = tiny_llama(len(tok), tok)
    config = RunConfig(task="demo", seed=7, limit=3, mode="teacher", batch_size=2, calibrate="N/A")
    examples, problems = select_examples(config)
    evaluate(examples, problems, model, tok, tmp_path, config, progress=False, views=0, report=False)
    at = pq.read_table(tmp_path / "attribution.parquet")
    got = {(r["index"], r["level"], r["method"]): r["scores"] for r in at.to_pylist()}
    attention = [m for m in ALL_NAMES if m not in REFERENCE_NAMES]  # at2 and loo: paragraph level only
    assert {m for _, _, m in got} == set(ALL_NAMES) and at.num_rows == 3 * (2 * len(attention) + len(REFERENCE_NAMES))
    eager = LlamaForCausalLM(model.config).eval()
    eager.load_state_dict(model.state_dict())
    eager.config._attn_implementation = "eager"
    ex_t = pq.read_table(tmp_path / "examples.parquet").to_pylist()

    def rollout(ids, rows):
        with torch.no_grad():
            att = eager(torch.tensor([ids]), output_attentions=True).attentions
        A = torch.stack([a[0].double().mean(0) for a in att])
        R = torch.eye(A.shape[-1], dtype=torch.float64)
        for layer in A:
            R = (0.5 * layer + 0.5 * torch.eye(len(layer), dtype=torch.float64)) @ R
        return R[rows].mean(0)

    for ex, row in zip(examples, ex_t):
        p = EP.build_prompt(ex, tok)
        answer = tok(" " + ex.answer, add_special_tokens=False)["input_ids"]
        q = ex.question
        free_text = p.text.replace(f"question : {q}\n", "question : N/A\n")  # by hand, in the demo's format
        assert free_text != p.text
        free_ids = tok(free_text)["input_ids"]
        free_spans = af.attribution.text_spans(tok, free_text, [(s.name, s.char_start, s.char_end) for s in p.paragraph_spans])
        real = rollout(p.input_ids + answer, list(range(len(p) - 1, len(p) - 1 + len(answer))))
        free = rollout(free_ids + answer, list(range(len(free_ids) - 1, len(free_ids) - 1 + len(answer))))
        want = [float(real[s.start : s.end].sum() - free[f.start : f.end].sum()) for s, f in zip(p.paragraph_spans, free_spans)]
        # the eval stores patterns as float16 (every head, so that each reduction comes from one trace)
        np.testing.assert_allclose(got[(ex.index, "paragraph", "rollout/cal")], want, rtol=1e-3, atol=2e-5)
        plain = np.array(got[(ex.index, "paragraph", "rollout")])
        np.testing.assert_allclose(plain, [float(real[s.start : s.end].sum()) for s in p.paragraph_spans], rtol=1e-3, atol=2e-5)
        assert row["calibrate_tokens"] == len(free_ids) + len(answer) and row["calibrate_seconds"] > 0
        assert row["real_pass_tokens"] == len(p) + len(answer) and row["shuffle_tokens"] is None


def test_shuffle_check_is_deterministic_and_bounded(tmp_path):
    tok = build_tokenizer()
    model = tiny_llama(len(tok), tok)
    config = RunConfig(task="demo", seed=3, limit=4, mode="teacher", batch_size=2, shuffle_check=3)
    tables = []
    for run in ("a", "b"):
        facts = evaluate(*select_examples(config), model, tok, tmp_path / run, config, progress=False, views=0)
        tables.append(pq.read_table(tmp_path / run / "shuffle.parquet"))
    a, b = tables
    assert a.equals(b)  # seeded: the same orders, the same scores
    rows = a.to_pylist()
    assert sorted({r["index"] for r in rows}) == [0, 1, 2] and {r["method"] for r in rows} == set(METHOD_NAMES) - set(REFERENCE_NAMES)
    at = {(r["index"], r["method"]): r["scores"] for r in pq.read_table(tmp_path / "a" / "attribution.parquet").to_pylist()
          if r["level"] == "paragraph"}  # fmt: skip
    for r in rows:
        n = len(r["order"])
        assert sorted(r["order"]) == list(range(n)) and (n < 2 or r["order"] != list(range(n)))
        assert r["order"] == shuffled_order(n, r["index"])
        if r["method"] == "random":
            assert (r["spearman"], r["top1_same"]) == (0.0, 1 / n)
            continue
        rho = r["spearman"]
        assert np.isnan(rho) or -1.0 - 1e-12 <= rho <= 1.0 + 1e-12
        ref = spearmanr(at[(r["index"], r["method"])], r["scores"]).statistic
        assert np.isnan(rho) and np.isnan(ref) or rho == pytest.approx(ref)
        assert r["top1_same"] in (0.0, 1.0) and r["top1_same_position"] in (0.0, 1.0)
    assert np.isnan(spearman(np.ones(3), np.arange(3.0))) and spearman(np.array([1.0, 1, 2]), np.array([0.0, 1, 2])) == pytest.approx(
        spearmanr([1, 1, 2], [0, 1, 2]).statistic)  # ties averaged, as scipy; a constant side has no correlation
    assert "shuffle check, 3 examples" in facts["text"] and "| rollout |" in facts["text"].split("shuffle check")[1]
    ex = pq.read_table(tmp_path / "a" / "examples.parquet").to_pylist()
    assert [r["shuffle_tokens"] is not None for r in ex] == [True, True, True, False]


def test_eval_demo_cli_with_calibrate_and_shuffle_check(tmp_path, capsys):
    from test_eval_runner import DEMO_ARGS

    tok = build_tokenizer()
    demo = tmp_path / "model"
    tiny_llama(len(tok), tok).save_pretrained(demo)
    tok.save_pretrained(demo)
    args = ["eval", "demo", "--model", str(demo), "--limit", "4", "--batch-size", "2", *map(str, DEMO_ARGS)]
    assert main([*args, "--calibrate", "--shuffle-check", "2", "--out", str(tmp_path / "o")]) == 0
    text = capsys.readouterr().out
    out = tmp_path / "o"
    at = pq.read_table(out / "attribution.parquet")
    attention = [m for m in ALL_NAMES if m not in REFERENCE_NAMES]  # at2 and loo: paragraph level only
    assert at.num_rows == 4 * (2 * len(attention) + len(REFERENCE_NAMES)) and at["method"].to_pylist()[:3] == ["random", "raw", "raw/cal"]
    summary = pq.read_table(out / "summary.parquet").to_pylist()
    position = {r["method"] for r in summary if r["subset"] == "position"}
    assert {"rollout/cal", "sum/sinks/cal", "gold"} <= position  # the position bias covers calibrated methods
    shuffle = pq.read_table(out / "shuffle.parquet")
    assert sorted(set(shuffle["index"].to_pylist())) == [0, 1] and "rollout/cal" in shuffle["method"].to_pylist()
    assert "content-free pass (--calibrate 'N/A'): 4 examples" in text and "| rollout/cal | " in text
    assert "shuffled pass (--shuffle-check): 2 examples" in text
    assert {r["method"] for r in summary if r["subset"] == "cost"} == {"real", "content-free", "shuffle"}
    config = (out / "config.json").read_text()
    assert '"calibrate": "N/A"' in config and '"shuffle_check": 2' in config
    for bad in (["--calibrate", ""], ["--shuffle-check", "-1"]):
        assert main([*args, *bad, "--out", str(tmp_path / "bad")]) == 2
