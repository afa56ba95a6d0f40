"""Token text that reads as the text: one display string per token, exactly the text that token covers.

A tokenizer's vocabulary strings (`convert_ids_to_tokens`) are not text: byte-level BPE
(GPT-2, Llama 3, SmolLM2, Qwen) spells every non-ASCII byte in a byte alphabet, so
"–" comes out as "âĢĵ", and SentencePiece writes spaces as "▁".  `display_tokens`
gives each token the characters (Unicode code points, as Python indexes a str) it covers:

* prompt tokens, when the prompt text and the tokenizer's offset mapping are given:
  slices of the text.  A gap no token covers (the space a word-level tokenizer
  drops, the space of a `Ġ` token whose offsets were trimmed) goes to the next
  token; trailing whitespace goes to the last token that took text.  So the
  display strings of the non-special tokens concatenate to exactly the text (`text_of`).
* otherwise (generated tokens, or no offsets): incremental decoding, the text
  decode(ids[:i+1]) adds to decode(ids[:i]), computed over a sliding window of the
  last few tokens (O(n) decodes of a few tokens each) with the tokenizer's
  clean-up of spaces turned off, so earlier text never changes.
* a character split across tokens (byte-level BPE splits "–" into two tokens, 東
  into three) is shown once, on the token that completes it; each token before it
  that covers only bytes of it shows `PARTIAL` ("◌", U+25CC DOTTED CIRCLE, the
  Unicode placeholder for a missing base character) instead of U+FFFD noise.
  `PARTIAL` is only ever a whole display string, never part of one.
* a token that covers no text of its own (SentencePiece's prefix `▁` before a
  first word that splits into bytes) shows "".
* special tokens the tokenizer added (BOS, `<|im_end|>` generated) show as their raw
  string; special tokens written in the text (a chat template's `<|im_start|>`)
  cover their own spelling, so they read the same.

Word-level tokens keep their words (with the space before them); SentencePiece
`▁` becomes the space it stands for.

    >>> from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    >>> from transformers import PreTrainedTokenizerFast
    >>> core = Tokenizer(models.BPE({c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}, []))
    >>> core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    >>> core.decoder = decoders.ByteLevel()
    >>> tok = PreTrainedTokenizerFast(tokenizer_object=core)
    >>> enc = tok("a–b", return_offsets_mapping=True)
    >>> raw_tokens(tok, enc.input_ids)
    ['a', 'â', 'Ģ', 'ĵ', 'b']
    >>> display_tokens(tok, enc.input_ids, "a–b", enc.offset_mapping)
    ['a', '◌', '◌', '–', 'b']
    >>> display_tokens(tok, enc.input_ids)                  # by decoding: the same
    ['a', '◌', '◌', '–', 'b']
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from attnflow.errors import BadArgumentError

PARTIAL = "\u25cc"  # ◌: this token holds only bytes of a character that a later token completes
_REPLACEMENT = "\ufffd"  # what decode() writes for the bytes of an unfinished character
_CONTEXT = 4  # prompt tokens decoded before the first completion token (SentencePiece needs 1 for its space)
_MAX_PENDING = 8  # tokens one character may span (UTF-8: 4) before undecodable bytes are shown as decoded


def raw_tokens(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """The tokenizer's vocabulary strings (`convert_ids_to_tokens`); the ids as strings without a tokenizer.

    >>> raw_tokens(None, [5, 7])
    ['5', '7']
    """
    ids = [int(i) for i in ids]
    if tokenizer is None:
        return [str(i) for i in ids]
    return [str(t) for t in tokenizer.convert_ids_to_tokens(ids)]


def text_of(display: Sequence[str], special: Sequence[bool] | None = None) -> str:
    """The text the display strings spell: their concatenation, `PARTIAL` markers (and `special` tokens) left out.

    >>> text_of(["a", PARTIAL, " –", "<s>"], special=[False, False, False, True])
    'a –'
    """
    special = special if special is not None else [False] * len(display)
    return "".join(d for d, s in zip(display, special) if not s and d != PARTIAL)


def special_mask(tokenizer: Any, ids: Sequence[int]) -> list[bool]:
    """True for each id the tokenizer calls special (`all_special_ids`, special added tokens: BOS, chat markers)."""
    if tokenizer is None:
        return [False] * len(ids)
    special = set(getattr(tokenizer, "all_special_ids", None) or ())
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    special |= {int(i) for i, t in added.items() if getattr(t, "special", False)}
    return [int(i) in special for i in ids]


def display_tokens(
    tokenizer: Any,
    ids: Sequence[int],
    text: str | None = None,
    offsets: Sequence[Sequence[int]] | None = None,
    *,
    context: Sequence[int] = (),
) -> list[str]:
    """One display string per id: the text it covers (from `text` + `offsets` when both are given, else by decoding).

    `offsets` is the tokenizer's `offset_mapping` for `text` (one (start, end) per id,
    as `tokenizer(text, return_offsets_mapping=True)` gives).  `context`: ids that
    come before `ids` (a prompt before its completion), decoded only so that the first
    tokens read as they do in the sequence (a SentencePiece token's leading space).

    >>> from attnflow.demo.tokenizer import build_tokenizer
    >>> tok = build_tokenizer()
    >>> enc = tok("doc1 : alice lives in paris .", return_offsets_mapping=True)
    >>> display_tokens(tok, enc.input_ids, "doc1 : alice lives in paris .", enc.offset_mapping)
    ['<s>', 'doc1', ' :', ' alice', ' lives', ' in', ' paris', ' .']
    >>> display_tokens(tok, tok.convert_tokens_to_ids(["paris", "."]), context=enc.input_ids[:6])
    [' paris', ' .']
    """
    ids = [int(i) for i in ids]
    if tokenizer is None:
        return [str(i) for i in ids]
    if text is not None and offsets is not None:
        return _from_offsets(tokenizer, ids, text, offsets)
    return _by_decoding(tokenizer, ids, [int(i) for i in context])


def sequence_display(
    tokenizer: Any,
    prompt_ids: Sequence[int],
    completion_ids: Sequence[int] = (),
    prompt_text: str | None = None,
    offsets: Sequence[Sequence[int]] | None = None,
) -> list[str]:
    """Display strings of a whole traced sequence: the prompt (from its text when it can), then the completion.

    The prompt's strings come from `offsets` when given; else, when `prompt_text` is
    given and the tokenizer is fast, from re-encoding `prompt_text` with offsets, used
    if those ids are `prompt_ids` (or `prompt_ids` less special tokens in front, as
    TransformerLens' `to_tokens` adds a BOS); else by decoding.  The completion is
    decoded after the prompt.

    >>> from attnflow.demo.tokenizer import build_tokenizer
    >>> tok = build_tokenizer()
    >>> prompt = tok("doc1 : alice lives in paris .").input_ids
    >>> sequence_display(tok, prompt, tok.convert_tokens_to_ids(["paris"]), "doc1 : alice lives in paris .")
    ['<s>', 'doc1', ' :', ' alice', ' lives', ' in', ' paris', ' .', ' paris']
    """
    prompt_ids, completion_ids = [int(i) for i in prompt_ids], [int(i) for i in completion_ids]
    if tokenizer is None:
        return [str(i) for i in prompt_ids + completion_ids]
    if offsets is None and prompt_text is not None:
        offsets = _matching_offsets(tokenizer, prompt_ids, prompt_text)
    head = display_tokens(tokenizer, prompt_ids, prompt_text, offsets)
    return head + display_tokens(tokenizer, completion_ids, context=prompt_ids)


# --- from offsets ------------------------------------------------------------------------
def _from_offsets(tokenizer: Any, ids: list[int], text: str, offsets: Sequence[Sequence[int]]) -> list[str]:
    spans = [(int(a), int(b)) for a, b in (tuple(o) for o in offsets)]
    if len(spans) != len(ids):
        raise BadArgumentError(
            f"{len(spans)} offsets for {len(ids)} token ids; pass the offset_mapping of the same encoding as the ids"
        )
    if any(not 0 <= a <= b <= len(text) for a, b in spans):
        raise BadArgumentError(
            f"an offset lies outside the {len(text)}-character text; pass the text the offsets were computed on"
        )
    special, raw = special_mask(tokenizer, ids), raw_tokens(tokenizer, ids)
    covers = [a < b for a, b in spans]
    # A character split across tokens belongs to the last token whose span holds it: cut each span at the
    # earliest start of any later covering token (byte-level spans of one character overlap).
    keep_end, later_start = [0] * len(ids), len(text)
    for i in range(len(ids) - 1, -1, -1):
        keep_end[i] = min(spans[i][1], later_start)
        if covers[i]:
            later_start = min(later_start, spans[i][0])
    out, cursor, last = [], 0, None
    for i in range(len(ids)):
        if special[i] and not covers[i]:
            out.append(raw[i])
        elif keep_end[i] > cursor:  # a zero-width token takes the gap before it (a lone `Ġ` with trimmed offsets)
            out.append(text[cursor : keep_end[i]])
            cursor, last = keep_end[i], i
        else:  # every character it touches is finished by a later token
            out.append(PARTIAL if covers[i] and _holds_bytes(tokenizer, ids[i]) else "")
    rest = text[cursor:]
    if last is not None and rest and not rest.strip():  # trailing whitespace a word-level tokenizer drops
        out[last] += rest
    return out


def _holds_bytes(tokenizer: Any, token_id: int) -> bool:
    """Whether the token alone decodes to U+FFFD: bytes of a character, not a SentencePiece prefix `▁` (no text)."""
    return _REPLACEMENT in _decode(tokenizer, [token_id])


def _matching_offsets(tokenizer: Any, ids: list[int], text: str) -> list[tuple[int, int]] | None:
    """Offsets of `text` re-encoded, if that gives `ids` (maybe after leading special tokens), else None."""
    if not getattr(tokenizer, "is_fast", False):
        return None
    special = special_mask(tokenizer, ids)
    for add in (False, True):
        enc = tokenizer(text, add_special_tokens=add, return_offsets_mapping=True)
        got, spans = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
        lead = len(ids) - len(got)
        if lead >= 0 and ids[lead:] == got and all(special[:lead]):
            return [(0, 0)] * lead + spans
    return None


# --- by decoding ---------------------------------------------------------------------------
def _decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _by_decoding(tokenizer: Any, ids: list[int], context: list[int]) -> list[str]:
    """Incremental decoding over a sliding window, the way streaming detokenizers (vLLM, TGI) do it.

    The window is seq[start : i+1]; its first `base` characters are already shown.
    Characters before a trailing U+FFFD (the bytes of an unfinished character) are
    shown now; the U+FFFD waits for the token that finishes the character, and a
    token that adds no finished character shows PARTIAL.  Once a token leaves no
    unfinished character, the window slides up to the previous such boundary.
    """
    seq = context[-_CONTEXT:] + ids
    special, raw = special_mask(tokenizer, seq), raw_tokens(tokenizer, seq)
    start, read = 0, len(seq) - len(ids)  # read: the last boundary with no unfinished character
    base = len(_decode(tokenizer, seq[start:read]))
    out: list[str] = []
    for i in range(read, len(seq)):
        if special[i]:  # added by the tokenizer or generated (<|im_end|>): its own spelling
            out.append(raw[i])  # the text after it decodes afresh, as it does at the start of a text
            start = read = i + 1
            base = 0
            continue
        window = _decode(tokenizer, seq[start : i + 1])
        forced = i == len(seq) - 1 or i + 1 - read >= _MAX_PENDING  # bytes that never finish a character
        pending = window.endswith(_REPLACEMENT) and not forced
        stable = window.rstrip(_REPLACEMENT) if pending else window
        if len(stable) > base:
            out.append(stable[base:])
            base = len(stable)
        else:
            out.append(PARTIAL if pending else "")
        if not pending:
            start, read = read, i + 1
            base = len(_decode(tokenizer, seq[start:read]))
    return out
