"""The short answer in an instruct model's generated text, and a containment metric beside EM/F1.

Instruct models answer in sentences ("The answer is: 9,984", "No, the Laleli Mosque
and ... are not located in"), so scoring their first line against a short gold
answer ("9,984", "no") gives EM near 0.  `extract_answer` applies, in order:

1. lines: the first line that still holds an answer after steps 2-3 (a model may
   write "Answer:" on one line and the answer on the next);
2. markup: markdown emphasis (`**`, `__`, backticks) and a leading list bullet go;
3. prefixes, repeatedly, case-insensitively, at the start: pleasantries ("Sure!",
   "Certainly,", "Of course."), "Based on the context,"/"According to the documents,",
   answer labels ("The answer is", "The correct answer would be:", "Answer:",
   "Final answer -", "A:");
4. yes/no: a leading "yes"/"no" word is the answer ("No, the ... are not ..." -> "no")
   when the question is a yes/no question (it starts with is/are/was/do/does/did/can/
   has/...) or, without a question, when punctuation or the end follows it, so a
   name such as "No Doubt" survives;
5. the first sentence: the text up to the first ".", "!" or "?" that is followed by
   white space and a capital (or the end), and that does not close an abbreviation
   ("St.", "Mr.", "U.S.", "e.g.", an initial such as "J."); a decimal (9.5) has no
   space after its point, so it never ends a sentence;
6. the question restated: with a question, "<subject> is/was/are/were <answer>" whose
   subject's words all occur in the question gives "<answer>"
   ("The capital of France is Paris." for "What is the capital of France?");
7. trimming: white space, enclosing quotes or brackets, and trailing ".,;:!?" (the
   point of a final abbreviation is kept).

EM and F1 then compare SQuAD-normalised strings (`metrics.normalize_answer`);
`contains` asks whether the normalised gold occurs in the normalised prediction as
whole words, and is meant for the raw generated text.

    >>> extract_answer("The answer is: 9,984")
    '9,984'
    >>> extract_answer("No, the mosque and the mansion are not located in", "Are they in the same neighborhood?")
    'no'
    >>> extract_answer("Sure! The answer is St. Louis, Missouri. It lies on the Mississippi.")
    'St. Louis, Missouri'
    >>> contains("No, they are not.", "no"), contains("I do not know", "no")
    (1.0, 0.0)
"""

from __future__ import annotations

import re

from attnflow.eval.metrics import exact_match, f1_score, normalize_answer

ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof st mt ft jr sr sen rep gov gen col lt sgt capt cmdr adm rev hon pres inc ltd co corp bros "
    "dept univ assn no nos vol vols pp fig vs etc approx ca cf al e.g i.e a.m p.m u.s u.k u.n d.c "
    "jan feb mar apr jun jul aug sep sept oct nov dec".split()
)
YES_NO_STARTS = frozenset(
    "is are was were am do does did can could will would shall should has have had may might must".split()
)

_PLEASANTRY = r"(?:sure|certainly|of course|okay|ok|absolutely|great)[!.,:]+"  # the punctuation: "Great Eastern" stays
_SOURCE = (
    r"(?:based on|according to|from) (?:the |this )?(?:given |provided |above )?"
    r"(?:context|documents?|passages?|paragraphs?|information|text)(?: (?:provided|given|above))?\s*,"
)
_LABEL = (
    r"(?:(?:so |therefore |thus )?the )?(?:final |correct |short |right )?answer"
    r"(?: to (?:the|this|your) question)?(?: (?:is|would be|will be)\s*[:\-–]?|\s*[:\-–])"
)
_PREFIX = re.compile(rf"^\s*(?:{_PLEASANTRY}|{_SOURCE}|{_LABEL}|a\s*:)\s*", re.IGNORECASE)
_YES_NO = re.compile(r"^(yes|no)\b(?P<after>[\s,.!;:]|$)", re.IGNORECASE)
_END = re.compile(r"[.!?](?=[\"')\]]*(?:\s+[\"'(\[]*[A-Z0-9]|\s*$))")
_RESTATED = re.compile(r"^(?P<subject>.+?)\s+(?:is|was|are|were)\s+(?P<answer>.+)$", re.IGNORECASE)
_MARKUP = re.compile(r"\*\*|__|`")
_BULLET = re.compile(r"^\s*(?:[-*•]\s+|\d+[.)]\s+)")
_PAIRS = {'"': '"', "'": "'", "“": "”", "‘": "’", "(": ")", "[": "]"}


def extract_answer(text: str, question: str | None = None) -> str:
    """The short answer in a generated text (steps 1-7 of the module docstring); "" when there is none.

    >>> extract_answer("Answer:\\nParis")
    'Paris'
    >>> extract_answer("The capital of France is Paris.", "What is the capital of France?")
    'Paris'
    """
    for line in (text or "").splitlines():
        line = _strip_prefixes(_BULLET.sub("", _MARKUP.sub("", line)))
        if not line:
            continue
        yes_no = _yes_no(line, question)
        if yes_no:
            return yes_no
        return _trim(_restated(first_sentence(line), question))
    return ""


