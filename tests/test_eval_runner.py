"""The evaluation runner: scores against an eager reference, kill-and-resume, shards, bad input, report files."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from attnflow.cli import main
from attnflow.demo.tokenizer import build_tokenizer
from attnflow.eval import datasets as D
from attnflow.eval import metrics as M
from attnflow.eval.methods import ATTENTION_NAMES, METHOD_NAMES
from attnflow.eval.prompts import build_prompt
from attnflow.eval.runner import RunConfig, evaluate, select_examples

sys.path.insert(0, str(Path(__file__).parent))
from test_eval_datasets import FIXTURE, _broken_rows, bpe_tokenizer  # noqa: E402


def tiny_llama(vocab: int, tok, layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # peaked attention, so methods and rows really differ
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
    return model


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    """A tiny random Llama saved with the demo tokenizer: stands in for the embedded demo model."""
    path = tmp_path_factory.mktemp("tiny-demo")
    tok = build_tokenizer()
    tiny_llama(len(tok), tok).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _tables(out: Path):
    return pq.read_table(out / "examples.parquet"), pq.read_table(out / "attribution.parquet")


def _run(argv) -> int:
    return main(["eval", *map(str, argv)])


DEMO_ARGS = ["--seed", 3, "--no-progress", "--views", 0, "--max-new-tokens", 2]


# --- method plumbing ----------------------------------------------------------------------------
def test_answer_rows_span_sums_and_random_scores():
    from attnflow.eval.methods import answer_rows, random_scores, span_sums

    # example 0: prompt 4, answer 2, pad 1 -> rows 3, 4 unpadded = 4, 5 padded; example 1: empty answer -> row P-1
    rows, mask = answer_rows(prompt_lengths=[4, 6], answer_lengths=[2, 0], pad_offsets=[1, 0])
    assert rows.tolist() == [[4, 5], [5, 5]] and mask.tolist() == [[True, True], [True, False]]
    scores = torch.tensor([[0.0, 1, 2, 3, 4, 5], [1, 1, 1, 1, 1, 1]])
    sums = span_sums(scores, torch.tensor([[1, 3], [0, 2]]), torch.tensor([[3, 3], [6, 2]]))
    assert sums.tolist() == [[3.0, 0.0], [6.0, 0.0]]  # [1:3] = 1 + 2; empty spans sum to 0
    assert random_scores(4).tolist() == [0.25] * 4 and random_scores(0).shape == (0,)
    assert METHOD_NAMES[0] == "random" and len(ATTENTION_NAMES) == 23 and METHOD_NAMES == ATTENTION_NAMES + ("at2", "loo")
    assert {"rollout/sinks", "sum/nosink", "maxflow", "maxflow/sinks"} <= set(METHOD_NAMES)


# --- scores against an independent reference ---------------------------------------------------
def test_scores_match_eager_attention_with_the_t_plus_one_alignment(tmp_path):
    """raw (last layer) and rollout span scores == float64 recomputation from eager output_attentions."""
    tok = build_tokenizer()
    model = tiny_llama(len(tok), tok)
    config = RunConfig(task="demo", seed=7, limit=3, mode="teacher", batch_size=3)
    examples, problems = select_examples(config)
    evaluate(examples, problems, model, tok, tmp_path, config, progress=False, views=0, report=False)
    _, at = _tables(tmp_path)
    got = {(r["index"], r["level"], r["method"]): r["scores"] for r in at.to_pylist()}
    eager = LlamaForCausalLM(model.config).eval()
    eager.load_state_dict(model.state_dict())
    eager.config._attn_implementation = "eager"
    for ex in examples:
        p = build_prompt(ex, tok)
        answer = tok(" " + ex.answer, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p.input_ids + answer])
        with torch.no_grad():
            att = eager(ids, output_attentions=True).attentions
        A = torch.stack([a[0].double().mean(0) for a in att])  # [layer, query, key], heads averaged
        rows = list(range(len(p) - 1, len(p) - 1 + len(answer)))  # row t produces token t+1
        raw = A[-1, rows].mean(0)
        R = torch.eye(A.shape[-1], dtype=torch.float64)
        for layer in A:  # rollout, alpha 0.5
            R = (0.5 * layer + 0.5 * torch.eye(len(layer), dtype=torch.float64)) @ R
        roll = R[rows].mean(0)
        for name, ref in (("raw", raw), ("rollout", roll)):
            want = [float(ref[s.start : s.end].sum()) for s in p.paragraph_spans]
            np.testing.assert_allclose(got[(ex.index, "paragraph", name)], want, rtol=1e-4, atol=1e-6)
        # nosink: BOS column dropped and rows renormalised before composing
        raw_ns = A[-1, rows, 1:] / A[-1, rows, 1:].sum(-1, keepdim=True)
        want = [float(raw_ns.mean(0)[s.start - 1 : s.end - 1].sum()) for s in p.paragraph_spans]
        np.testing.assert_allclose(got[(ex.index, "paragraph", "raw/nosink")], want, rtol=1e-4, atol=1e-6)


# --- resumability ---------------------------------------------------------------------------------
@pytest.mark.slow  # a subprocess that imports torch + nnsight, and three runs
def test_kill_and_resume_gives_the_uninterrupted_results(tmp_path, demo_dir):
    n = 12
    args = ["demo", "--model", demo_dir, "--limit", n, "--batch-size", 2, *DEMO_ARGS]
    killed = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "attnflow", "eval", *map(str, args), "--out", str(killed)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    parts = killed / "parts"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if parts.is_dir() and len([p for p in parts.iterdir() if not p.name.startswith(".")]) >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    rc = proc.wait(timeout=60)
    assert rc == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    committed = [p for p in parts.iterdir() if not p.name.startswith(".")]
    assert 2 <= len(committed) < n // 2 and not (killed / "examples.parquet").exists()

    # without --resume the directory is refused; with other settings too
    assert _run([*args, "--out", killed]) == 2
    assert _run([*args[:-2], "--max-new-tokens", 3, "--out", killed, "--resume"]) == 2

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the killed subprocess had
    try:
        assert _run([*args, "--out", killed, "--resume"]) == 0
        assert _run([*args, "--out", tmp_path / "straight"]) == 0
    finally:
        torch.set_num_threads(threads)
    ex_k, at_k = _tables(killed)
    ex_s, at_s = _tables(tmp_path / "straight")
    assert ex_k.num_rows == n and at_k.num_rows == n * (2 * len(ATTENTION_NAMES) + 2)  # + paragraph loo, at2
    assert ex_k.equals(ex_s) and at_k.equals(at_s)
    assert pq.read_table(killed / "summary.parquet").equals(pq.read_table(tmp_path / "straight" / "summary.parquet"))
    # resuming a finished run changes nothing
    assert _run([*args, "--out", killed, "--resume"]) == 0
    assert _tables(killed)[1].equals(at_s)


def test_shards_merge_to_the_full_run(tmp_path, demo_dir, capsys):
    args = ["demo", "--model", demo_dir, "--limit", 5, "--mode", "teacher", *DEMO_ARGS]  # batch size 1: exact
    assert _run([*args, "--out", tmp_path / "full"]) == 0
    for i in range(2):
        assert _run([*args, "--shard", f"{i}/2", "--out", tmp_path / f"s{i}"]) == 0
    assert pq.read_table(tmp_path / "s1" / "examples.parquet")["index"].to_pylist() == [1, 3]
    assert main(["eval", "merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(tmp_path / "m")]) == 0
    ex_f, at_f = _tables(tmp_path / "full")
    ex_m, at_m = _tables(tmp_path / "m")
    assert ex_m.equals(ex_f) and at_m.equals(at_f)
    capsys.readouterr()
    assert main(["eval", "merge", str(tmp_path / "s0"), str(tmp_path / "full"), "--out", str(tmp_path / "bad")]) == 2
    assert "do not split one run" in capsys.readouterr().err
    assert _run([*args, "--shard", "2/2", "--out", tmp_path / "x"]) == 2


# --- bad input --------------------------------------------------------------------------------------
def test_missing_data_file_exits_2_with_one_line(tmp_path, capsys):
    rc = _run(["hotpotqa", "--model", tmp_path, "--data", tmp_path / "missing.json", "--out", tmp_path / "o"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "no data file" in err


def test_malformed_and_too_long_rows_are_skipped_and_counted(tmp_path):
    rows = _broken_rows()
    rows[0]["question"] = "Who </script><b>wrote</b> this & that?"
    data = tmp_path / "dev.json"
    data.write_text(json.dumps(rows))
    tok = bpe_tokenizer()
    model = tiny_llama(len(tok), tok)
    # fixture prompts have ~330-480 tokens; 420 leaves some too long
    config = RunConfig(task="hotpotqa", data=str(data), max_context_tokens=420, max_new_tokens=2, batch_size=2)
    examples, problems = select_examples(config)
    facts = evaluate(examples, problems, model, tok, tmp_path / "out", config, progress=False, views=2)
    ex, at = _tables(tmp_path / "out")
    status = dict(zip(ex["id"].to_pylist(), ex["status"].to_pylist()))
    assert [status[f"bad{i}"] for i in range(6)] == ["malformed"] * 6 and status["row 10"] == "malformed"
    n_ok, n_long = list(status.values()).count("ok"), list(status.values()).count("too_long")
    assert n_ok >= 1 and n_long >= 1 and n_ok + n_long == 4
    assert f"{n_ok} examples evaluated" in facts["text"] and f"{n_long} too long, 7 malformed" in facts["text"]
    assert at.num_rows == n_ok * (2 * len(ATTENTION_NAMES) + 1) + (n_ok >= 2) * n_ok  # + loo; at2 needs 2 examples
    assert set(at["id"].to_pylist()) == {i for i, s in status.items() if s == "ok"}
    # sentence-level rows have one score per sentence of the example
    by_id = {r["id"]: r for r in ex.to_pylist()}
    for r in at.to_pylist():
        key = "sentences" if r["level"] == "sentence" else "paragraphs"
        assert len(r["scores"]) == len(by_id[r["id"]][key])
        if r["method"] == "random":  # exact expectation: precision@1 = |S| / n
            gold = by_id[r["id"]]["gold_" + key]
            assert r["precision@1"] == pytest.approx(sum(gold) / len(gold)) and r["auroc"] == 0.5
    out = tmp_path / "out"
    for name in ("summary.parquet", "summary.md", "precision_recall.png", "explorer.html", "config.json"):
        assert (out / name).is_file(), name
    page = (out / "explorer.html").read_text()
    assert "</script><b>" not in page and "\\u003c/script\\u003e\\u003cb\\u003ewrote" in page
    summary = pq.read_table(out / "summary.parquet").to_pylist()
    # 13 gold metrics per (level, method); the 3 LOO metrics at paragraph level only (no sentence LOO); + EM, F1
    keys = {(r["level"], r["method"], r["metric"]) for r in summary if r["subset"] == "all"}
    reference = ("loo", "at2") if n_ok >= 2 else ("loo",)
    gold_keys = {(lv, m, k) for lv in ("paragraph", "sentence") for m in ATTENTION_NAMES for k in M.metric_names()}
    gold_keys |= {("paragraph", m, k) for m in reference for k in M.metric_names()}
    loo_keys = {k for k in keys if k[2] in M.LOO_METRICS}
    assert keys == gold_keys | loo_keys | {("answer", "-", "em"), ("answer", "-", "f1")}
    assert {lv for lv, _, _ in loo_keys} == {"paragraph"} and ("paragraph", "rollout", "spearman_loo") in loo_keys
    n_wrong = sum(r["em"] == 0.0 for r in ex.to_pylist())
    assert {r["n"] for r in summary if r["subset"] == "wrong" and r["metric"] == "mrr"} == ({n_wrong} if n_wrong else set())
    # attention views for the ok examples with index < 2 (views=2), linked from the explorer
    ok_index = sorted(by_id[i]["index"] for i, s in status.items() if s == "ok")
    assert sorted(int(p.name) for p in (out / "views").iterdir()) == [i for i in ok_index if i < 2] != []
    assert f"views/{ok_index[0]:09d}/index.html" in page


def test_teacher_mode_forces_the_gold_answer(tmp_path):
    tok = bpe_tokenizer(chat=True)
    model = tiny_llama(len(tok), tok)
    config = RunConfig(task="hotpotqa", data=str(FIXTURE), mode="teacher", limit=2, batch_size=2)
    examples, problems = select_examples(config)
    evaluate(examples, problems, model, tok, tmp_path, config, progress=False, views=0)
    ex, _ = _tables(tmp_path)
    for r, e in zip(ex.to_pylist(), examples):
        assert r["status"] == "ok" and r["prediction"] is None and r["em"] is None
        assert r["answer_tokens"] == len(tok(e.answer, add_special_tokens=False)["input_ids"])  # chat: no leading space
