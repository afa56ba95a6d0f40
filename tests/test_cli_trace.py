"""`attnflow trace` with chat templates, prompt files and documents; `attnflow convert`; output folders that never destroy.

References are independent of attnflow's recording and composition: `model.generate` for the
completion, eager `output_attentions=True` composed by hand (rollout in float64) for the shares,
and the tokenizer run on the document text alone for the span positions.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_models import eager_copy, eager_patterns, tiny_model, tiny_tokenizer, write_gguf

import attnflow as af
from attnflow import cli
from attnflow.errors import BadArgumentError, DataError, PromptError
from attnflow.outdirs import check_out_dir, output_kind
from attnflow.prompting import Document, build_prompt, document_block, read_documents, read_prompts

DOCS = {"paris": "alice lives in paris .", "london": "bob lives in london ."}
QUESTION = "where does alice live ?"


@pytest.fixture(scope="module")
def hf():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def chat_dir(hf, tmp_path_factory):
    d = tmp_path_factory.mktemp("chat_model")
    hf.save_pretrained(d)
    tiny_tokenizer(chat_template=True).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def plain_dir(hf, tmp_path_factory):
    d = tmp_path_factory.mktemp("plain_model")
    hf.save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


@pytest.fixture
def docs_file(tmp_path):
    f = tmp_path / "docs.json"
    f.write_text(json.dumps(DOCS))
    return f


def run_cli(args, capsys):
    code = cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def bad(args, capsys, match):
    """Exit 2 with one line on stderr naming the problem."""
    code, out, err = run_cli(args, capsys)
    assert code == 2, (out, err)
    assert err.count("\n") == 1 and err.startswith("attnflow: error: "), err
    assert match in err, err
    return err


def generate_ids(hf, tok, messages, n):
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok(text, add_special_tokens=False).input_ids])
    with torch.no_grad():
        out = hf.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return ids[0].tolist(), out[0, ids.shape[1] :].tolist()


def display(tok, ids):
    """Word-level display text: each word with its space; special tokens as their raw string (attnflow.tokens)."""
    return "".join(w if t in tok.all_special_ids else " " + w for t, w in zip(ids, tok.convert_ids_to_tokens(ids)))


def rollout_shares(hf, ids, prompt_len, spans, exclude=()):
    """Mean over completion rows of each span's share of the rollout row, from eager attention, in float64."""
    A = eager_patterns(eager_copy(hf), ids).double().mean(1)  # [layer, query, key]
    A[:, :, list(exclude)] = 0
    A = A / A.sum(-1, keepdim=True).clamp_min(1e-300)  # a row left with no mass stays zero
    n = len(ids)
    R = torch.eye(n, dtype=torch.float64)
    for layer in A:
        step = 0.5 * layer + 0.5 * torch.eye(n, dtype=torch.float64)
        R = (step / step.sum(-1, keepdim=True)) @ R
    rows = R[prompt_len - 1 : n - 1]  # the rows producing the completion tokens
    rows = rows / rows.sum(-1, keepdim=True)
    return [float(rows[:, a:b].sum(-1).mean()) for a, b in spans]