def contains(prediction_text: str, gold: str) -> float:
    """1.0 if the normalised gold occurs in the normalised prediction as whole words, else 0.0 (empty gold: 0.0).

    >>> contains("The answer is: 9,984 people", "9,984"), contains("Chief of Protocol of the US", "chief of protocol")
    (1.0, 1.0)
    """
    g, p = normalize_answer(gold), normalize_answer(prediction_text)
    return float(bool(g) and f" {g} " in f" {p} ")


def answer_scores(generated: str, gold: str, question: str | None = None) -> dict[str, float | str]:
    """EM, F1 and containment of the extracted answer, and of the generated text's first line as the scorer took it.

    >>> answer_scores("Yes, both are American.", "yes", "Are both American?")["em"]
    1.0
    """
    lines = [ln.strip() for ln in (generated or "").strip().splitlines()]
    raw = lines[0] if lines else ""
    answer = extract_answer(generated, question)
    return {
        "prediction": answer,
        "em": exact_match(answer, gold),
        "f1": f1_score(answer, gold),
        "contains": contains(answer, gold),
        "em_raw": exact_match(raw, gold),
        "f1_raw": f1_score(raw, gold),
        "contains_raw": contains(raw, gold),
    }


def first_sentence(text: str) -> str:
    """`text` up to its first sentence end (kept); abbreviations, initials and decimals do not end a sentence.

    >>> first_sentence("It opened in 1972. It seats 7,201.")
    'It opened in 1972.'
    >>> first_sentence("The U.S. Army moved to St. Louis in 9.5 days. Then it left.")
    'The U.S. Army moved to St. Louis in 9.5 days.'
    """
    for m in _END.finditer(text):
        if m.group() == "." and _abbreviation(text[: m.start()]):
            continue
        return text[: m.end()].strip()
    return text.strip()


def _abbreviation(before: str) -> bool:
    """Whether the word just before a '.' is an abbreviation, an initial ("J") or a dotted acronym ("U.S")."""
    word = re.split(r"[\s(\[\"']", before)[-1]
    initial = len(word) == 1 and word.isalpha()
    return initial or word.lower() in ABBREVIATIONS or bool(re.fullmatch(r"(?:\w\.)+\w", word))


def _strip_prefixes(line: str) -> str:
    line = line.strip()
    while True:
        stripped = _PREFIX.sub("", line, count=1)
        if stripped == line:
            return line
        line = stripped


def _yes_no(line: str, question: str | None) -> str:
    m = _YES_NO.match(line)
    if not m:
        return ""
    if question is not None:  # a question says whether yes/no is an answer at all ("No Doubt" for "Which band ...?")
        words = question.split()
        return m.group(1).lower() if words and words[0].lower() in YES_NO_STARTS else ""
    return m.group(1).lower() if m.group("after") in {",", ".", "!", ";", ":", ""} else ""


def _restated(sentence: str, question: str | None) -> str:
    m = _RESTATED.match(sentence) if question else None
    if not m:
        return sentence
    asked = set(normalize_answer(question).split())
    subject = normalize_answer(m.group("subject")).split()
    return m.group("answer") if subject and set(subject) <= asked else sentence


def _trim(answer: str) -> str:
    answer = answer.strip()
    while len(answer) >= 2 and _PAIRS.get(answer[0]) == answer[-1]:
        answer = answer[1:-1].strip()
    while answer and answer[-1] in ".,;:!?" and not (answer[-1] == "." and _abbreviation(answer[:-1])):
        answer = answer[:-1].rstrip()
    return answer.strip(' "“”')


# --- the answer's tokens ------------------------------------------------------------------------
_MARKUP_GAP = r"(?:\*\*|__|`)*"  # markup that extraction removed may sit inside the answer's text


def locate(answer: str, text: str) -> tuple[int, int] | None:
    """Character range of the extracted `answer` in the generated `text`: its first occurrence, ignoring case
    and the markup extraction drops, as whole words; None when it does not occur (or is empty).

    >>> locate("no", "I do not know. No, they are not.")
    (15, 17)
    >>> locate("Terry Richardson", "**Terry** Richardson")
    (2, 20)
    """
    if not answer:
        return None
    pattern = _MARKUP_GAP.join(re.escape(c) for c in answer)
    pattern = (r"\b" if answer[0].isalnum() else "") + pattern + (r"\b" if answer[-1].isalnum() else "")
    m = re.search(pattern, text, re.IGNORECASE)
    return None if m is None else m.span()


def token_span(display: list[str], chars: tuple[int, int], partial: str = "\u25cc") -> tuple[int, int]:
    """Tokens [start, end) whose display strings cover non-space characters of `chars` in "".join(display).

    `partial` (`attnflow.tokens.PARTIAL`) marks a token holding only bytes of a character the
    next token completes: it covers no text, and joins the span when the token after it does.

    >>> token_span([" The", " answer", " is", " St", ".", " Louis", "."], (15, 24))
    (3, 6)
    """
    c0, c1 = chars
    start = end = None
    pos = 0
    for i, piece in enumerate(display):
        if piece == partial:
            continue
        lo, hi = max(pos, c0), min(pos + len(piece), c1)
        if lo < hi and piece[lo - pos : hi - pos].strip():
            start = i if start is None else start
            end = i + 1
        pos += len(piece)
    if start is None:
        return 0, 0
    while start and display[start - 1] == partial:
        start -= 1
    return start, end
