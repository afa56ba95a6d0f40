"""The demo task generator: unambiguous, deterministic, spans exact, two-hop needs both documents."""

from __future__ import annotations

import re

import pytest

from attnflow.demo import task
from attnflow.demo.tokenizer import build_tokenizer

FACT = re.compile(r"^(\w+) (lives in|works as|owns a|plays the|works with) (\w+) \.$")
PHRASE_TO_RELATION = {phrase: name for name, (phrase, _, _) in task.RELATIONS.items()} | {task.LINK: "link"}


def parse(doc: task.Document) -> tuple[str, str, str]:
    m = FACT.match(doc.text)
    assert m, f"document text {doc.text!r} is not a fact"
    return m.group(1), PHRASE_TO_RELATION[m.group(2)], m.group(3)


def question_target(question: str) -> tuple[str, str, bool]:
    """(entity, relation, through_colleague) asked for by a question, read back from its text independently."""
    for name, (_, template, _) in task.RELATIONS.items():
        pattern = "^" + re.escape(template).replace(r"\{\}", r"(the colleague of )?(\w+)") + "$"
        m = re.match(pattern, question)
        if m:
            return m.group(2), name, m.group(1) is not None
    raise AssertionError(f"unknown question {question!r}")


def answers(facts: list[tuple[str, str, str]], entity: str, relation: str, two_hop: bool) -> set[str]:
    """Every value the documents support for the question, derived by brute force."""
    if two_hop:
        colleagues = {b for a, r, b in facts if r == "link" and a == entity}
        colleagues |= {a for a, r, b in facts if r == "link" and b == entity}
        return {v for c in colleagues for v in answers(facts, c, relation, False)}
    return {v for e, r, v in facts if e == entity and r == relation}


EXAMPLES = {
    "single": task.generate(2000, seed=11),
    "two_hop": task.generate(2000, seed=12, two_hop=True),
    "mixed": task.generate(1000, seed=13, two_hop=0.5, min_docs=1, max_docs=task.MAX_DOCS),
}


@pytest.mark.parametrize("name", EXAMPLES)
def test_exactly_one_supported_answer(name):
    for ex in EXAMPLES[name]:
        facts = [parse(d) for d in ex.documents]
        entity, relation, two_hop = question_target(ex.question)
        assert two_hop == ex.two_hop
        assert answers(facts, entity, relation, two_hop) == {ex.answer}, ex
        # no (entity, relation) pair is stated twice anywhere, links counted for both people
        pairs = [(e, r) for e, r, _ in facts] + [(v, r) for _, r, v in facts if r == "link"]
        assert len(pairs) == len(set(pairs)), ex


@pytest.mark.parametrize("name", EXAMPLES)
def test_support_documents_are_the_ones_the_answer_needs(name):
    for ex in EXAMPLES[name]:
        facts = [parse(d) for d in ex.documents]
        entity, relation, two_hop = question_target(ex.question)
        assert len(ex.support) == (2 if two_hop else 1)
        for i in ex.support:  # dropping a supporting document loses the answer
            rest = facts[:i] + facts[i + 1 :]
            assert answers(rest, entity, relation, two_hop) == set(), ex
        kept = [facts[i] for i in ex.support]  # the supporting documents alone give it
        assert answers(kept, entity, relation, two_hop) == {ex.answer}


def test_two_hop_answer_is_not_stated_about_the_question_entity():
    for ex in EXAMPLES["two_hop"]:
        facts = [parse(d) for d in ex.documents]
        entity, relation, _ = question_target(ex.question)
        assert answers(facts, entity, relation, False) == set()
        link, fact = sorted((facts[i] for i in ex.support), key=lambda f: f[1] != "link")
        assert link[1] == "link" and entity in (link[0], link[2])
        assert fact[0] in (link[0], link[2]) and fact[0] != entity and fact[2] == ex.answer