# --- chat + documents end to end ------------------------------------------------------------------
def test_chat_documents_json_matches_generate_and_hand_rollout(hf, chat_dir, docs_file, tmp_path, capsys):
    code, out, err = run_cli(
        ["trace", chat_dir, "--chat", "--system", "be brief", "--documents", docs_file, "--prompt", QUESTION,
         "--max-new-tokens", 3, "--json", "--no-progress", "--out", tmp_path / "tr"], capsys,
    )  # fmt: skip
    assert code == 0, err
    result = json.loads(out)  # stdout is exactly one JSON object
    tok = tiny_tokenizer(chat_template=True)
    block = "Document [1]: paris\nalice lives in paris .\n\nDocument [2]: london\nbob lives in london .\n\nQuestion: " + QUESTION
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": block}]
    prompt_ids, new = generate_ids(hf, tok, messages, 3)
    ex = result["examples"][0]
    assert ex["completion"] == display(tok, new)
    assert ex["completion_tokens"] == 3 and result["prompt_tokens"] == [len(prompt_ids)]
    # each span is exactly the document's block, tokenized on its own
    for doc in ex["documents"]:
        alone = tok(f"Document [{list(DOCS).index(doc['name']) + 1}]: {doc['name']}\n{DOCS[doc['name']]}").input_ids
        assert prompt_ids[doc["start"] : doc["end"]] == alone
    spans = {d["name"]: (d["start"], d["end"]) for d in ex["documents"]}
    ref = rollout_shares(hf, prompt_ids + new, len(prompt_ids), [spans["paris"], spans["london"]])
    got = {d["name"]: d["share"] for d in ex["documents"]}
    np.testing.assert_allclose([got["paris"], got["london"]], ref, atol=3e-3)  # float16 storage
    assert [d["rank"] for d in ex["documents"]] == [1, 2] and ex["documents"][0]["share"] >= ex["documents"][1]["share"]
    assert abs(sum(got.values()) + ex["other_share"] - 1) < 1e-6
    for doc in ex["documents"]:  # a document's top tokens lie inside it and are part of its share
        assert all(doc["start"] <= t["position"] < doc["end"] for t in doc["top_tokens"])
        assert sum(t["share"] for t in doc["top_tokens"]) <= doc["share"] + 1e-6
    saved = af.AttentionTrace.load(tmp_path / "tr")
    *docs, question = saved.spans[0]  # the documents, then the question (what a calibration replaces)
    assert [(s.name, s.kind, s.start, s.end) for s in docs] == [(d["name"], "document", d["start"], d["end"]) for d in sorted(ex["documents"], key=lambda d: d["start"])]
    assert question.kind == "question" and tok.decode(prompt_ids[question.start : question.end]) == QUESTION
    assert result["saved"] == str(tmp_path / "tr") and result["method"] == "rollout"


def test_text_output_prints_completion_and_document_shares(hf, chat_dir, docs_file, capsys):
    code, out, _ = run_cli(["trace", chat_dir, "--chat", "--documents", docs_file, "--prompt", QUESTION,
                            "--max-new-tokens", 2, "--no-progress"], capsys)  # fmt: skip
    assert code == 0
    lines = out.splitlines()
    assert "not saved" in lines[0] and lines[1].startswith("[0] completion (2 tokens): ")
    assert lines[2].strip() == "rollout shares over the completion:"
    named = [line.split()[1] for line in lines[3:5]]
    assert sorted(named) == ["london", "paris"] and lines[5].split()[0] == "other"
    shares = [float(line.split()[2]) for line in lines[3:5]] + [float(lines[5].split()[1])]
    assert shares[0] >= shares[1] and abs(sum(shares) - 1) < 2e-3


@pytest.mark.parametrize("method", ["raw", "sum", "flow"])
def test_flow_methods_differ_and_raw_matches_last_layer(hf, chat_dir, docs_file, capsys, method):
    code, out, _ = run_cli(["trace", chat_dir, "--chat", "--documents", docs_file, "--prompt", QUESTION,
                            "--max-new-tokens", 2, "--flow", method, "--json", "--no-progress"], capsys)  # fmt: skip
    ex = json.loads(out)["examples"][0]
    assert code == 0 and ex["method"] == method
    if method == "raw":
        tok = tiny_tokenizer(chat_template=True)
        prompt_ids, new = generate_ids(hf, tok, [{"role": "user", "content": document_block(
            [Document(k, v) for k, v in DOCS.items()], QUESTION)[0]}], 2)  # fmt: skip
        ids = prompt_ids + new
        A = eager_patterns(eager_copy(hf), ids).double().mean(1)[-1]  # last layer, heads averaged
        rows = A[len(prompt_ids) - 1 : len(ids) - 1]
        for d in ex["documents"]:
            assert abs(d["share"] - float(rows[:, d["start"] : d["end"]].sum(-1).mean())) < 3e-3


def test_exclude_keys_renormalises_without_the_sink(hf, chat_dir, docs_file, capsys):
    code, out, _ = run_cli(["trace", chat_dir, "--chat", "--documents", docs_file, "--prompt", QUESTION,
                            "--max-new-tokens", 2, "--exclude-keys", "0", "--json", "--no-progress"], capsys)  # fmt: skip
    ex = json.loads(out)["examples"][0]
    tok = tiny_tokenizer(chat_template=True)
    block = document_block([Document(k, v) for k, v in DOCS.items()], QUESTION)[0]
    prompt_ids, new = generate_ids(hf, tok, [{"role": "user", "content": block}], 2)
    spans = [(d["start"], d["end"]) for d in ex["documents"]]
    ref = rollout_shares(hf, prompt_ids + new, len(prompt_ids), spans, exclude=(0,))
    np.testing.assert_allclose([d["share"] for d in ex["documents"]], ref, atol=3e-3)
    assert all(t["position"] != 0 for t in ex["top_tokens"])


