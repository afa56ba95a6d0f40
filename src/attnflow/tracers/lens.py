"""The TransformerLens backend: attention through their `hook_pattern` hook points.

A TransformerLens 4.x `TransformerBridge` (from `boot_transformers` or
`boot_native`), or a `HookedTransformer` where the installed version still has
one, exposes every layer's attention probabilities at
`blocks.{l}.attn.hook_pattern` as `[batch, head, query, key]`.  `LensBackend`
runs the model once per batch through `run_with_hooks`, and each hook keeps only
what was asked for (the query rows of `rows=`, the head reduction of `heads=`,
the layers of `layers=`), so what it holds is O(layers x rows x seq), never
layers x heads x seq².

    >>> bridge = TransformerBridge.boot_transformers("gpt2", hf_model=copy.deepcopy(hf), tokenizer=tok)  # doctest: +SKIP
    >>> tr = af.trace(bridge, ["The cat sat", "A dog"], heads="mean", rows="last")  # doctest: +SKIP
    >>> tr.patterns.shape                      # batch layer head query key  # doctest: +SKIP
    torch.Size([2, 12, 1, 1, 4])
    >>> tr.tokens[1]                           # the bridge prepended BOS to the string  # doctest: +SKIP
    ['<|endoftext|>', 'A', 'Ġdog']

(Skipped as a doctest: booting a bridge needs a GPT-2 checkpoint; tests/test_lens.py runs
this on a tiny offline GPT-2.)

TransformerLens is the `lens` extra (`pip install "attnflow[lens]"`); without it
a TransformerLens model gets an UnsupportedModelError that names the extra.

Strings are tokenized the way the bridge tokenizes them (`to_tokens`, which
prepends BOS per `cfg.default_prepend_bos`), and that BOS is part of the
recorded tokens and prompt length; token ids are used exactly as given.  The
checks, batching, assembly and the AttentionTrace are `tracers/driver.py`'s, the
same as for HF models.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from attnflow.errors import BadArgumentError, UnsupportedModelError
from attnflow.tracers import inputs, reduce
from attnflow.tracers.options import TraceOptions

LENS_CLASSES = ("TransformerBridge", "HookedTransformer", "HookedRootModule")
HOOK = "blocks.{layer}.attn.hook_pattern"


def is_lens_model(model: Any) -> bool:
    """True for a TransformerLens model (TransformerBridge, HookedTransformer, any HookedRootModule), by class."""
    return any(
        cls.__name__ in LENS_CLASSES and cls.__module__.startswith("transformer_lens") for cls in type(model).__mro__
    )


LENS_EXTRA = 'pip install "attnflow[lens]"'


def require_transformer_lens() -> None:
    """UnsupportedModelError naming the `lens` extra when transformer_lens cannot be imported.

    TransformerLens is an optional dependency of attnflow (`pip install "attnflow[lens]"`);
    the core install records HF models only.
    """
    try:
        import transformer_lens  # noqa: F401  (already imported wherever a TransformerLens model exists)
    except ImportError as err:
        raise UnsupportedModelError(
            f"this is a TransformerLens model but transformer_lens cannot be imported ({err}); "
            f"install the TransformerLens extra: {LENS_EXTRA}"
        ) from err


class LensBackend:
    """A TransformerLens model's geometry, tokenization, generation and per-batch recording through hooks."""

    def __init__(self, model: Any, tokenizer: Any, options: TraceOptions):
        require_transformer_lens()
        if options.remote:
            raise BadArgumentError(
                "remote= runs HuggingFace models on NDIF through nnsight; a TransformerLens model records locally: "
                "drop remote= or trace the HF model (or its hub id) instead"
            )
        if options.norms or (isinstance(options.heads, str) and options.heads == "norm"):
            raise BadArgumentError(
                "norms=True and heads='norm' record value and residual norms through nnsight on HF models; "
                "a TransformerLens model records patterns only: trace the HF model instead, or drop norms= / heads='norm'"
            )
        self.model, cfg = model, model.cfg
        self.tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        self.num_layers, self.num_heads = int(cfg.n_layers), int(cfg.n_heads)
        self.model_info = model_info(model)
        self.pad_id = inputs.first_int(
            getattr(self.tokenizer, "pad_token_id", None), getattr(self.tokenizer, "eos_token_id", None)
        )
        self.eos_ids = _eos_ids(model, self.tokenizer)
        self.device = _device(model)
        self.settings = {
            "name": "transformer_lens",
            "hook": HOOK,
            "prepend_bos": bool(getattr(cfg, "default_prepend_bos", True)),
        }

    def encode(self, prompts: Any, completions: Any) -> inputs.Encoded:
        """Token ids of every prompt and completion; strings go through the bridge's `to_tokens` (BOS as it adds it).

        A caller's own tokenizer is used with its defaults, as for HF models.
        """
        own = self.tokenizer is getattr(self.model, "tokenizer", None)
        tokenize = (lambda text: self.model.to_tokens(text, truncate=False)[0].tolist()) if own else None
        return inputs.encode(prompts, self.tokenizer, completions, tokenize=tokenize)

    def generate(self, sequences: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy new tokens of one batch: argmax of the last row, recomputed each step, until every row hit EOS.

        The same tokens as `hf.generate(do_sample=False)`: full forward passes
        instead of a KV cache, so nothing depends on TransformerLens's generation loop.
        """
        eos = torch.tensor(sorted(self.eos_ids), dtype=torch.long)
        ids, mask = inputs.left_pad(sequences, self.pad_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        done = torch.zeros(len(sequences), dtype=torch.bool)
        new = []
        for _ in range(max_new_tokens):
            nxt = self.model(ids, attention_mask=mask, return_type="logits")[:, -1].argmax(-1)  # [batch]
            new.append(nxt.cpu())
            done = done | torch.isin(new[-1], eos)
            if bool(done.all()):
                break
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        return torch.stack(new, dim=1).tolist() if new else [[] for _ in sequences]

    def record(
        self, sequences: list[list[int]], positions: list[list[int]], *, layers: list[int], heads: str | Tensor,
        options: TraceOptions, out: Float[Tensor, "batch layer head row key"],
    ) -> None:
        """One forward pass of a left-padded batch; each hook writes its layer's selected rows, heads reduced, into `out`."""
        ids, mask = inputs.left_pad(sequences, self.pad_id)
        row_index = inputs.row_index(positions, [len(s) for s in sequences], ids.shape[1])
        seen: set[int] = set()

        def keep(index: int):
            weights = heads if isinstance(heads, str) else heads[index]

            def hook(pattern: Float[Tensor, "batch head query key"], hook: Any = None) -> None:
                out[:, index] = select(pattern, row_index, mask, weights, options.dtype)
                seen.add(index)

            return hook

        hooks = [(HOOK.format(layer=layer), keep(i)) for i, layer in enumerate(layers)]
        self.model.run_with_hooks(ids.to(self.device), attention_mask=mask.to(self.device), return_type=None, fwd_hooks=hooks)
        missing = [layers[i] for i in range(len(layers)) if i not in seen]
        if missing:
            raise UnsupportedModelError(
                f"hook_pattern of layers {missing} never fired; boot the bridge with eager attention "
                "(boot_transformers does) so TransformerLens computes attention probabilities"
            )


def select(
    pattern: Float[Tensor, "batch head query key"],
    row_index: Int[Tensor, "batch row"],
    mask: Int[Tensor, "batch key"],
    heads: str | Float[Tensor, "head"],
    dtype: torch.dtype,
) -> Float[Tensor, "batch head_out row key"]:
    """The rows in `row_index` (-1 = none, left zero), pad keys zeroed, heads reduced in float32, stored as `dtype`.

        >>> P = torch.full((1, 2, 3, 3), 1 / 3)
        >>> select(P, torch.tensor([[-1, 2]]), torch.tensor([[0, 1, 1]]), "mean", torch.float32)[0, 0]
        tensor([[0.0000, 0.0000, 0.0000],
                [0.0000, 0.3333, 0.3333]])
    """
    present = (row_index >= 0).to(pattern.device)
    rows = reduce.gather_rows(pattern, row_index.clamp(min=0).to(pattern.device)).float()
    rows = rows * present[:, None, :, None] * mask.to(pattern.device)[:, None, None, :]
    return reduce.to_storage(reduce.reduce_heads(rows, heads), dtype).cpu()


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """End-of-sequence ids: the wrapped HF model's generation config (as hf.generate uses), else the tokenizer's."""
    try:
        config = getattr(model.original_model, "generation_config", None)
    except Exception:  # a native bridge or a HookedTransformer: no HF model inside
        config = None
    eos = getattr(config, "eos_token_id", None)
    return inputs.id_set(eos if eos is not None else getattr(tokenizer, "eos_token_id", None))


def _device(model: Any) -> torch.device:
    device = getattr(model.cfg, "device", None)
    if device is not None:
        return torch.device(device)
    return next(model.parameters()).device


def model_info(model: Any) -> dict:
    """The keys of the HF backend's model_info (and the class), from the TransformerLens config."""
    cfg = model.cfg
    heads = int(cfg.n_heads)
    return {
        "name": str(getattr(cfg, "model_name", None) or type(model).__name__),
        "architecture": str(getattr(cfg, "architecture", None) or type(model).__name__),
        "model_type": getattr(cfg, "original_architecture", None),
        "num_layers": int(cfg.n_layers),
        "num_heads": heads,
        "num_kv_heads": int(getattr(cfg, "n_key_value_heads", None) or heads),
        "max_positions": getattr(cfg, "n_ctx", None),
        "vocab_size": getattr(cfg, "d_vocab", None),
        "attn_implementation": "eager",
        "attention_module": "blocks.{layer}.attn",
        "attention_sinks": False,
        "class": type(model).__name__,
        "source": "transformer_lens",
    }
