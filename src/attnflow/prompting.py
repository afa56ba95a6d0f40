"""Prompts with named documents: read them from files, place them in the prompt, record them as spans.

The documents come before the question, one block each, separated by a blank line:

    Document [1]: <name>
    <text>

    Document [2]: <name>
    <text>

    Question: <prompt>

Each document's span (kind "document") covers its whole block, header line included,
without the blank line after it; after them one span of kind "question" covers the
question's text (not the "Question: " label), so a calibration can replace it
(`attribute(..., calibrate="content-free")`).  With a chat template the blocks and the question
form the content of the chat's last user message; the spans are found by locating
that content in the rendered template text and mapping characters to tokens with
the tokenizer's offset mapping (`attribution.text_spans`), so they are exact for any
template that copies the message verbatim.

    >>> docs = [Document("paris", "alice lives in paris ."), Document("london", "bob lives in london .")]
    >>> p = build_prompt("where does alice live ?", tok, documents=docs)      # plain text
    >>> p.prompt[:34]                                  # what af.trace receives
    'Document [1]: paris\\nalice lives in'
    >>> [(s.name, s.kind, s.start, s.end) for s in p.spans]
    [('paris', 'document', 1, 9), ('london', 'document', 9, 17), ('question', 'question', 18, 23)]
    >>> p.text[p.spans[2].char_start : p.spans[2].char_end]
    'where does alice live ?'
    >>> t = af.trace(model, [p.prompt], spans=[p.spans], max_new_tokens=4, progress=False)
    >>> [s.name for s in t.spans[0]], t.display(0)[3:9]    # the demo's vocabulary lacks "Document" (<unk>)
    (['paris', 'london', 'question'], ['paris', ' alice', ' lives', ' in', ' paris', ' .'])

A chat needs a tokenizer with a chat template (the demo's has none):

    >>> build_prompt("hi", tok, chat=True)
    Traceback (most recent call last):
    attnflow.errors.PromptError: this model's tokenizer has no chat template, so a chat cannot be rendered; ...
    >>> import copy
    >>> chat_tok = copy.deepcopy(tok)
    >>> chat_tok.chat_template = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} | {% endfor %}<assistant>"
    >>> p = build_prompt("where does alice live ?", chat_tok, documents=docs, chat=True, system="be brief")
    >>> [m["role"] for m in p.prompt], p.prompt[-1]["content"][:34]    # what af.trace receives: the chat
    (['system', 'user'], 'Document [1]: paris\\nalice lives in')
    >>> [(s.name, s.kind, s.start, s.end) for s in p.spans]
    [('paris', 'document', 5, 13), ('london', 'document', 13, 21), ('question', 'question', 22, 27)]

Files: `read_documents` takes a JSON object `{name: text}`, a JSON list or JSONL of
`{"name", "text"}`; `read_prompts` takes one prompt per line, or JSONL where each
line is a chat (a list of `{"role", "content"}`, or `{"messages": [...]}`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from attnflow import _io
from attnflow.attention_trace import Span
from attnflow.errors import DataError, PromptError, UnsupportedModelError

Chat = list[dict[str, str]]


@dataclass(frozen=True)
class Document:
    """A named text placed in the prompt."""

    name: str
    text: str


@dataclass(frozen=True)
class Prompt:
    """What `af.trace` records (a string or a chat) and the document spans in its token positions."""

    prompt: str | Chat
    spans: list[Span] = field(default_factory=list)
    text: str = ""  # the text that is tokenized: the prompt, or the rendered chat template


# ------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------
def read_documents(path: str | os.PathLike) -> list[Document]:
    """Named documents from a JSON object `{name: text}`, or a JSON list / JSONL of `{"name": ..., "text": ...}`.

    A `.jsonl` file is read line by line; any other file as one JSON value
    (falling back to lines when it holds several).  Names must be unique and texts non-empty.

        >>> _ = Path("docs.json").write_text('{"paris": "alice lives in paris ."}')
        >>> read_documents("docs.json")
        [Document(name='paris', text='alice lives in paris .')]
        >>> _ = Path("docs.jsonl").write_text('{"name": "a", "text": "x"}\\n{"name": "b", "text": "y"}\\n')
        >>> read_documents("docs.jsonl")
        [Document(name='a', text='x'), Document(name='b', text='y')]
    """
    file = Path(path)
    raw = _read_text(file, "documents file")
    if file.suffix == ".jsonl":
        records = _jsonl(file, raw)
    else:
        try:
            value = json.loads(raw)
        except ValueError as err:
            if "Extra data" not in str(err):
                raise DataError(f"{file}: not valid JSON ({_first_line(err)}); write {{name: text}} or JSONL of {{\"name\", \"text\"}}") from None
            records = _jsonl(file, raw)
        else:
            records = _records(file, value)
    docs = [_document(file, where, rec) for where, rec in records]
    if not docs:
        raise DataError(f"{file} holds no documents; write {{name: text}} or JSONL of {{\"name\", \"text\"}}")
    names = [d.name for d in docs]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise DataError(f"{file}: document name {dup!r} appears more than once; give each document its own name")
    return docs


def read_prompts(path: str | os.PathLike) -> list[str | Chat]:
    """Prompts from a file: one per non-blank line, or JSONL of chats (list of messages, or {"messages": [...]}).

    A `.jsonl` file, or a file whose every non-blank line starts with `[` or `{`, is JSONL.

        >>> _ = Path("prompts.txt").write_text("where does alice live ?\\n\\nwhere does bob live ?\\n")
        >>> read_prompts("prompts.txt")
        ['where does alice live ?', 'where does bob live ?']
        >>> _ = Path("chats.jsonl").write_text('[{"role": "user", "content": "hi"}]\\n')
        >>> read_prompts("chats.jsonl")
        [[{'role': 'user', 'content': 'hi'}]]
    """
    file = Path(path)
    raw = _read_text(file, "prompt file")
    lines = [(i, line) for i, line in enumerate(raw.splitlines(), 1) if line.strip()]
    if not lines:
        raise DataError(f"{file} holds no prompts; write one prompt per line, or JSONL of chats")
    if file.suffix != ".jsonl" and not all(line.lstrip()[:1] in "[{" for _, line in lines):
        return [line for _, line in lines]
    return [_chat(file, where, rec) for where, rec in _jsonl(file, raw)]


def _read_text(file: Path, what: str) -> str:
    if not file.exists():
        raise DataError(f"no {what} at {str(file)!r}; check the path")
    if not file.is_file():
        raise DataError(f"{what} {str(file)!r} is a folder; pass a file")
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{what} {str(file)!r} is not UTF-8 text; save it as UTF-8 JSON or text") from None
    except OSError as err:
        raise _io.storage_error(err, file, "read") from None


def _jsonl(file: Path, raw: str) -> list[tuple[str, Any]]:
    out = []
    for i, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((f"{file}:{i}", json.loads(line)))
        except ValueError as err:
            raise DataError(f"{file}:{i}: not valid JSON ({_first_line(err)}); write one JSON value per line") from None
    return out


def _records(file: Path, value: Any) -> list[tuple[str, Any]]:
    """(where, record) pairs of a whole-file JSON value: a mapping name -> text, one record, or a list of records."""
    if isinstance(value, dict) and set(value) == {"name", "text"}:
        return [(str(file), value)]
    if isinstance(value, dict):
        return [(f"{file}: {k!r}", {"name": k, "text": v}) for k, v in value.items()]
    if isinstance(value, list):
        return [(f"{file}: item {i}", rec) for i, rec in enumerate(value)]
    raise DataError(f"{file} holds a JSON {type(value).__name__}; write {{name: text}} or a list of {{\"name\", \"text\"}}")


def _document(file: Path, where: str, rec: Any) -> Document:
    if not isinstance(rec, dict) or not isinstance(rec.get("name"), str) or not isinstance(rec.get("text"), str):
        raise DataError(f"{where}: a document needs a string \"name\" and a string \"text\", got {_short(rec)}")
    if not rec["name"].strip() or not rec["text"].strip():
        raise DataError(f"{where}: document {rec['name']!r} has an empty name or text; give it both")
    return Document(rec["name"], rec["text"])


def _chat(file: Path, where: str, rec: Any) -> Chat:
    messages = rec.get("messages") if isinstance(rec, dict) else rec
    ok = isinstance(messages, list) and messages and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    )
    if not ok:
        raise DataError(f"{where}: a chat is a list of {{\"role\", \"content\"}} strings or {{\"messages\": [...]}}, got {_short(rec)}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _first_line(err: Exception) -> str:
    return str(err).splitlines()[0]


# ------------------------------------------------------------------------------------
# prompts
# ------------------------------------------------------------------------------------
def document_block(documents: Sequence[Document], question: str) -> tuple[str, list[tuple[str, int, int]]]:
    """The documents then the question, as text, and each document's `(name, char_start, char_end)` in it.

        >>> document_block([Document("a", "x y")], "q ?")
        ('Document [1]: a\\nx y\\n\\nQuestion: q ?', [('a', 0, 19)])
    """
    parts, ranges, at = [], [], 0
    for i, doc in enumerate(documents, 1):
        block = f"Document [{i}]: {doc.name}\n{doc.text}"
        ranges.append((doc.name, at, at + len(block)))
        parts.append(block + "\n\n")
        at += len(block) + 2
    return "".join(parts) + f"Question: {question}", ranges


def require_template(tokenizer: Any) -> None:
    """PromptError unless the tokenizer carries a chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise PromptError(
            "this model's tokenizer has no chat template, so a chat cannot be rendered; "
            "pass the prompt as plain text (without --chat) or use a model that ships a template"
        )


