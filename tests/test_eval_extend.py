"""Growing runs (--resume with a larger --limit or a wider shard), the views byte budget, prompt settings,
answer spans, question-type breakdowns and the position-bias report."""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from attnflow.cli import main
from attnflow.demo.tokenizer import build_tokenizer
from attnflow.eval.batch import read_answer
from attnflow.eval.methods import METHOD_NAMES
from attnflow.eval.report import position_bias
from attnflow.eval.runner import RunConfig, evaluate, select_examples
from attnflow.eval.views import estimate_bytes, tree_bytes

sys.path.insert(0, str(Path(__file__).parent))
from test_eval_datasets import FIXTURE, bpe_tokenizer  # noqa: E402
from test_eval_runner import DEMO_ARGS, _run, _tables, demo_dir, tiny_llama  # noqa: E402, F401


# --- growing a run ------------------------------------------------------------------------------
def test_resume_with_a_larger_limit_evaluates_only_the_new_examples(tmp_path, demo_dir, capsys):
    args = ["demo", "--model", demo_dir, "--mode", "generate", *DEMO_ARGS]
    grown = tmp_path / "grown"
    assert _run([*args, "--limit", 10, "--out", grown]) == 0
    first = {p.name: p.stat().st_mtime_ns for p in (grown / "parts").iterdir()}
    assert len(first) == 10  # batch size 1: one part per example
    assert _run([*args, "--limit", 20, "--out", grown, "--resume"]) == 0
    parts = {p.name: p.stat().st_mtime_ns for p in (grown / "parts").iterdir()}
    assert len(parts) == 20 and all(parts[k] == v for k, v in first.items())  # the old parts were not redone
    assert json.loads((grown / "config.json").read_text())["limit"] == 20
    assert _run([*args, "--limit", 20, "--out", tmp_path / "fresh"]) == 0
    ex_g, at_g = _tables(grown)
    ex_f, at_f = _tables(tmp_path / "fresh")
    assert ex_g.num_rows == 20 and ex_g.equals(ex_f) and at_g.equals(at_f)
    assert pq.read_table(grown / "summary.parquet").equals(pq.read_table(tmp_path / "fresh" / "summary.parquet"))
    capsys.readouterr()
    # a smaller limit is refused, saying why
    assert _run([*args, "--limit", 5, "--out", grown, "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--limit 5" in err and "--limit 20" in err and "only grow" in err


def test_memory_budget_reaches_the_trace_changes_nothing_and_may_change_on_resume(tmp_path, demo_dir, monkeypatch, capsys):
    from attnflow.tracers import reduce

    seen = []
    real = reduce.interface_pattern
    monkeypatch.setattr(reduce, "interface_pattern", lambda *a, **kw: seen.append(kw["memory_budget"]) or real(*a, **kw))
    base = ["demo", "--model", demo_dir, "--mode", "teacher", *DEMO_ARGS]
    args = [*base, "--limit", 4]
    tight = tmp_path / "tight"
    assert _run([*args, "--memory-budget", "4KB", "--out", tight]) == 0
    assert seen and set(seen) == {4096}  # every recording, side passes included, runs under the budget
    seen.clear()
    assert _run([*args, "--out", tmp_path / "plain"]) == 0
    from attnflow.tracers.options import TraceOptions

    assert set(seen) == {TraceOptions().memory_budget}  # no flag: the trace's default
    ex_t, at_t = _tables(tight)
    ex_p, at_p = _tables(tmp_path / "plain")
    assert ex_t.equals(ex_p)
    # float16 patterns chunked otherwise: the same scores up to rounding
    assert all(np.allclose(x, y, atol=2e-3) for x, y in zip(at_t["scores"].to_pylist(), at_p["scores"].to_pylist()))
    assert _run([*base, "--limit", 6, "--memory-budget", "1MB", "--out", tight, "--resume"]) == 0  # another budget
    assert pq.read_table(tight / "examples.parquet").num_rows == 6
    capsys.readouterr()
    assert _run([*args, "--memory-budget", "lots", "--out", tmp_path / "bad"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--memory-budget 'lots'" in err


def test_resume_with_a_wider_shard_grows_and_a_disjoint_one_is_refused(tmp_path, demo_dir, capsys):
    args = ["demo", "--model", demo_dir, "--limit", 6, "--mode", "teacher", *DEMO_ARGS]
    out = tmp_path / "s"
    assert _run([*args, "--shard", "0/4", "--out", out]) == 0
    assert pq.read_table(out / "examples.parquet")["index"].to_pylist() == [0, 4]
    capsys.readouterr()
    assert _run([*args, "--shard", "1/2", "--out", out, "--resume"]) == 2  # rows 1, 3, 5 drop 0 and 4
    assert "do not include" in capsys.readouterr().err
    assert _run([*args, "--shard", "0/2", "--out", out, "--resume"]) == 0
    assert pq.read_table(out / "examples.parquet")["index"].to_pylist() == [0, 2, 4]
    assert _run([*args, "--out", out, "--resume"]) == 0  # no shard: every row
    assert _run([*args, "--out", tmp_path / "full"]) == 0
    assert _tables(out)[1].equals(_tables(tmp_path / "full")[1])


# --- answer span -----------------------------------------------------------------------------------
def _fake_trace(prompt_len: int, completion: list[str], ids: list[int], pad: int = 1):
    display = ["p"] * prompt_len + completion
    seq = [0] * pad + [5] * prompt_len + ids
    return SimpleNamespace(
        prompt_lengths=[prompt_len], pad_offsets=[pad], input_ids=torch.tensor([seq]), display=lambda b: list(display)
    )


def _job(question: str, answer: str):
    return SimpleNamespace(example=SimpleNamespace(question=question, answer=answer))


@pytest.mark.parametrize(
    "pieces, question, gold, span, prediction",
    [
        (["The", " answer", " is", ":", " 9", ",", "984", ".", "</s>"], "How many?", "9,984", (4, 7), "9,984"),
        (["No", ",", " the", " mosque", " is", " not", "</s>"], "Are they in one place?", "no", (0, 1), "no"),
        (["**", "Terry", "**", " Rich", "ardson", "</s>"], "Who is older?", "Terry Richardson", (1, 5), "Terry Richardson"),
        (["The", " capital", " of", " France", " is", " Paris", ".", "</s>"], "What is the capital of France?", "Paris", (5, 6), "Paris"),
        (["</s>"], "What?", "x", (0, 0), ""),  # empty completion: the stop row
    ],
)
def test_read_answer_attributes_the_extracted_span(pieces, question, gold, span, prediction):
    P, EOS = 4, 2
    ids = [EOS if p == "</s>" else 7 for p in pieces]
    tr = _fake_trace(P, pieces, ids)
    a = read_answer(tr, 0, _job(question, gold), {EOS}, teacher=False)
    assert (a.start, a.end) == span and a.scores["prediction"] == prediction
    assert a.completion == pieces.index("</s>")
    assert a.generated == "".join(pieces[: a.completion])
    # row t produces token t+1: the span's tokens at unpadded P+start.. come from rows P+start-1..
    assert a.rows == (list(range(P + span[0] - 1, P + span[1] - 1)) or [P - 1 + a.completion])
    assert a.span_text == "".join(pieces[span[0] : span[1]])


def test_teacher_span_is_the_forced_answer_and_generate_spans_are_recorded(tmp_path):
    tok = bpe_tokenizer(chat=True)
    model = tiny_llama(len(tok), tok)
    config = RunConfig(task="hotpotqa", data=str(FIXTURE), mode="teacher", limit=2, batch_size=2)
    examples, problems = select_examples(config)
    evaluate(examples, problems, model, tok, tmp_path / "t", config, progress=False, views=0)
    for r, e in zip(_tables(tmp_path / "t")[0].to_pylist(), examples):
        assert r["answer_span"] == e.answer and (r["answer_start"], r["answer_end"]) == (0, r["completion_tokens"])
    config = RunConfig(task="hotpotqa", data=str(FIXTURE), mode="generate", limit=3, max_new_tokens=6)
    examples, problems = select_examples(config)
    evaluate(examples, problems, model, tok, tmp_path / "g", config, progress=False, views=0)
    for r in _tables(tmp_path / "g")[0].to_pylist():
        assert 0 <= r["answer_start"] <= r["answer_end"] <= r["completion_tokens"] <= 6
        assert r["answer_tokens"] == r["answer_end"] - r["answer_start"]
        assert r["answer_span"] in r["generated"]
        assert r["em_raw"] is not None and r["contains"] is not None


# --- prompt settings ------------------------------------------------------------------------------
def test_prompt_template_chat_and_system_are_recorded_and_used(tmp_path, capsys):
    tok = bpe_tokenizer(chat=True)
    tok_dir = tmp_path / "model"
    tiny_llama(len(tok), tok).save_pretrained(tok_dir)
    tok.save_pretrained(tok_dir)
    template = tmp_path / "t.txt"
    template.write_text("DOCS:\n{documents}\nQ: {question}\nA:")
    base = ["hotpotqa", "--model", tok_dir, "--data", FIXTURE, "--limit", 1, "--mode", "teacher", "--views", 0, "--no-progress"]
    assert _run([*base, "--out", tmp_path / "a", "--prompt-template", template, "--system", "Be brief."]) == 0
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["prompt_template"] == str(template.resolve()) and cfg["prompt_template_text"].startswith("DOCS:")
    assert cfg["system"] == "Be brief." and cfg["chat_template"] is True
    assert _run([*base, "--out", tmp_path / "b", "--prompt-template", "bare", "--no-chat-template"]) == 0
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    assert cfg["chat_template"] is False and cfg["prompt_template_text"].startswith("{documents}")
    tokens_a = pq.read_table(tmp_path / "a" / "examples.parquet")["prompt_tokens"][0].as_py()
    tokens_b = pq.read_table(tmp_path / "b" / "examples.parquet")["prompt_tokens"][0].as_py()
    assert tokens_a != tokens_b
    capsys.readouterr()
    # a changed template file is another setting: resuming is refused
    template.write_text("{documents}\n{question}")
    assert _run([*base, "--out", tmp_path / "a", "--prompt-template", template, "--system", "Be brief.", "--resume"]) == 2
    assert "prompt_template_text" in capsys.readouterr().err
    for bad in (["--prompt-template", "nope"], ["--no-chat-template", "--system", "x"]):
        assert _run([*base, "--out", tmp_path / "c", *bad]) == 2
        assert capsys.readouterr().err.count("\n") == 1
    bad_file = tmp_path / "bad.txt"
    bad_file.write_text("no placeholders")
    assert _run([*base, "--out", tmp_path / "c", "--prompt-template", bad_file]) == 2
    assert "{documents}" in capsys.readouterr().err


def test_default_template_renders_the_old_prompt():
    from attnflow.eval.datasets import load_hotpotqa
    from attnflow.eval.prompts import INSTRUCTION, render_hotpotqa

    ex = load_hotpotqa(FIXTURE)[0][0]
    want = INSTRUCTION + "\n\n"
    for i, p in enumerate(ex.paragraphs):
        want += f"Document {i + 1}: {p.title}\n" + " ".join(s.strip() for s in p.sentences if s.strip()) + "\n\n"
    want += f"Question: {ex.question}\nAnswer:"
    assert render_hotpotqa(ex).text == want


# --- views within a budget ------------------------------------------------------------------------
def test_views_stay_within_the_byte_budget_and_the_estimate_is_close(tmp_path, demo_dir, capsys):
    args = ["demo", "--model", demo_dir, "--limit", 4, "--mode", "teacher", "--seed", 3, "--no-progress"]
    assert _run([*args, "--views", 1, "--out", tmp_path / "one"]) == 0
    one = tree_bytes(tmp_path / "one" / "views")
    n_tokens = pq.read_table(tmp_path / "one" / "examples.parquet")
    ex0 = n_tokens.to_pylist()[0]
    est = estimate_bytes(ex0["prompt_tokens"] + ex0["answer_tokens"], 2, 1, ex0["answer_tokens"])
    assert 0.8 * one <= est <= 1.25 * one, (est, one)  # the estimate made before writing
    capsys.readouterr()
    budget = int(2.5 * one)
    assert _run([*args, "--views", 4, "--views-bytes", budget, "--out", tmp_path / "b"]) == 0
    out = capsys.readouterr()
    written = tree_bytes(tmp_path / "b" / "views")
    views = sorted(p.name for p in (tmp_path / "b" / "views").iterdir())
    assert written <= budget and 1 <= len(views) < 4
    assert "estimated" in out.err and f"views: {len(views)} written, {written / 1e6:.1f} MB" in out.out
    assert "left out for the byte budget" in out.out
    assert "views:" in (tmp_path / "b" / "summary.md").read_text()


# --- breakdowns and position bias -------------------------------------------------------------------
def test_summary_breaks_down_by_question_type(tmp_path):
    tok = bpe_tokenizer()
    model = tiny_llama(len(tok), tok)
    config = RunConfig(task="hotpotqa", data=str(FIXTURE), max_new_tokens=2, batch_size=2)
    examples, problems = select_examples(config)
    facts = evaluate(examples, problems, model, tok, tmp_path, config, progress=False, views=0)
    summary = facts["summary"].to_pylist()
    kinds = [e.kind for e in examples]
    for kind in ("bridge", "comparison"):
        ns = {r["n"] for r in summary if r["subset"] == kind and r["metric"] == "precision@1"}
        assert ns == {kinds.count(kind)}
    md = (tmp_path / "summary.md").read_text()
    assert "only bridge questions" in md and "only comparison questions" in md and "position bias" in md
    raw = {r["metric"] for r in summary if r["subset"] == "raw" and r["level"] == "answer"}
    assert raw == {"em", "f1", "contains"}


def test_position_bias_against_hand_counts():
    gold = [[True, False, False], [False, False, True]]
    examples = pa.table({"status": ["ok", "ok"], "gold_paragraphs": gold})
    rows = []
    scores = {"raw": [[0.1, 0.2, 0.7], [0.3, 0.3, 0.4]], "rollout": [[0.5, 0.3, 0.2], [0.6, 0.1, 0.3]]}
    for m, per in scores.items():
        rows += [{"index": i, "level": "paragraph", "method": m, "scores": s} for i, s in enumerate(per)]
    rows += [{"index": i, "level": "paragraph", "method": "random", "scores": [1 / 3] * 3} for i in range(2)]
    out = {(r["method"], r["metric"]): r["mean"] for r in position_bias(examples, pa.Table.from_pylist(rows))}
    assert out[("raw", "top1_last")] == 1.0 and out[("raw", "top1_first")] == 0.0
    assert out[("rollout", "top1_first")] == 1.0 and out[("rollout", "rank@3")] == 2.5  # ranks 3 and 2
    assert out[("raw", "rank@1")] == 2.5  # ranks 3 and 2 (0.3 ties 0.3: document order)
    assert out[("random", "top1_first")] == pytest.approx(1 / 3) and out[("random", "rank@2")] == 2.0
    assert out[("gold", "top1_first")] == 0.5 and out[("gold", "top1_last")] == 0.5
    assert out[("gold", "rank@1")] == (1 + 2.5) / 2  # gold at rank 1 once; non-gold tied at 2.5 once
    assert set(METHOD_NAMES) - {m for m, _ in out} == set(METHOD_NAMES) - {"raw", "rollout", "random"}
