"""Prompts for document QA, with a token span for every paragraph and sentence.

The prompt text is rendered with character ranges for each paragraph and
sentence, tokenised once with offsets, and each range becomes an
`attnflow.Span` from the tokenizer's offset mapping (never by re-tokenising
fragments, which merges differently at the boundaries).  A token belongs to the
range holding its first non-whitespace character, so spans never overlap even
when a token such as " The" starts with the space before a sentence.

    >>> from attnflow.eval.datasets import Paragraph
    >>> ex = QAExample("5a8b", "Which film is Ed Wood in?", "Ed Wood",
    ...                (Paragraph("Ed Wood", ("Ed Wood is a 1994 film.", " It stars Johnny Depp.")),
    ...                 Paragraph("Scott Derrickson", ("Scott Derrickson is a director.",))),
    ...                supporting=(("Ed Wood", 0),))
    >>> p = build_prompt(ex, tokenizer)                              # the demo tokenizer: no chat template
    >>> print(p.text)
    Answer the question using the documents. Reply with a short answer only.
    <BLANKLINE>
    Document 1: Ed Wood
    Ed Wood is a 1994 film. It stars Johnny Depp.
    <BLANKLINE>
    Document 2: Scott Derrickson
    Scott Derrickson is a director.
    <BLANKLINE>
    Question: Which film is Ed Wood in?
    Answer:
    >>> [(s.name, s.kind, s.start, s.end) for s in p.spans]          # paragraphs, sentences, the question
    [('Ed Wood', 'document', 13, 27), ('Scott Derrickson', 'document', 27, 36),
     ('Ed Wood [0]', 'sentence', 17, 23), ('Ed Wood [1]', 'sentence', 23, 27),
     ('Scott Derrickson [0]', 'sentence', 31, 36), ('question', 'question', 37, 43)]
    >>> p.text[p.spans[2].char_start : p.spans[2].char_end]
    'Ed Wood is a 1994 film.'
    >>> p.text[p.question_span.char_start : p.question_span.char_end]
    'Which film is Ed Wood in?'
    >>> p.gold_paragraphs, p.gold_sentences
    (array([ True, False]), array([ True, False, False]))

With a chat template, the rendered documents and question are the user turn and
the generation prompt follows; the spans are located inside the templated text.
The demo task (`style="demo"`) uses `attnflow.demo.task.render_prompt`, the
format its model was trained on; each document is one sentence.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from attnflow.attribution import token_ranges
from attnflow.errors import BadArgumentError, DataError, UnsupportedModelError
from attnflow.eval.datasets import QAExample
from attnflow.attention_trace import Span

INSTRUCTION = "Answer the question using the documents. Reply with a short answer only."


@dataclass(frozen=True)
class Rendered:
    """Prompt text plus the character ranges of its paragraphs and sentences."""

    text: str
    paragraphs: list[tuple[int, int]]  # one per example.paragraphs
    sentences: list[tuple[int, int, int, int]]  # (paragraph index, sent_id, char_start, char_end)
    question: tuple[int, int] = (0, 0)  # char range of the question's text


@dataclass
class Prompt:
    """A tokenised prompt with document and sentence spans and the gold labels over them."""

    text: str
    input_ids: list[int]
    spans: list[Span]  # paragraphs ("document"), then sentences ("sentence"), both in document order, then the question
    n_paragraphs: int
    sentence_keys: list[tuple[str, int]]  # (title, sent_id) of each sentence span
    gold_paragraphs: np.ndarray  # bool [n_paragraphs]
    gold_sentences: np.ndarray  # bool [n_sentences]
    answer_prefix: str = " "  # what goes between the prompt and a forced answer

    @property
    def paragraph_spans(self) -> list[Span]:
        return self.spans[: self.n_paragraphs]

    @property
    def sentence_spans(self) -> list[Span]:
        return self.spans[self.n_paragraphs : self.n_paragraphs + len(self.sentence_keys)]

    @property
    def question_span(self) -> Span:
        return self.spans[-1]

    def __len__(self) -> int:
        return len(self.input_ids)


# --- rendering -----------------------------------------------------------------------------
def render_hotpotqa(example: QAExample, template: str | None = None) -> Rendered:
    """Titled paragraphs and the question, placed into `template` (the default below):

    Answer the question using the documents. Reply with a short answer only.

    Document 1: <title>
    <sentence 0> <sentence 1> ...

    Question: <question>
    Answer:

    `{documents}` becomes the paragraphs, each "Document i: <title>\\n<sentences>", joined by a
    blank line; `{question}` the question; everything else in the template is kept as written.
    A paragraph's range covers its header line and its sentences; a sentence's, its text only.
    """
    text, paragraphs, sentences, question = "", [], [], (0, 0)
    for piece in _PLACEHOLDER.split(check_template(DEFAULT_TEMPLATE if template is None else template)):
        if piece == "{question}":
            question = (len(text), len(text) + len(example.question))
            text += example.question
            continue
        if piece != "{documents}":
            text += piece
            continue
        for p_idx, para in enumerate(example.paragraphs):
            if p_idx:
                text += "\n\n"
            start = len(text)
            text += f"Document {p_idx + 1}: {para.title}\n"
            for s_idx, sentence in enumerate(para.sentences):
                sentence = sentence.strip()
                if s_idx and sentence and not text.endswith("\n"):
                    text += " "
                sentences.append((p_idx, s_idx, len(text), len(text) + len(sentence)))
                text += sentence
            paragraphs.append((start, len(text)))
    return Rendered(text, paragraphs, sentences, question)


# --- templates -------------------------------------------------------------------------------
DEFAULT_TEMPLATE = INSTRUCTION + "\n\n{documents}\n\nQuestion: {question}\nAnswer:"
TEMPLATES = {
    "default": DEFAULT_TEMPLATE,
    "bare": "{documents}\n\nQuestion: {question}\nAnswer:",  # no instruction
    "words": (  # asks for the answer's words alone, for instruct models that answer in sentences
        "Read the documents and answer the question with a few words only (a name, a date, a number, "
        "or yes/no), without a sentence.\n\n{documents}\n\nQuestion: {question}"
    ),
}
_PLACEHOLDER = re.compile(r"(\{documents\}|\{question\})")


def template_text(name_or_path: str) -> str:
    """The text of a named template (`TEMPLATES`) or of a template file; BadArgumentError otherwise.

    >>> template_text("bare")
    '{documents}\\n\\nQuestion: {question}\\nAnswer:'
    """
    if name_or_path in TEMPLATES:
        return TEMPLATES[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        raise BadArgumentError(
            f"--prompt-template {name_or_path!r} is neither a template name ({', '.join(TEMPLATES)}) nor a file"
        )
    try:
        return check_template(path.read_text(encoding="utf-8"), str(path))
    except (OSError, UnicodeDecodeError) as err:
        raise BadArgumentError(f"cannot read --prompt-template {path}: {err}") from None


def check_template(text: str, where: str = "the prompt template") -> str:
    """`text` if it holds `{documents}` and `{question}` once each; BadArgumentError naming what is wrong."""
    for key in ("{documents}", "{question}"):
        if text.count(key) != 1:
            raise BadArgumentError(f"{where} holds {key} {text.count(key)} times; write it exactly once")
    return text


def render_demo(example: QAExample) -> Rendered:
    """The demo task's own prompt (`attnflow.demo.task.render_prompt`); each document is one sentence."""
    from attnflow.demo import task

    titles = [p.title for p in example.paragraphs]
    docs = [task.Document(p.title, " ".join(p.sentences)) for p in example.paragraphs]
    support = sorted(titles.index(t) for t in example.gold_titles)
    text, doc_ranges = task.render_prompt(task.Example(docs, example.question, example.answer, support, False))
    paragraphs = [(s, e) for _, s, e in doc_ranges]
    sentences = [(i, 0, s, e) for i, (s, e) in enumerate(paragraphs)]
    start = text.rindex(example.question)
    return Rendered(text, paragraphs, sentences, (start, start + len(example.question)))


