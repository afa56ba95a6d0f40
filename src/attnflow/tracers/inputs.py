"""Prompts -> a left-padded batch, and the checks on every `trace()` argument.

Shared by the driver and every backend (HF through nnsight, TransformerLens): nothing here touches a model.

A prompt is a string (tokenized with the tokenizer's defaults, so a BOS is added
where the tokenizer adds one), a chat as a list of `{"role", "content"}` dicts
(the tokenizer's chat template applied, with the generation prompt), or a list of
token ids (used exactly as given: no BOS added).  `completions=` appends given
text or ids (teacher forcing); `prompt_lengths` mark the boundary.

    >>> tok("the cat")["input_ids"]                     # the demo's word-level tokenizer adds a BOS (1)
    [1, 9, 72]
    >>> enc = encode(["the cat", [1, 5, 6, 7]], tok, completions=["sat", [8]])
    >>> enc.sequences, enc.prompt_lengths                 # "sat" is unknown to it: <unk> = 3
    ([[1, 9, 72, 3], [1, 5, 6, 7, 8]], [3, 4])
    >>> ids, mask = left_pad(enc.sequences, pad_id=0)
    >>> mask
    tensor([[0, 1, 1, 1, 1],
            [1, 1, 1, 1, 1]])
    >>> position_ids(mask)
    tensor([[0, 0, 1, 2, 3],
            [0, 1, 2, 3, 4]])

Query rows (`rows=`) are unpadded positions of each example: None = every
row, "last" = the last token, "completion" = the rows that *produce* the
completion tokens, i.e. rows `prompt_length - 1 .. length - 2` (the token at
t+1 is produced by query row t), or a list of positions (negatives count from
each example's end).  `row_index` turns them into the padded, right-aligned
`query_positions` layout of AttentionTrace (-1 = no row).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from attnflow._checks import byte_count, count as check_count, is_int  # noqa: F401  (the tracers' checks)
from attnflow.attention_trace import Span
from attnflow.errors import BadArgumentError, PromptError
from attnflow.flow import normalize_head_weights

HEAD_MODES = ("all", "mean", "max", "norm")
ROW_MODES = ("last", "completion")


@dataclass
class Encoded:
    """Unpadded token ids of each example (prompt then completion) and its prompt length."""

    sequences: list[list[int]]
    prompt_lengths: list[int]

    @property
    def lengths(self) -> list[int]:
        return [len(s) for s in self.sequences]


# --- prompts -------------------------------------------------------------------------
def as_prompt_list(prompts: Any) -> list:
    """One prompt or a batch of them -> a list of prompts."""
    if isinstance(prompts, Tensor):
        if prompts.ndim == 1:
            return [prompts.tolist()]
        if prompts.ndim == 2:
            return prompts.tolist()
        raise PromptError(f"a tensor of token ids must be [seq] or [batch, seq], got shape {tuple(prompts.shape)}")
    if isinstance(prompts, str) or _is_ids(prompts) or _is_chat(prompts):
        return [prompts]
    if isinstance(prompts, (list, tuple)):
        if not prompts:
            raise PromptError("the prompt list is empty; pass a string, a chat, token ids, or a list of them")
        return [p.tolist() if isinstance(p, Tensor) else p for p in prompts]
    raise PromptError(f"prompts of type {type(prompts).__name__}; pass a string, a chat, token ids, or a list of them")


def _is_ids(p: Any) -> bool:
    return isinstance(p, (list, tuple)) and bool(p) and all(isinstance(t, int) and not isinstance(t, bool) for t in p)


def _is_chat(p: Any) -> bool:
    return isinstance(p, (list, tuple)) and bool(p) and all(isinstance(m, dict) for m in p)


def encode_prompt(prompt: Any, tokenizer: Any, index: int = 0, tokenize: Callable[[str], list[int]] | None = None) -> list[int]:
    """Token ids of one prompt (string, chat or ids); raises PromptError when it is empty.

    A string goes through `tokenize` when given (a backend's own tokenization,
    e.g. TransformerLens's `to_tokens`), else through the tokenizer with its defaults.
    """
    if isinstance(prompt, (list, tuple)) and not prompt:
        raise PromptError(f"prompt {index} is empty; give it at least one token")
    if _is_ids(prompt):
        return list(prompt)
    if isinstance(prompt, str):
        if not prompt.strip():
            raise PromptError(f"prompt {index} is empty; give it some text")
        tok = _tokenizer(tokenizer, index)
        ids = tokenize(prompt) if tokenize is not None else tok(prompt)["input_ids"]
    elif _is_chat(prompt):
        tok = _tokenizer(tokenizer, index)
        if not getattr(tok, "chat_template", None):
            raise PromptError(
                f"prompt {index} is a chat but the tokenizer has no chat template; "
                "set tokenizer.chat_template or pass the prompt as a string"
            )
        text = tok.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]  # the template writes its own BOS
    else:
        raise PromptError(
            f"prompt {index} is a {type(prompt).__name__}; use a string, a list of chat messages or a list of token ids"
        )
    if not ids:
        raise PromptError(f"prompt {index} tokenizes to nothing; give it some text")
    return list(ids)


def encode_completion(completion: Any, tokenizer: Any, index: int = 0) -> list[int]:
    """Token ids of one given completion: a string (no special tokens added) or ids."""
    if isinstance(completion, Tensor):
        completion = completion.tolist()
    if isinstance(completion, (list, tuple)) and (not completion or _is_ids(completion)):
        return list(completion)
    if isinstance(completion, str):
        return list(_tokenizer(tokenizer, index)(completion, add_special_tokens=False)["input_ids"])
    raise BadArgumentError(f"completion {index} is a {type(completion).__name__}; use a string or a list of token ids")


def _tokenizer(tokenizer: Any, index: int) -> Any:
    if tokenizer is None:
        raise BadArgumentError(f"prompt {index} is text but there is no tokenizer; pass tokenizer= or token ids")
    return tokenizer


def encode(
    prompts: Any, tokenizer: Any = None, completions: Any = None, tokenize: Callable[[str], list[int]] | None = None
) -> Encoded:
    """Token ids of every prompt (strings through `tokenize` when given), with its given completion appended."""
    plist = as_prompt_list(prompts)
    seqs = [encode_prompt(p, tokenizer, i, tokenize) for i, p in enumerate(plist)]
    prompt_lengths = [len(s) for s in seqs]
    if completions is not None:
        clist = [completions] if isinstance(completions, str) or _is_ids(completions) else list(completions)
        if len(clist) != len(seqs):
            raise BadArgumentError(f"{len(clist)} completions for {len(seqs)} prompts; give one completion per prompt")
        seqs = [s + encode_completion(c, tokenizer, i) for i, (s, c) in enumerate(zip(seqs, clist))]
    return Encoded(seqs, prompt_lengths)


def check_lengths(
    sequences: Sequence[Sequence[int]], max_positions: int | None, vocab_size: int | None = None, extra: int = 0
) -> None:
    """PromptError when a sequence (+ `extra` tokens to generate) exceeds the model's positions or vocabulary."""
    for i, s in enumerate(sequences):
        if max_positions is not None and len(s) + extra > max_positions:
            more = f" + {extra} to generate" if extra else ""
            raise PromptError(
                f"prompt {i} has {len(s)} tokens{more} but the model takes at most {max_positions} positions; shorten it"
            )
        if vocab_size is not None and s and not 0 <= min(s) <= max(s) < vocab_size:
            raise PromptError(f"prompt {i} has token ids outside 0..{vocab_size - 1}, the model's vocabulary")


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[Int[Tensor, "batch seq"], Int[Tensor, "batch seq"]]:
    """(input_ids, attention_mask), left-padded to the longest sequence."""
    S = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), S), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), S), dtype=torch.long)
    for b, s in enumerate(sequences):
        if s:
            ids[b, S - len(s) :] = torch.tensor(list(s), dtype=torch.long)
            mask[b, S - len(s) :] = 1
    return ids, mask


