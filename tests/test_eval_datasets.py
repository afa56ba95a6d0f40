"""HotPotQA loading (official + HF layouts), bad rows, prompts and spans from offsets."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from attnflow.errors import DataError
from attnflow.eval import datasets as D
from attnflow.eval.prompts import build_prompt, render_hotpotqa, token_ranges

FIXTURE = Path(__file__).parent / "data" / "hotpot_mini.json"


def bpe_tokenizer(chat: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the fixture (offline, < 1 s): real subword merges and leading-space tokens."""
    rows = json.loads(FIXTURE.read_text())
    corpus = [s for r in rows for _, sents in r["context"] for s in sents] + [r["question"] for r in rows]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    core.train_from_iterator(corpus * 3, trainer)
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", padding_side="left"
    )
    if chat:
        tok.chat_template = (
            "{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
        )
    return tok


# --- loading ------------------------------------------------------------------------------
def test_official_json_loads_every_row():
    examples, problems = D.load_hotpotqa(FIXTURE)
    assert problems == [] and len(examples) == 4
    ex = examples[1]
    assert ex.id == "5a8c7595554299585d9e36b6" and ex.answer == "Chief of Protocol" and ex.index == 1
    assert [p.title for p in ex.paragraphs] == ["Meet Corliss Archer", "Shirley Temple", "Kiss and Tell (1945 film)"]
    assert ex.supporting == (("Kiss and Tell (1945 film)", 0), ("Shirley Temple", 0), ("Shirley Temple", 1))
    assert ex.gold_titles == {"Kiss and Tell (1945 film)", "Shirley Temple"}


def _hf_row(r):
    return {
        "id": r["_id"],
        "question": r["question"],
        "answer": r["answer"],
        "type": r["type"],
        "level": r["level"],
        "supporting_facts": {"title": [t for t, _ in r["supporting_facts"]], "sent_id": [s for _, s in r["supporting_facts"]]},
        "context": {"title": [t for t, _ in r["context"]], "sentences": [s for _, s in r["context"]]},
    }


def test_hf_parquet_and_jsonl_layouts_match_the_official_file(tmp_path):
    rows = [_hf_row(r) for r in json.loads(FIXTURE.read_text())]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "dev.parquet")
    (tmp_path / "dev.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    official, _ = D.load_hotpotqa(FIXTURE)
    for name in ("dev.parquet", "dev.jsonl"):
        got, problems = D.load_hotpotqa(tmp_path / name)
        assert problems == [] and got == official, name


def test_missing_or_unreadable_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no data file"):
        D.load_hotpotqa(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="cannot read"):
        D.load_hotpotqa(tmp_path / "bad.json")
    (tmp_path / "obj.json").write_text('{"a": 1}')
    with pytest.raises(DataError, match="expected a list"):
        D.load_hotpotqa(tmp_path / "obj.json")


def _broken_rows():
    good = json.loads(FIXTURE.read_text())
    rows = [json.loads(json.dumps(r)) for r in good[:1] * 7]
    for i, r in enumerate(rows):
        r["_id"] = f"bad{i}"
    del rows[0]["answer"]  # missing field
    rows[1]["supporting_facts"][0][1] = 5  # Scott Derrickson has 2 sentences
    rows[2]["context"][1][0] = "Ed Wood"  # duplicate title
    rows[3]["context"] = []  # empty context
    rows[4]["supporting_facts"] = [["Nobody", 0]]  # title not in context
    rows[5]["context"] = "text"  # wrong type
    del rows[6]["_id"]
    return good + rows


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_malformed_rows_are_reported_with_their_id_and_skipped(tmp_path, suffix):
    rows = _broken_rows()
    path = tmp_path / f"dev{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{oops\n")
    examples, problems = D.load_hotpotqa(path)
    assert len(examples) == 4
    reasons = {p.id: p.reason for p in problems}
    assert "missing field 'answer'" in reasons["bad0"]
    assert "out of range" in reasons["bad1"] and "2 sentences" in reasons["bad1"]
    assert "duplicate paragraph title 'Ed Wood'" in reasons["bad2"]
    assert "'context' is empty" in reasons["bad3"]
    assert "names no paragraph" in reasons["bad4"]
    assert "'context' is a str" in reasons["bad5"]
    assert "missing field '_id'" in reasons["row 10"]
    if suffix == ".jsonl":
        assert "not JSON" in reasons["row 11"]


