"""Document-QA examples: HotPotQA from a local file (official or HF layout) and the demo task.

Every source becomes a list of `QAExample`: paragraphs with titles and
sentences, and the gold supporting sentences as (title, sent_id) pairs.

    >>> import json
    >>> rows = [{"_id": "5a8b57f2", "question": "Were Scott Derrickson and Ed Wood of the same nationality?",
    ...          "answer": "yes", "supporting_facts": [["Scott Derrickson", 0], ["Ed Wood", 0]],
    ...          "context": [["Scott Derrickson", ["Scott Derrickson is an American director.", " He lives in LA."]],
    ...                      ["Ed Wood", ["Edward Davis Wood Jr. was an American filmmaker."]]]},
    ...         {"_id": "5a8c7595", "question": "Who?", "answer": "X", "supporting_facts": [["X", 3]],
    ...          "context": [["X", ["One.", "Two."]]]}]
    >>> _ = Path("hotpot_dev_distractor_v1.json").write_text(json.dumps(rows))
    >>> examples, problems = load_hotpotqa("hotpot_dev_distractor_v1.json")
    >>> ex = examples[0]
    >>> ex.paragraphs[0].title, len(ex.paragraphs[0].sentences)
    ('Scott Derrickson', 2)
    >>> ex.supporting
    (('Scott Derrickson', 0), ('Ed Wood', 0))
    >>> problems                          # malformed rows, skipped
    [Problem(index=1, id='5a8c7595', reason="supporting fact ('X', 3) is out of range: 'X' has 2 sentences")]

Accepted files:

* `.json`: the official list of `{_id, question, answer, supporting_facts: [[title, sent_id]],
  context: [[title, [sentences]]]}`;
* `.jsonl`: one such object per line, official or HF layout;
* `.parquet`: the HF `datasets` layout: `id, question, answer,
  supporting_facts {title: [...], sent_id: [...]}, context {title: [...], sentences: [[...]]}`.

A row that is malformed (a missing field, a sent_id out of range, duplicate
titles, an empty context, ...) becomes a `Problem` naming its id and is skipped;
only a missing or damaged file raises `DataError` (one the system will not let us read: `StorageError`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from attnflow import _io
from attnflow.errors import DataError


@dataclass(frozen=True)
class Paragraph:
    title: str
    sentences: tuple[str, ...]


@dataclass(frozen=True)
class QAExample:
    """One question over documents; `supporting` holds the gold (title, sent_id) pairs.

    `style` says how the prompt is rendered: "hotpotqa" (titled paragraphs) or
    "demo" (the demo task's own format, which its model was trained on).
    """

    id: str
    question: str
    answer: str
    paragraphs: tuple[Paragraph, ...]
    supporting: tuple[tuple[str, int], ...]
    index: int = 0  # position in the source (file row or generated index)
    style: str = "hotpotqa"
    kind: str | None = None  # question type: HotPotQA's "bridge" | "comparison"; demo "one-hop" | "two-hop"

    @property
    def gold_titles(self) -> set[str]:
        return {t for t, _ in self.supporting}


@dataclass(frozen=True)
class Problem:
    """A dataset row that was skipped, and why."""

    index: int
    id: str
    reason: str


class _Malformed(Exception):
    pass


# --- reading files ---------------------------------------------------------------------
def read_rows(path: str | Path) -> list[dict | Exception]:
    """The raw rows of a HotPotQA file; a jsonl line that is not JSON becomes the exception."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no data file at {path}; pass --data with hotpot_dev_distractor_v1.json or a .jsonl/.parquet")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return pq.read_table(path).to_pylist()
        text = path.read_text(encoding="utf-8")
        if suffix == ".jsonl":
            return [_json_or_error(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"cannot read {path}: {str(err).splitlines()[0]}") from None
    except Exception as err:  # a refused read, or pyarrow's errors for a corrupt Parquet file
        raise _io.read_failure(err, path, f"cannot read {path} as Parquet: {str(err).splitlines()[0]}") from None
    if isinstance(data, dict) and "data" in data:
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path} holds a JSON {type(data).__name__}; expected a list of HotPotQA examples")
    return data


def _json_or_error(line: str) -> dict | Exception:
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        return _Malformed(f"line is not JSON ({err.msg})")


def load_hotpotqa(path: str | Path) -> tuple[list[QAExample], list[Problem]]:
    """(valid examples, skipped rows) of a HotPotQA file; raises DataError only if the file is unusable."""
    examples, problems = [], []
    for index, row in enumerate(read_rows(path)):
        ex_id = _row_id(row, index)
        try:
            if isinstance(row, Exception):
                raise row
            examples.append(parse_row(row, index))
        except _Malformed as err:
            problems.append(Problem(index, ex_id, str(err)))
    return examples, problems