def test_prompt_file_lines_and_jsonl_chats(hf, chat_dir, tmp_path, capsys):
    lines = tmp_path / "prompts.txt"
    lines.write_text("the cat sat\n\nalice lives in paris\n")
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps([{"role": "user", "content": "where does bob live ?"}]) + "\n"
                     + json.dumps({"messages": [{"role": "user", "content": "the dog ran"}]}) + "\n")  # fmt: skip
    assert read_prompts(lines) == ["the cat sat", "alice lives in paris"]
    code, out, _ = run_cli(["trace", chat_dir, "--prompt-file", chats, "--prompt", "a cat", "--chat",
                            "--max-new-tokens", 2, "--json", "--no-progress"], capsys)  # fmt: skip
    assert code == 0
    result = json.loads(out)
    tok = tiny_tokenizer(chat_template=True)
    asked = ["a cat", "where does bob live ?", "the dog ran"]
    for ex, text in zip(result["examples"], asked, strict=True):
        _, new = generate_ids(hf, tok, [{"role": "user", "content": text}], 2)
        stop = next((i + 1 for i, t in enumerate(new) if t == 2), len(new))  # cut after <eos>, as af.trace does
        assert ex["completion"] == display(tok, new[:stop])
        assert ex["documents"] == [] and len(ex["top_tokens"]) == 3
    code, out, _ = run_cli(["trace", chat_dir, "--prompt-file", lines, "--json", "--no-progress"], capsys)
    result = json.loads(out)
    assert code == 0 and result["prompt_tokens"] == [3, 4] and result["examples"][0]["targets"] == "last"


def test_plain_prompt_with_documents_spans_via_offsets(chat_dir, docs_file, capsys):
    code, out, _ = run_cli(["trace", chat_dir, "--documents", docs_file, "--prompt", QUESTION,
                            "--max-new-tokens", 1, "--json", "--no-progress"], capsys)  # fmt: skip
    ex = json.loads(out)["examples"][0]
    assert code == 0
    # no template: the block starts the prompt; "Document [1]: paris" + 5 words, then 2 + 5 words
    assert [(d["name"], d["start"], d["end"]) for d in sorted(ex["documents"], key=lambda d: d["start"])] == [
        ("paris", 0, 8), ("london", 8, 16)]  # fmt: skip


def test_build_prompt_locates_documents_in_a_rendered_template():
    tok = tiny_tokenizer(chat_template=True)
    docs = [Document(k, v) for k, v in DOCS.items()]
    p = build_prompt([{"role": "user", "content": "first"}, {"role": "assistant", "content": "ok"},
                      {"role": "user", "content": QUESTION}], tok, documents=docs)  # fmt: skip
    enc = tok(p.text, add_special_tokens=False, return_offsets_mapping=True)
    for s, d in zip(p.spans, docs):
        a, b = enc.offset_mapping[s.start][0], enc.offset_mapping[s.end - 1][1]
        assert p.text[a:b] == f"Document [{docs.index(d) + 1}]: {d.name}\n{d.text}" == p.text[s.char_start : s.char_end]
    assert p.prompt[0]["content"] == "first" and p.prompt[-1]["content"].endswith("Question: " + QUESTION)


# --- the weights' dtype, storage dtype and device -------------------------------------------------
def test_model_dtype_and_storage_dtype_are_separate(chat_dir, tmp_path, capsys):
    patterns = {}
    for weights in ("float32", "bfloat16"):
        code, out, _ = run_cli(["trace", chat_dir, "--prompt", "alice lives in paris", "--model-dtype", weights,
                                "--dtype", "float32", "--out", tmp_path / weights, "--json", "--no-progress"], capsys)  # fmt: skip
        result = json.loads(out)
        assert code == 0 and result["patterns"]["dtype"] == "float32" and result["model_dtype"] == weights
        assert result["device"] == "cpu" or torch.cuda.is_available()
        patterns[weights] = af.AttentionTrace.load(tmp_path / weights).patterns
        assert patterns[weights].dtype == torch.float32
    diff = (patterns["float32"] - patterns["bfloat16"]).abs().max()
    assert 0 < diff < 0.1  # bfloat16 weights change the attention a little: they were used
    bad(["trace", chat_dir, "--prompt", "x", "--model-dtype", "float99", "--no-progress"], capsys, "dtype='float99'")
    bad(["trace", chat_dir, "--prompt", "x", "--device", "tpu"], capsys, "--device 'tpu'")
    if not torch.cuda.is_available():
        bad(["trace", chat_dir, "--prompt", "x", "--device", "cuda"], capsys, "no CUDA device")


