"""The demo's word-level tokenizer: one token per whitespace-separated word of the task's closed vocabulary.

    >>> tok = build_tokenizer()
    >>> enc = tok("doc1 : alice lives in paris .", return_offsets_mapping=True)
    >>> tok.convert_ids_to_tokens(enc.input_ids)
    ['<s>', 'doc1', ':', 'alice', 'lives', 'in', 'paris', '.']
    >>> enc.offset_mapping[:3]
    [(0, 0), (0, 4), (5, 6)]
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from attnflow.demo.task import vocabulary

SPECIAL = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>"}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A PreTrainedTokenizerFast that prepends `<s>`, pads on the left (for generation) and maps unknown words to `<unk>`."""
    vocab = {t: i for i, t in enumerate([*SPECIAL.values(), *vocabulary()])}
    core = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL["unk"]))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    bos = SPECIAL["bos"]
    core.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=bos,
        eos_token=SPECIAL["eos"],
        pad_token=SPECIAL["pad"],
        unk_token=SPECIAL["unk"],
        padding_side="left",
        model_max_length=256,
    )