def _row_id(row, index: int) -> str:
    if isinstance(row, dict):
        for key in ("_id", "id"):
            if isinstance(row.get(key), (str, int)) and str(row[key]):
                return str(row[key])
    return f"row {index}"


# --- validating one row ------------------------------------------------------------------
def parse_row(row: dict, index: int = 0) -> QAExample:
    """One HotPotQA row (official or HF layout) as a QAExample; raises _Malformed with the reason."""
    if not isinstance(row, dict):
        raise _Malformed(f"row is a {type(row).__name__}, not an object")
    ex_id = _row_id(row, index)
    if ex_id == f"row {index}":
        raise _Malformed("missing field '_id' (or 'id')")
    for key in ("question", "answer", "supporting_facts", "context"):
        if row.get(key) is None:
            raise _Malformed(f"missing field {key!r}")
    question, answer = row["question"], row["answer"]
    if not isinstance(question, str) or not question.strip():
        raise _Malformed("'question' is empty or not a string")
    if not isinstance(answer, str) or not answer.strip():
        raise _Malformed("'answer' is empty or not a string")
    paragraphs = _paragraphs(row["context"])
    supporting = _supporting(row["supporting_facts"])
    lengths = {p.title: len(p.sentences) for p in paragraphs}
    for title, sid in supporting:
        if title not in lengths:
            raise _Malformed(f"supporting fact ({title!r}, {sid}) names no paragraph of the context")
        if not 0 <= sid < lengths[title]:
            raise _Malformed(
                f"supporting fact ({title!r}, {sid}) is out of range: {title!r} has {lengths[title]} sentences"
            )
    kind = row.get("type") if isinstance(row.get("type"), str) else None
    return QAExample(ex_id, question.strip(), answer.strip(), paragraphs, supporting, index, kind=kind)


def _pairs(value, field: str, columns: tuple[str, str], entry: str) -> list[tuple]:
    """The (a, b) pairs of `field`: the official layout `[[a, b], ...]` or HF's `{columns[0]: [a...], columns[1]: [b...]}`."""
    if isinstance(value, dict):
        a, b = (value.get(c) for c in columns)
        if not isinstance(a, list) or not isinstance(b, list) or len(a) != len(b):
            raise _Malformed(f"'{field}' needs lists '{columns[0]}' and '{columns[1]}' of equal length")
        pairs = list(zip(a, b))
    elif isinstance(value, list):
        if not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in value):
            raise _Malformed(f"'{field}' entries must be {entry} pairs")
        pairs = [tuple(p) for p in value]
    else:
        raise _Malformed(f"'{field}' is a {type(value).__name__}; expected a list or an object")
    if not pairs:
        raise _Malformed(f"'{field}' is empty")
    return pairs


def _paragraphs(context) -> tuple[Paragraph, ...]:
    pairs = _pairs(context, "context", ("title", "sentences"), "[title, [sentences]]")
    out, seen = [], set()
    for title, sents in pairs:
        if not isinstance(title, str) or not isinstance(sents, list) or not all(isinstance(s, str) for s in sents):
            raise _Malformed("a context paragraph is not a (title string, list of sentence strings) pair")
        if title in seen:
            raise _Malformed(f"duplicate paragraph title {title!r}")
        if not any(s.strip() for s in sents):
            raise _Malformed(f"paragraph {title!r} has no text")
        seen.add(title)
        out.append(Paragraph(title, tuple(sents)))
    return tuple(out)


def _supporting(facts) -> tuple[tuple[str, int], ...]:
    pairs = _pairs(facts, "supporting_facts", ("title", "sent_id"), "[title, sent_id]")
    out = []
    for title, sid in pairs:
        if not isinstance(title, str) or isinstance(sid, bool) or not isinstance(sid, int):
            raise _Malformed(f"supporting fact ({title!r}, {sid!r}) is not a (title, integer sent_id) pair")
        out.append((title, sid))
    return tuple(dict.fromkeys(out))


# --- the demo task -----------------------------------------------------------------------
def demo_examples(n: int, seed: int, two_hop: bool | float = False) -> list[QAExample]:
    """`n` demo-task examples as QAExamples: one single-sentence paragraph per document.

    >>> demo_examples(1, seed=0)[0].supporting
    (('doc2', 0),)
    """
    from attnflow.demo import task

    out = []
    for i, ex in enumerate(task.generate(n, seed=seed, two_hop=two_hop)):
        paragraphs = tuple(Paragraph(d.title, (d.text,)) for d in ex.documents)
        supporting = tuple((ex.documents[j].title, 0) for j in ex.support)
        kind = "two-hop" if ex.two_hop else "one-hop"
        out.append(QAExample(f"demo-{seed}-{i}", ex.question, ex.answer, paragraphs, supporting, i, "demo", kind))
    return out