def test_memory_budget_reaches_the_options_and_changes_no_pattern(chat_dir, tmp_path, capsys):
    from attnflow.cli.trace import options_from_args

    args = cli.build_parser().parse_args(["trace", str(chat_dir), "--prompt", "x", "--memory-budget", "512MB"])
    assert options_from_args(args).memory_budget == 512 * 2**20
    default = options_from_args(cli.build_parser().parse_args(["trace", str(chat_dir), "--prompt", "x"]))
    assert default.memory_budget == af.TraceOptions().memory_budget
    patterns = {}
    for budget in ("1", "1GiB"):  # 1 byte: one query row per chunk; 1 GiB: every row at once
        code, _, _ = run_cli(["trace", chat_dir, "--prompt", "alice lives in paris .", "--memory-budget", budget,
                              "--dtype", "float32", "--out", tmp_path / budget, "--no-progress"], capsys)  # fmt: skip
        assert code == 0
        patterns[budget] = af.AttentionTrace.load(tmp_path / budget).patterns
    assert patterns["1"].shape[3] > 1  # chunks of other shapes round differently in the last bits, no more
    assert (patterns["1"] - patterns["1GiB"]).abs().max() <= 1e-6
    for value in ("lots", "0", "1.5.2GB", "2 PB"):
        bad(["trace", chat_dir, "--prompt", "x", "--memory-budget", value, "--no-progress"], capsys, f"--memory-budget {value!r}")


def test_eval_takes_model_dtype_and_refuses_dtype(capsys):
    from attnflow.cli.eval import config_from_args

    args = cli.build_parser().parse_args(["eval", "demo", "--out", "x", "--model-dtype", "bfloat16"])
    assert config_from_args(args).dtype == "bfloat16"
    bad(["eval", "demo", "--out", "x", "--dtype", "float16"], capsys, "use --model-dtype")


# --- bad input: one line, exit 2 ------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, match",
    [
        (lambda d: d / "missing.json", "no documents file at"),
        (lambda d: (d / "b.json").write_text("{not json") and d / "b.json", "not valid JSON"),
        (lambda d: (d / "b.json").write_text('{"a": 3}') and d / "b.json", 'needs a string "name" and a string "text"'),
        (lambda d: (d / "b.json").write_text('["x"]') and d / "b.json", "item 0"),
        (lambda d: (d / "b.json").write_text("{}") and d / "b.json", "holds no documents"),
        (lambda d: (d / "b.json").write_text('{"a": "  "}') and d / "b.json", "empty name or text"),
        (lambda d: (d / "b.jsonl").write_text('{"name": "a", "text": "x"}\n{"name": "a", "text": "y"}\n') and d / "b.jsonl",
         "appears more than once"),
        (lambda d: (d / "b.jsonl").write_text('{"name": "a", "text": "x"}\n{oops\n') and d / "b.jsonl", "b.jsonl:2: not valid JSON"),
        (lambda d: (d / "b.json").write_bytes(b"\xff\xfe\x00") and d / "b.json", "not UTF-8"),
        (lambda d: d, "is a folder"),
    ],
)
def test_bad_documents_file(chat_dir, tmp_path, capsys, make, match):
    bad(["trace", chat_dir, "--prompt", "x", "--documents", make(tmp_path), "--no-progress"], capsys, match)


@pytest.mark.parametrize(
    "text, match",
    [
        ('[{"role": "user"}]\n', "chats.jsonl:1: a chat is a list"),
        ('[{"role": "user", "content": "x"}]\n{"messages": 5}\n', "chats.jsonl:2: a chat is a list"),
        ("[1, 2\n", "chats.jsonl:1: not valid JSON"),
        ("\n\n", "holds no prompts"),
    ],
)
def test_bad_prompt_file(chat_dir, tmp_path, capsys, text, match):
    f = tmp_path / "chats.jsonl"
    f.write_text(text)
    bad(["trace", chat_dir, "--prompt-file", f, "--no-progress"], capsys, match)


