"""The demo task: synthetic multi-document question answering with a known source.

Each document states one fact, `<entity> <relation> <value> .`; a question asks
for the value of one (entity, relation) pair, and exactly one document states it
(the *supporting* document).  The other documents are distractors: the same
relation about other people, other relations about the same person, and
"works with" links.  No two documents state the same (entity, relation) pair, so
every question has exactly one answer supported by the documents.

A two-hop question goes through a "works with" link: with the documents
`alice works with bob .` and `bob lives in paris .`, the question
`what is the city of the colleague of alice ?` has the answer `paris`, and nothing
states where alice herself lives, so both documents are needed.

    >>> ex = generate(1, seed=0)[0]
    >>> text, spans = render_prompt(ex)
    >>> print(text)
    doc1 : nina works with grace .
    doc2 : peggy lives in madrid .
    doc3 : judy lives in rome .
    doc4 : sybil plays the flute .
    doc5 : zoe lives in madrid .
    question : what is the city of peggy ?
    answer :
    >>> ex.answer, ex.support
    ('madrid', [1])
    >>> title, start, end = spans[1]; text[start:end]
    'peggy lives in madrid .'
"""

from __future__ import annotations

import random
from dataclasses import dataclass

ENTITIES = (
    "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy",
    "mallory", "nina", "oscar", "peggy", "rupert", "sybil", "trent", "victor", "walter", "zoe",
)  # fmt: skip

# relation -> (words between entity and value, question template, values)
RELATIONS = {
    "lives": (
        "lives in",
        "what is the city of {} ?",
        ("paris", "london", "rome", "berlin", "madrid", "vienna", "oslo", "lisbon", "athens", "prague"),
    ),
    "job": (
        "works as",
        "what is the job of {} ?",
        ("baker", "doctor", "pilot", "farmer", "lawyer", "nurse", "painter", "teacher", "writer", "chef"),
    ),
    "pet": (
        "owns a",
        "what is the pet of {} ?",
        ("cat", "dog", "horse", "rabbit", "parrot", "goat", "turtle", "snake", "hamster", "duck"),
    ),
    "music": (
        "plays the",
        "what is the instrument of {} ?",
        ("piano", "violin", "guitar", "drums", "flute", "cello", "harp", "trumpet", "banjo", "organ"),
    ),
}
LINK = "works with"  # symmetric: "a works with b" makes each the colleague of the other
LINK_NOUN = "the colleague of {}"
MAX_DOCS = 8
MIN_DOCS, DEFAULT_MAX_DOCS = 2, 5
DISTRACTOR_MIX = (0.25, 0.60)


@dataclass(frozen=True)
class Document:
    title: str
    text: str


@dataclass(frozen=True)
class Example:
    documents: list[Document]
    question: str
    answer: str
    support: list[int]  # indices into `documents` of the documents the answer needs
    two_hop: bool


def vocabulary() -> list[str]:
    """Every word a prompt or an answer can contain (special tokens excluded), in a fixed order."""
    words = ["question", "answer", ":", ".", "?", "the", "colleague", "of", *LINK.split()]
    words += [f"doc{i}" for i in range(1, MAX_DOCS + 1)]
    words += ENTITIES
    for phrase, template, values in RELATIONS.values():
        words += phrase.split() + template.replace("{}", " ").split() + list(values)
    return list(dict.fromkeys(words))


def _fact_text(fact: tuple[str, str, str]) -> str:
    entity, relation, value = fact
    phrase = LINK if relation == "link" else RELATIONS[relation][0]
    return f"{entity} {phrase} {value} ."


class _Facts:
    """A set of facts in which every (entity, relation) pair is stated at most once."""

    def __init__(self, blocked: set[tuple[str, str]] = frozenset()):
        self.facts: list[tuple[str, str, str]] = []
        self.used = set(blocked)  # (entity, relation) pairs that must not be stated (again)

    def add(self, fact: tuple[str, str, str]) -> bool:
        entity, relation, value = fact
        pairs = {(entity, relation), (value, relation)} if relation == "link" else {(entity, relation)}
        if entity == value or pairs & self.used:
            return False
        self.used |= pairs
        self.facts.append(fact)
        return True


def _distractor(rng: random.Random, focus: list[str], relation: str, mix: tuple[float, float]) -> tuple[str, str, str]:
    """A fact near the question: with probability mix[0] another relation of a person in the question,
    with mix[1] the asked relation about someone else, otherwise any fact."""
    kind = rng.random()
    entity = rng.choice(focus) if kind < mix[0] else rng.choice(ENTITIES)
    if kind < mix[0] or kind >= mix[0] + mix[1]:
        relation = rng.choice([*RELATIONS, "link"])
    if relation == "link":
        return (entity, "link", rng.choice(ENTITIES))
    return (entity, relation, rng.choice(RELATIONS[relation][2]))