def build_prompt(
    prompt: str | Chat,
    tokenizer: Any,
    *,
    documents: Sequence[Document] = (),
    chat: bool = False,
    system: str | None = None,
) -> Prompt:
    """The prompt to record and its document spans.

    prompt     a question (text) or a chat; a chat always goes through the chat template
    documents  placed before the question (in a chat: before the last user message's content)
    chat       render a text prompt through the chat template, as one user message
    system     a system message put first (chats without one only)
    """
    if isinstance(prompt, str) and not chat:
        if system is not None:
            raise PromptError("a system message needs a chat prompt; render the prompt with the chat template (--chat)")
        if not documents:
            return Prompt(prompt, [], prompt)
        text, ranges = document_block(documents, prompt)
        question = ("question", len(text) - len(prompt), len(text))
        return Prompt(text, _spans(tokenizer, text, ranges, question, add_special_tokens=True), text)
    require_template(tokenizer)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if system is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not documents:
        return Prompt(messages, [], rendered)
    last = next((i for i in range(len(messages) - 1, -1, -1) if messages[i]["role"] == "user"), None)
    if last is None:
        raise PromptError("a chat with documents needs a user message to put them in; add one")
    asked = messages[last]["content"]
    content, ranges = document_block(documents, asked)
    messages[last]["content"] = content
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    base = rendered.rfind(content)  # the last user message: only the generation prompt follows it
    if base < 0:
        raise PromptError("the chat template rewrites the message text, so the documents cannot be located in it; pass --documents without --chat")
    ranges = [(name, base + a, base + b) for name, a, b in ranges]
    end = base + len(content)  # the content ends with the question
    question = ("question", end - len(asked), end)
    return Prompt(messages, _spans(tokenizer, rendered, ranges, question, add_special_tokens=False), rendered)


def _spans(
    tokenizer: Any, text: str, ranges: list[tuple[str, int, int]], question: tuple[str, int, int], add_special_tokens: bool
) -> list[Span]:
    """Document spans, then the question's, through the offset mapping, tokenized the way `af.trace` tokenizes this prompt."""
    from attnflow.attribution import text_spans

    try:
        spans = text_spans(tokenizer, text, [*ranges, question], kind="document", add_special_tokens=add_special_tokens)
    except NotImplementedError:  # slow (Python) tokenizers have no offset mapping
        raise UnsupportedModelError("locating documents needs a fast tokenizer (offset mapping); load the model with a fast tokenizer") from None
    empty = next((s for s in spans[:-1] if s.start == s.end), None)
    if empty is not None:
        raise PromptError(f"document {empty.name!r} covers no token of the tokenized prompt; check that its text tokenizes")
    return spans[:-1] + [replace(spans[-1], kind="question")]


__all__ = ["Document", "Prompt", "build_prompt", "document_block", "read_documents", "read_prompts", "require_template"]