def test_chat_without_a_template(plain_dir, docs_file, tmp_path, capsys):
    chats = tmp_path / "c.jsonl"
    chats.write_text('[{"role": "user", "content": "the cat"}]\n')
    for extra in (["--chat", "--prompt", "the cat"], ["--prompt-file", chats], ["--chat", "--documents", docs_file, "--prompt", "x"]):
        bad(["trace", plain_dir, *extra, "--no-progress"], capsys, "has no chat template")
    with pytest.raises(PromptError, match="no chat template"):
        build_prompt("x", tiny_tokenizer(), chat=True)


def test_gguf_truncated_or_unsupported(tmp_path, capsys):
    good = write_gguf(tmp_path / "m.gguf")
    bad(["trace", good, "--prompt", "x", "--no-progress"], capsys, "cannot load GGUF architecture 'mamba3x'")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    bad(["trace", cut, "--prompt", "x", "--no-progress"], capsys, "not a complete GGUF file")
    bad(["convert", cut, tmp_path / "out"], capsys, "not a complete GGUF file")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "extra, match",
    [
        ([], "no prompt; give --prompt"),
        (["--prompt", "x", "--system", "s"], "--system needs --chat"),
        (["--prompt", "x", "--flow", "magic"], "--flow 'magic'; use one of rollout"),
        (["--prompt", "x", "--flow", "rollout", "--rows", "last"], "--flow rollout needs"),
        (["--prompt", "x", "--exclude-keys", "a"], "--exclude-keys 'a' is not valid"),
        (["--prompt", "x", "--top", "-1"], "--top -1"),
    ],
)
def test_bad_flags(chat_dir, capsys, extra, match):
    bad(["trace", chat_dir, *extra, "--no-progress"], capsys, match)


def test_restricted_recording_without_flow_prints_one_line(chat_dir, tmp_path, capsys):
    code, out, _ = run_cli(["trace", chat_dir, "--prompt", "the cat", "--rows", "last", "--heads", "mean",
                            "--out", tmp_path / "t", "--no-progress"], capsys)  # fmt: skip
    assert code == 0 and out.count("\n") == 1 and str(tmp_path / "t") in out


# --- output folders that never destroy ------------------------------------------------------------
def test_out_never_destroys(chat_dir, docs_file, tmp_path, capsys):
    base = ["trace", chat_dir, "--prompt", "the cat", "--heads", "mean", "--no-progress"]
    user = tmp_path / "thesis"
    user.mkdir()
    (user / "thesis.tex").write_bytes(b"\\chapter{x}\n")
    for flags in ([], ["--overwrite"]):
        bad([*base, "--out", user, *flags], capsys, "holds files attnflow did not write")
    assert (user / "thesis.tex").read_bytes() == b"\\chapter{x}\n" and len(list(user.iterdir())) == 1
    file = tmp_path / "f"
    file.write_bytes(b"keep")
    bad([*base, "--out", file, "--overwrite"], capsys, "is a file")
    assert file.read_bytes() == b"keep" and sorted(p.name for p in tmp_path.iterdir()) == ["docs.json", "f", "thesis"]
    bad([*base, "--out", chat_dir, "--overwrite"], capsys, "is the input")
    bad([*base, "--documents", docs_file, "--out", tmp_path, "--overwrite"], capsys, "holds the input")
    assert (chat_dir / "config.json").is_file() and docs_file.is_file()
    # a trace attnflow wrote: replaced only with --overwrite
    out = tmp_path / "tr"
    assert run_cli([*base, "--out", out], capsys)[0] == 0
    before = (out / "manifest.json").read_bytes()
    bad([*base, "--prompt", "a dog", "--out", out], capsys, "(CLI: --overwrite) to replace it")
    assert (out / "manifest.json").read_bytes() == before
    assert run_cli([*base, "--prompt", "a dog", "--out", out, "--overwrite"], capsys)[0] == 0
    assert af.AttentionTrace.load(out).batch_size == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli([*base, "--out", empty], capsys)[0] == 0 and output_kind(empty) == "trace"


def test_check_out_dir_kinds(tmp_path):
    from attnflow.outdirs import write_marker

    model = tmp_path / "m"
    model.mkdir()
    write_marker(model, "model")
    assert output_kind(model) == "model"
    with pytest.raises(BadArgumentError, match="holds an attnflow model output, not a trace"):
        check_out_dir(model, "trace", overwrite=True)
    assert check_out_dir(model, "model", overwrite=True) == model
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "manifest.json").write_text('{"kind": "trace"}')  # no attnflow_version: not ours
    with pytest.raises(BadArgumentError, match="did not write"):
        check_out_dir(tmp_path / "x", "trace", overwrite=True)