def test_demo_examples_are_single_sentence_paragraphs():
    ex = D.demo_examples(3, seed=5)
    assert [e.id for e in ex] == ["demo-5-0", "demo-5-1", "demo-5-2"] and ex == D.demo_examples(3, seed=5)
    for e in ex:
        assert e.style == "demo" and all(len(p.sentences) == 1 for p in e.paragraphs)
        assert all(sid == 0 for _, sid in e.supporting) and e.gold_titles <= {p.title for p in e.paragraphs}


# --- prompts and spans ----------------------------------------------------------------------
def test_token_ranges_use_the_first_non_space_character():
    text = "ab cd\n ef"
    offsets = np.array([[0, 0], [0, 2], [2, 5], [5, 7], [7, 9]])  # <s>, "ab", " cd", "\n ", "ef"
    assert token_ranges(text, offsets, [(0, 2), (3, 5), (7, 9), (5, 5)]) == [(1, 2), (2, 3), (4, 5), (3, 3)]


@pytest.mark.parametrize("chat", [False, True])
def test_spans_cover_exactly_their_text(chat):
    tok = bpe_tokenizer(chat)
    examples, _ = D.load_hotpotqa(FIXTURE)
    for ex in examples:
        p = build_prompt(ex, tok)
        assert p.input_ids == tok(p.text, add_special_tokens=not chat)["input_ids"]
        assert tok.convert_ids_to_tokens(p.input_ids[:1]) == ["<s>"]
        if chat:
            assert p.text.startswith("<s><|user|>\n") and p.text.endswith("Answer:</s>\n<|assistant|>\n")
        offsets = tok(p.text, add_special_tokens=not chat, return_offsets_mapping=True)["offset_mapping"]
        spans = p.sentence_spans
        assert [s.kind for s in p.paragraph_spans] == ["document"] * len(ex.paragraphs)
        assert len(spans) == sum(len(q.sentences) for q in ex.paragraphs)
        for s in p.spans:
            piece = p.text[offsets[s.start][0] : offsets[s.end - 1][1]]
            # the span's tokens decode to its characters (a leading space may ride along)
            assert piece.strip() == p.text[s.char_start : s.char_end].strip(), s
        for a, b in zip(spans, spans[1:]):
            assert a.end <= b.start  # sentences never overlap
        # paragraph span contains its sentences and its title
        for i, para in enumerate(p.paragraph_spans):
            inner = [s for s, (t, _) in zip(spans, p.sentence_keys) if t == ex.paragraphs[i].title]
            assert para.start < inner[0].start and inner[-1].end == para.end
            assert ex.paragraphs[i].title in p.text[para.char_start : para.char_end]


def test_gold_labels_follow_title_and_sent_id():
    ex = D.load_hotpotqa(FIXTURE)[0][1]
    p = build_prompt(ex, bpe_tokenizer())
    assert p.gold_paragraphs.tolist() == [False, True, True]
    assert p.sentence_keys == [("Meet Corliss Archer", 0), ("Meet Corliss Archer", 1), ("Shirley Temple", 0),
                               ("Shirley Temple", 1), ("Kiss and Tell (1945 film)", 0), ("Kiss and Tell (1945 film)", 1)]  # fmt: skip
    assert p.gold_sentences.tolist() == [False, False, True, True, True, False]
    assert p.sentence_spans[3].name == "Shirley Temple [1]"
    assert "Chief of Protocol" in p.text[p.sentence_spans[3].char_start : p.sentence_spans[3].char_end]


def test_render_keeps_sentences_apart_and_ends_with_answer_cue():
    ex = D.load_hotpotqa(FIXTURE)[0][0]
    r = render_hotpotqa(ex)
    assert r.text.endswith(f"Question: {ex.question}\nAnswer:")
    s0, s1 = r.sentences[0][2:], r.sentences[1][2:]
    assert r.text[s0[0] : s0[1]].endswith("Tim Burton,") and r.text[s1[0] : s1[1]].startswith("and starring")
    assert r.text[s0[1] : s1[0]] == " "


def test_demo_prompt_uses_the_demo_format_and_spans():
    from attnflow.demo.task import render_prompt, generate
    from attnflow.demo.tokenizer import build_tokenizer

    tok = build_tokenizer()
    ex = D.demo_examples(4, seed=3)
    raw = generate(4, seed=3)
    for e, r in zip(ex, raw):
        p = build_prompt(e, tok)
        text, doc_ranges = render_prompt(r)
        assert p.text == text
        toks = tok.convert_ids_to_tokens(p.input_ids)
        for s, d in zip(p.paragraph_spans, r.documents):
            assert " ".join(toks[s.start : s.end]) == d.text
        assert p.gold_paragraphs.tolist() == [i in r.support for i in range(len(r.documents))]
        assert (p.gold_sentences == p.gold_paragraphs).all()