def position_ids(attention_mask: Int[Tensor, "batch seq"]) -> Int[Tensor, "batch seq"]:
    """Positions counted from each example's first real token (0 at pads), as with right padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# --- layers, heads, rows ---------------------------------------------------------------
def layer_list(layers: Any) -> list[int] | None:
    """None, one index, or a non-empty list / tuple / range of them -> None or a list; the form only.

    What the indices may be depends on the model: `check_layers`.

        >>> layer_list(-1), layer_list(range(2))
        ([-1], [0, 1])
    """
    if layers is None:
        return None
    if isinstance(layers, int) and not isinstance(layers, bool):
        return [layers]
    if not isinstance(layers, (list, tuple, range)) or not layers:
        raise BadArgumentError(f"layers={layers!r}; pass None or a non-empty list of layer indices")
    return list(layers)


def check_layers(layers: Any, num_layers: int) -> list[int]:
    """Layer indices (negatives count from the end) -> sorted, unique, non-negative.

    Sorted because a trace reads layers in the order the model runs them.

        >>> check_layers([0, -1], 4)
        [0, 3]
    """
    layers = layer_list(layers)
    if layers is None:
        return list(range(num_layers))
    out = set()
    for layer in layers:
        if not isinstance(layer, int) or isinstance(layer, bool) or not -num_layers <= layer < num_layers:
            raise BadArgumentError(
                f"layer {layer!r} is out of range for a model with {num_layers} layers; "
                f"use indices in {-num_layers}..{num_layers - 1}"
            )
        out.add(layer % num_layers)
    return sorted(out)


def head_mode(heads: Any) -> str | Tensor:
    """"all" | "mean" | "max" | "norm", or a weight tensor (unchecked: its shape depends on the model), else BadArgumentError.

        >>> head_mode("mean")
        'mean'
    """
    if isinstance(heads, str):
        if heads not in HEAD_MODES:
            raise BadArgumentError(f"heads={heads!r}; use one of {', '.join(HEAD_MODES)} or a [layer, head] weight tensor")
        return heads
    if not isinstance(heads, Tensor):
        raise BadArgumentError(f"heads of type {type(heads).__name__}; use 'all', 'mean', 'max', 'norm' or a [layer, head] tensor")
    return heads


def check_heads(heads: Any, num_layers: int, num_heads: int, layers: list[int]) -> str | Float[Tensor, "layer head"]:
    """"all" | "mean" | "max", or weights -> per-layer weights for `layers`, each row summing to 1.

    Weights are a [num_layers, num_heads] tensor indexed by model layer, or a
    [len(layers), num_heads] one aligned with `layers`; they must be finite,
    non-negative, and not all zero in a layer (`flow.normalize_head_weights`).

        >>> check_heads(torch.tensor([[1., 1.], [3., 1.], [0., 2.]]), 3, 2, [1, 2])   # model layers 1 and 2
        tensor([[0.7500, 0.2500],
                [0.0000, 1.0000]])
    """
    heads = head_mode(heads)
    if isinstance(heads, str):
        return heads
    w = heads.detach().float().cpu()
    if w.ndim != 2 or w.shape[1] != num_heads or w.shape[0] not in (num_layers, len(layers)):
        recorded = "" if len(layers) == num_layers else f" or ({len(layers)}, {num_heads}), one row per recorded layer"
        raise BadArgumentError(
            f"heads weights have shape {tuple(w.shape)}; this model needs [layer, head] = ({num_layers}, {num_heads})"
            f"{recorded}: were the weights fit on another model?"
        )
    if w.shape[0] == num_layers:
        w = w[layers]
    return normalize_head_weights(w)


def head_label(heads: str | Tensor) -> str:
    """AttentionTrace.heads for a checked `heads=`: the mode, or "weighted"."""
    return "weighted" if isinstance(heads, Tensor) else heads


def check_rows(rows: Any, has_completion: bool) -> Any:
    """None | "last" | "completion" | list of ints, else BadArgumentError."""
    if rows is None:
        return None
    if isinstance(rows, str):
        if rows not in ROW_MODES:
            raise BadArgumentError(f"rows={rows!r}; use None (all rows), 'last', 'completion' or a list of positions")
        return require_completion(rows, has_completion)
    if isinstance(rows, int) and not isinstance(rows, bool):
        return [rows]
    if isinstance(rows, (list, tuple)) and rows and all(isinstance(r, int) and not isinstance(r, bool) for r in rows):
        return list(rows)
    raise BadArgumentError(f"rows={rows!r}; use None (all rows), 'last', 'completion' or a non-empty list of positions")


def require_completion(rows: Any, has_completion: bool) -> Any:
    """`rows` unchanged, unless it is "completion" and there is none to record (BadArgumentError)."""
    if rows == "completion" and not has_completion:
        raise BadArgumentError("rows='completion' needs a completion; pass max_new_tokens= or completions=")
    return rows


def row_positions(rows: Any, lengths: Sequence[int], prompt_lengths: Sequence[int]) -> list[list[int]]:
    """Sorted unpadded query positions of each example for a checked `rows=`.

        >>> row_positions("completion", lengths=[5], prompt_lengths=[3])   # rows 2, 3 produce tokens 3, 4
        [[2, 3]]
    """
    out = []
    for b, (n, p) in enumerate(zip(lengths, prompt_lengths)):
        if rows is None:
            pos = range(n)
        elif rows == "last":
            pos = [n - 1]
        elif rows == "completion":
            pos = range(p - 1, n - 1)
        else:
            bad = [r for r in rows if not -n <= r < n]
            if bad:
                raise BadArgumentError(
                    f"rows {bad} are out of range for example {b} of length {n}; use positions in {-n}..{n - 1}"
                )
            pos = {r % n for r in rows}
        out.append(sorted(pos))
    return out


def row_index(positions: Sequence[Sequence[int]], lengths: Sequence[int], seq: int) -> Int[Tensor, "batch row"]:
    """Padded, right-aligned query positions ([batch, row], -1 = none) for examples left-padded to `seq`.

        >>> row_index([[0, 1, 2], [2]], lengths=[3, 4], seq=4)
        tensor([[ 1,  2,  3],
                [-1, -1,  2]])
    """
    R = max((len(p) for p in positions), default=0)
    index = torch.full((len(positions), R), -1, dtype=torch.long)
    for b, (pos, n) in enumerate(zip(positions, lengths)):
        if pos:
            index[b, R - len(pos) :] = torch.tensor(pos, dtype=torch.long) + (seq - n)
    return index


def check_spans(spans: Any, lengths: Sequence[int]) -> list[list[Span]]:
    """Per-example spans (None = none); each must lie inside its example."""
    if spans is None:
        return [[] for _ in lengths]
    if len(spans) != len(lengths):
        raise BadArgumentError(f"spans has {len(spans)} entries for {len(lengths)} prompts; give one list per prompt")
    out = []
    for b, (ss, n) in enumerate(zip(spans, lengths)):
        ss = list(ss or [])
        for s in ss:
            if not isinstance(s, Span):
                raise BadArgumentError(f"spans[{b}] holds a {type(s).__name__}; use attnflow.Span")
            if s.end > n:
                raise BadArgumentError(f"span {s.name!r} ends at {s.end} but example {b} has {n} tokens")
        out.append(ss)
    return out


def chunks(n: int, batch_size: int) -> list[range]:
    """Consecutive index ranges of at most `batch_size` covering range(n).

        >>> chunks(5, 2)
        [range(0, 2), range(2, 4), range(4, 5)]
    """
    batch_size = check_count("batch_size", batch_size, minimum=1)
    return [range(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


# --- token ids of a model ----------------------------------------------------------------
def first_int(*values: Any, default: int = 0) -> int:
    """The first plain int among `values` (e.g. the pad id: the tokenizer's, else its EOS, ...), else `default`.

        >>> first_int(None, 2, 0)
        2
    """
    return next((v for v in values if isinstance(v, int) and not isinstance(v, bool)), default)


def id_set(ids: int | Sequence[int] | None) -> set[int]:
    """A config's `eos_token_id` (None, one id or a list of them) as a set.

        >>> id_set(None), id_set(2), id_set([2, 3])
        (set(), {2}, {2, 3})
    """
    return set(ids if isinstance(ids, (list, tuple)) else [] if ids is None else [ids])


def token_strings(tokenizer: Any, ids: list[int]) -> list[str]:
    """The tokenizer's token strings of `ids` (the ids as text without a tokenizer).

        >>> token_strings(None, [4, 6])
        ['4', '6']
    """
    if tokenizer is None:
        return [str(i) for i in ids]
    return [str(t) for t in tokenizer.convert_ids_to_tokens(ids)]