def test_save_model_marks_its_folder_and_overwrites_only_it(hf, tmp_path):
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer()
    assert af.save_model is __import__("attnflow.gguf", fromlist=["save_model"]).save_model and "save_model" in af.__all__
    out = af.save_model(hf, tok, tmp_path / "m")
    assert output_kind(out) == "model"
    with pytest.raises(BadArgumentError, match="already holds an attnflow model"):
        af.save_model(hf, tok, out)
    af.save_model(hf, tok, out, overwrite=True)
    again = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(again(ids).logits, hf(ids).logits)
    user = tmp_path / "u"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(BadArgumentError, match="did not write"):
        af.save_model(hf, tok, user, overwrite=True)
    assert (user / "notes.txt").read_text() == "mine"


def test_convert_refuses_before_loading(tmp_path, capsys):
    file = write_gguf(tmp_path / "m.gguf")
    user = tmp_path / "u"
    user.mkdir()
    (user / "a").write_text("mine")
    bad(["convert", file, user, "--overwrite"], capsys, "OUT_DIR")
    bad(["convert", file, tmp_path, "--overwrite"], capsys, "holds the input")
    bad(["convert", tmp_path / "nope.gguf", tmp_path / "o"], capsys, "no GGUF file or folder")
    assert (user / "a").read_text() == "mine" and file.is_file()


def test_read_documents_formats(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(DOCS))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"name": k, "text": v}) + "\n" for k, v in DOCS.items()))
    (tmp_path / "c.json").write_text(json.dumps([{"name": k, "text": v} for k, v in DOCS.items()]))
    (tmp_path / "d.json").write_text(json.dumps({"name": "paris", "text": DOCS["paris"]}))  # one record
    want = [Document(k, v) for k, v in DOCS.items()]
    assert read_documents(tmp_path / "a.json") == read_documents(tmp_path / "b.jsonl") == read_documents(tmp_path / "c.json") == want
    assert read_documents(tmp_path / "d.json") == want[:1]
    with pytest.raises(DataError, match="holds a JSON int"):
        (tmp_path / "e.json").write_text("3")
        read_documents(tmp_path / "e.json")


def test_heads_file_records_the_weighted_head_mean(hf, chat_dir, tmp_path, capsys):
    """--heads FILE.safetensors (an eval run's AT2 fit) records Σ_h w_lh·P_lh / Σ_h w_lh, checked against eager attention."""
    from attnflow.eval.at2 import save_head_weights

    L, H = hf.config.num_hidden_layers, hf.config.num_attention_heads
    w = np.arange(1, L * H + 1, dtype=np.float64).reshape(L, H) ** 2
    w[0, 0] = 0.0  # a head the fit switched off
    weights = tmp_path / "at2_heads.safetensors"
    save_head_weights(weights, w)
    code, out, _ = run_cli(["trace", chat_dir, "--prompt", "alice lives in paris .", "--heads", weights,
                            "--dtype", "float32", "--out", tmp_path / "tr", "--json", "--no-progress"], capsys)  # fmt: skip
    assert code == 0 and json.loads(out)["patterns"]["heads"] == "weighted"
    tr = af.AttentionTrace.load(tmp_path / "tr")
    ref = eager_patterns(eager_copy(hf), tr.item(0).input_ids[0].tolist()).double()  # [layer, head, query, key]
    W = torch.tensor(w / w.sum(-1, keepdims=True))
    expected = torch.einsum("lhqk,lh->lqk", ref, W)
    assert tr.patterns.shape[2] == 1
    assert (tr.patterns[0, :, 0].double() - expected).abs().max() < 1e-6
    assert (tr.patterns[0, :, 0].double() - ref.mean(1)).abs().max() > 1e-3  # not the plain head mean

    save_head_weights(tmp_path / "wrong.safetensors", np.ones((L + 1, H)))
    bad(["trace", chat_dir, "--prompt", "x", "--heads", tmp_path / "wrong.safetensors", "--no-progress"], capsys,
        f"shape ({L + 1}, {H}); this model needs [layer, head] = ({L}, {H})")
    bad(["trace", chat_dir, "--prompt", "x", "--heads", tmp_path / "none.safetensors", "--no-progress"], capsys,
        "no head-weight file")
    bad(["trace", chat_dir, "--prompt", "x", "--heads", "median", "--no-progress"], capsys, "--heads 'median'")