RENDERERS = {"hotpotqa": render_hotpotqa, "demo": render_demo}


# --- tokenising and spans --------------------------------------------------------------------
def build_prompt(
    example: QAExample, tokenizer, chat_template: bool | None = None, template: str | None = None, system: str | None = None
) -> Prompt:
    """Render (HotPotQA into `template`'s text), apply the chat template (by default when the tokenizer has one,
    with `system` as the system turn), tokenise, make spans."""
    if example.style == "hotpotqa":
        rendered = render_hotpotqa(example, template)
    else:
        rendered = RENDERERS[example.style](example)
    text, shift, special = rendered.text, 0, True
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    use_chat = has_chat if chat_template is None else chat_template
    if use_chat and not has_chat:
        raise DataError(f"{type(tokenizer).__name__} has no chat template; pass --no-chat-template")
    if system is not None and not use_chat:
        raise BadArgumentError("--system needs the chat template; drop --no-chat-template or --system")
    if use_chat:
        messages = [{"role": "system", "content": system}] if system is not None else []
        messages.append({"role": "user", "content": rendered.text})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        shift = text.find(rendered.text)
        if shift < 0:
            raise DataError(f"the chat template changed the prompt of {example.id}; pass chat_template=False")
        special = False  # the template writes its own BOS
    ids, offsets = _encode(tokenizer, text, special)
    ranges = [(s + shift, e + shift) for s, e in rendered.paragraphs]
    ranges += [(s + shift, e + shift) for _, _, s, e in rendered.sentences]
    ranges.append((rendered.question[0] + shift, rendered.question[1] + shift))
    bounds = token_ranges(text, offsets, ranges)
    names = [p.title for p in example.paragraphs]
    keys = [(example.paragraphs[p].title, s) for p, s, _, _ in rendered.sentences]
    names += [f"{t} [{s}]" for t, s in keys] + ["question"]
    kinds = ["document"] * len(rendered.paragraphs) + ["sentence"] * len(rendered.sentences) + ["question"]
    spans = [Span(n, k, a, b, cs, ce) for n, k, (a, b), (cs, ce) in zip(names, kinds, bounds, ranges)]
    gold = set(example.supporting)
    return Prompt(
        text=text,
        input_ids=ids,
        spans=spans,
        n_paragraphs=len(rendered.paragraphs),
        sentence_keys=keys,
        gold_paragraphs=np.array([p.title in example.gold_titles for p in example.paragraphs], bool),
        gold_sentences=np.array([k in gold for k in keys], bool),
        answer_prefix="" if use_chat else " ",
    )


def _encode(tokenizer, text: str, add_special_tokens: bool) -> tuple[list[int], np.ndarray]:
    try:
        enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    except NotImplementedError:
        raise UnsupportedModelError(
            f"{type(tokenizer).__name__} gives no offset mapping; load a fast tokenizer (use_fast=True)"
        ) from None
    return list(enc["input_ids"]), np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)