def _example(rng: random.Random, n_docs: int, two_hop: bool, mix: tuple[float, float]) -> Example:
    entity, relation = rng.choice(ENTITIES), rng.choice(list(RELATIONS))
    value = rng.choice(RELATIONS[relation][2])
    if two_hop:
        bridge = rng.choice([e for e in ENTITIES if e != entity])
        facts = _Facts(blocked={(entity, relation)})  # the answer is never stated about `entity` itself
        facts.add((entity, "link", bridge) if rng.random() < 0.5 else (bridge, "link", entity))
        facts.add((bridge, relation, value))
        subject, focus = LINK_NOUN.format(entity), [entity, bridge]
    else:
        facts = _Facts()
        facts.add((entity, relation, value))
        subject, focus = entity, [entity]
    n_support = len(facts.facts)
    while len(facts.facts) < max(n_docs, n_support):
        facts.add(_distractor(rng, focus, relation, mix))
    order = list(range(len(facts.facts)))
    rng.shuffle(order)
    documents = [Document(f"doc{i + 1}", _fact_text(facts.facts[j])) for i, j in enumerate(order)]
    support = sorted(order.index(j) for j in range(n_support))
    question = RELATIONS[relation][1].format(subject)
    return Example(documents, question, value, support, two_hop)


def generate(
    n: int,
    seed: int,
    two_hop: bool | float = False,
    min_docs: int = MIN_DOCS,
    max_docs: int = DEFAULT_MAX_DOCS,
    mix: tuple[float, float] = DISTRACTOR_MIX,
) -> list[Example]:
    """`n` examples, the same for the same arguments; `two_hop` may be a fraction (0.3 = 30% two-hop).

    The number of documents is drawn uniformly from [min_docs, max_docs] (a two-hop
    example has at least 2).  `mix` is (share of distractors about a person in the
    question with another relation, share about someone else with the asked relation).
    Training uses seeds >= 10**6; evaluation uses small seeds.

    >>> [len(ex.documents) for ex in generate(3, seed=0, max_docs=4)]
    [3, 3, 4]
    """
    if not 1 <= min_docs <= max_docs <= MAX_DOCS:
        raise ValueError(f"need 1 <= min_docs <= max_docs <= {MAX_DOCS}, got {min_docs}, {max_docs}")
    rng = random.Random(seed)
    frac = float(two_hop)
    return [_example(rng, rng.randint(min_docs, max_docs), rng.random() < frac, mix) for _ in range(n)]


def parse_fact(text: str) -> tuple[str, str, str]:
    """(entity, relation, value) of a document's text; the inverse of how documents are written.

    >>> parse_fact("alice works with bob .")
    ('alice', 'link', 'bob')
    """
    words = text.split()
    phrase = " ".join(words[1:-2])
    relation = "link" if phrase == LINK else next((r for r, (p, _, _) in RELATIONS.items() if p == phrase), None)
    if relation is None or len(words) < 4 or words[-1] != ".":
        raise ValueError(f"{text!r} is not a demo fact like 'alice lives in paris .'")
    return words[0], relation, words[-2]


def asked_relation(question: str) -> str:
    """The relation a question asks for (`"lives"`, `"job"`, ...), single- or two-hop."""
    for name, (_, template, _) in RELATIONS.items():
        head, tail = template.split("{}")
        if question.startswith(head) and question.endswith(tail):
            return name
    raise ValueError(f"{question!r} is not a demo question")


def stated_value_chance(example: Example) -> float:
    """Accuracy of guessing uniformly among the values the documents state for the asked relation."""
    relation = asked_relation(example.question)
    values = {v for _, r, v in (parse_fact(d.text) for d in example.documents) if r == relation}
    return 1 / len(values)


def all_questions(example: Example) -> list[tuple[str, str]]:
    """Every (question, answer) the documents of `example` answer unambiguously, its own question first.

    Training asks several of them after one set of documents, so that one forward
    pass teaches several look-ups.
    """
    facts = [parse_fact(d.text) for d in example.documents]
    stated = {(e, r): v for e, r, v in facts if r != "link"}
    out = [(RELATIONS[r][1].format(e), v) for (e, r), v in stated.items()]
    for a, _, b in (f for f in facts if f[1] == "link"):
        for x, y in ((a, b), (b, a)):
            out += [
                (RELATIONS[r][1].format(LINK_NOUN.format(x)), stated[y, r])
                for r in RELATIONS
                if (y, r) in stated and (x, r) not in stated
            ]
    own = (example.question, example.answer)
    return [own] + [qa for qa in out if qa != own]


def render_prompt(example: Example) -> tuple[str, list[tuple[str, int, int]]]:
    """The prompt text and, for each document, (title, char_start, char_end) of its text in the prompt.

    The model should continue the prompt with ` {example.answer}` and then its end token.
    """
    parts, spans, pos = [], [], 0
    for doc in example.documents:
        head = f"{doc.title} : "
        spans.append((doc.title, pos + len(head), pos + len(head) + len(doc.text)))
        parts.append(head + doc.text + "\n")
        pos += len(parts[-1])
    text = "".join(parts) + f"question : {example.question}\nanswer :"
    return text, spans