def test_document_counts_and_variety():
    docs = [len(ex.documents) for ex in EXAMPLES["single"]]
    assert min(docs) == task.MIN_DOCS and max(docs) == task.DEFAULT_MAX_DOCS
    assert {question_target(ex.question)[1] for ex in EXAMPLES["single"]} == set(task.RELATIONS)
    # distractors repeat the queried relation or the queried person, so neither alone finds the answer
    same_relation = same_entity = 0
    for ex in EXAMPLES["single"]:
        entity, relation, _ = question_target(ex.question)
        facts = [parse(d) for i, d in enumerate(ex.documents) if i not in ex.support]
        same_relation += any(r == relation for _, r, _ in facts)
        same_entity += any(e == entity for e, _, _ in facts)
    assert same_relation > 1200 and same_entity > 600
    # the supporting document's position is spread over the prompt
    positions = {ex.support[0] for ex in EXAMPLES["single"]}
    assert positions == set(range(task.DEFAULT_MAX_DOCS))


def test_deterministic_per_seed():
    assert task.generate(50, seed=3, two_hop=0.5) == task.generate(50, seed=3, two_hop=0.5)
    assert task.generate(50, seed=3) != task.generate(50, seed=4)


def test_render_prompt_spans_cover_each_document_exactly():
    tok = build_tokenizer()
    for ex in EXAMPLES["mixed"][:300]:
        text, spans = task.render_prompt(ex)
        assert [title for title, _, _ in spans] == [d.title for d in ex.documents]
        assert [text[a:b] for _, a, b in spans] == [d.text for d in ex.documents]
        assert text.endswith(f"question : {ex.question}\nanswer :")
        enc = tok(text, return_offsets_mapping=True)
        offsets = enc.offset_mapping
        for doc, (_, a, b) in zip(ex.documents, spans):
            inside = [i for i, (s, e) in enumerate(offsets) if e > s and s >= a and e <= b]
            assert inside == list(range(inside[0], inside[-1] + 1))  # contiguous tokens
            assert tok.convert_ids_to_tokens([enc.input_ids[i] for i in inside]) == doc.text.split()


def test_tokenizer_round_trip_and_closed_vocabulary():
    tok = build_tokenizer()
    ex = EXAMPLES["two_hop"][0]
    text, _ = task.render_prompt(ex)
    ids = tok(text + " " + ex.answer).input_ids
    assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == " ".join((text + " " + ex.answer).split())
    assert len(tok(ex.answer, add_special_tokens=False).input_ids) == 1
    assert tok("unicorn").input_ids == [tok.bos_token_id, tok.unk_token_id]


def test_bad_document_range_is_rejected():
    with pytest.raises(ValueError, match="min_docs"):
        task.generate(1, seed=0, min_docs=5, max_docs=2)


def test_all_questions_are_unambiguous_and_start_with_the_example_own():
    for ex in EXAMPLES["mixed"][:300]:
        facts = [parse(d) for d in ex.documents]
        qas = task.all_questions(ex)
        assert qas[0] == (ex.question, ex.answer)
        assert len(set(q for q, _ in qas)) == len(qas)
        for question, answer in qas:
            entity, relation, two_hop = question_target(question)
            assert task.asked_relation(question) == relation
            assert answers(facts, entity, relation, two_hop) == {answer}
            if two_hop:  # never stated about the person asked about
                assert answers(facts, entity, relation, False) == set()


def test_parse_fact_inverts_the_documents():
    for ex in EXAMPLES["mixed"][:200]:
        for doc in ex.documents:
            assert task.parse_fact(doc.text) == parse(doc)
    with pytest.raises(ValueError, match="not a demo fact"):
        task.parse_fact("alice likes paris .")


def test_distractor_mix_moves_distractors_towards_the_asked_relation():
    def share_same_relation(examples):
        same = total = 0
        for ex in examples:
            relation = task.asked_relation(ex.question)
            rest = [parse(d) for i, d in enumerate(ex.documents) if i not in ex.support]
            same += sum(r == relation for _, r, _ in rest)
            total += len(rest)
        return same / total

    hard = task.generate(500, seed=5, mix=(0.1, 0.85))
    assert share_same_relation(hard) > share_same_relation(task.generate(500, seed=5)) + 0.1
    for ex in hard:  # still unambiguous
        entity, relation, _ = question_target(ex.question)
        assert answers([parse(d) for d in ex.documents], entity, relation, False) == {ex.answer}
