"""The HF backend: attention of any HF causal LM through nnsight, locally or on NDIF, its kernel left as it is.

Every attention module written against transformers' attention interface runs

    attn_output, attn_weights = attention_interface(self, query, key, value, attention_mask, scaling=..., ...)

nnsight's `.source` exposes that call site inside the module's forward (named
`attention_interface_<n>`; n drifts between versions, so it is found by prefix).
Inside one `model.trace(...)` the tracer reads the call's inputs (post-rotary
query and key, the mask, sliding_window/softcap/sinks kwargs), recomputes the
probabilities of the requested rows in float32 with `reduce.py`, reduces heads
and casts to the storage dtype there, and saves only that.  The model's own
attention (sdpa, flash, eager) runs untouched: no `output_attentions`.

`HFBackend` is what `tracers/driver.py` drives: the checks, batching and
assembly are the driver's.

    >>> backend = HFBackend(model, None, TraceOptions())   # a 2-layer HF model
    >>> backend.num_layers, backend.sites[0].op.startswith(OP_PREFIX)
    (2, True)
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import nnsight
import torch
from jaxtyping import Float
from torch import Tensor


from attnflow.errors import UnsupportedModelError
from attnflow.tracers import inputs, reduce
from attnflow.tracers import remote as ndif
from attnflow.tracers.options import TraceOptions

OP_PREFIX = "attention_interface_"
SUPPORTED = (
    "models whose attention modules call transformers' `attention_interface(...)` "
    "(Llama, Mistral, Qwen2/3, Gemma 2, Phi-3, GPT-2, GPT-NeoX and most transformers>=5 decoders)"
)


@dataclass
class Site:
    """Where one layer's attention is recorded: module path, its call-site op name, its causal flag."""

    path: str
    op: str
    is_causal: bool
    module_class: str


# --- the model -------------------------------------------------------------------------
def as_nnsight(model: Any, tokenizer: Any = None) -> tuple[Any, torch.nn.Module, Any]:
    """(nnsight model, underlying HF module, tokenizer) for an nnsight model or a PreTrainedModel."""
    if isinstance(model, nnsight.Envoy):
        return model, model._module, tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if isinstance(model, torch.nn.Module):
        # A plain wrapper: attnflow tokenizes and pads itself, so the user's tokenizer is left untouched.
        return nnsight.NNsight(model), model, tokenizer
    raise UnsupportedModelError(
        f"cannot trace a {type(model).__name__}; pass an nnsight model, a transformers PreTrainedModel "
        "(with tokenizer=), or a TransformerLens model"
    )


_HAS_CALL: dict[type, bool] = {}


def _calls_interface(cls: type) -> bool:
    """Whether the class's forward calls `attention_interface(...)` (cached per class)."""
    if cls not in _HAS_CALL:
        try:
            _HAS_CALL[cls] = "attention_interface(" in inspect.getsource(cls.forward)
        except (OSError, TypeError, AttributeError):
            _HAS_CALL[cls] = False
    return _HAS_CALL[cls]


def attention_sites(nn_model: Any, hf: torch.nn.Module) -> list[Site]:
    """One Site per attention module, in the order the model runs them (module order)."""
    sites = []
    for path, module in hf.named_modules():
        if path and _calls_interface(type(module)):
            names = [n for n in nn_model.get(path).source.names if _is_op(n)]
            if names:  # a binding `attention_interface = ...` precedes the call: the call is the last
                sites.append(Site(path, names[-1], bool(getattr(module, "is_causal", True)), type(module).__name__))
    if not sites:
        attn = sorted({type(m).__name__ for _, m in hf.named_modules() if "attention" in type(m).__name__.lower()})
        what = (
            f"the attention modules of {type(hf).__name__} ({', '.join(attn)}) have no attention_interface call site"
            if attn
            else f"{type(hf).__name__} has no attention module with an attention_interface call site"
        )
        raise UnsupportedModelError(f"{what}; attnflow records {SUPPORTED}")
    return sites


def _is_op(name: str) -> bool:
    return name.startswith(OP_PREFIX) and name[len(OP_PREFIX) :].isdigit()


def _config_get(config: Any, *names: str) -> Any:
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    return None


def model_info(hf: torch.nn.Module, sites: list[Site], source: str = "nnsight") -> dict:
    """Name, architecture and attention geometry of an HF model, as stored in AttentionTrace.model_info."""
    cfg = getattr(hf, "config", None)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    heads = _config_get(text, "num_attention_heads", "n_head")
    return {
        "name": getattr(cfg, "_name_or_path", "") or type(hf).__name__,
        "architecture": type(hf).__name__,
        "model_type": getattr(cfg, "model_type", None),
        "num_layers": len(sites),
        "num_heads": heads,
        "num_kv_heads": _config_get(text, "num_key_value_heads") or heads,
        "max_positions": _config_get(text, "max_position_embeddings", "n_positions", "n_ctx"),
        "vocab_size": _config_get(text, "vocab_size"),
        "attn_implementation": getattr(cfg, "_attn_implementation", None),
        "attention_module": sites[0].module_class,
        "source": source,
    }


def _device(hf: torch.nn.Module) -> torch.device:
    p = next(hf.parameters(), None)
    return p.device if p is not None and p.device.type != "meta" else torch.device("cpu")


# --- the backend -------------------------------------------------------------------------
def pad_id(tokenizer: Any, hf: torch.nn.Module) -> int:
    """The id left padding uses: the tokenizer's pad or eos token, else the model's configured pad id, else 0."""
    gen_cfg = getattr(hf, "generation_config", None)
    return inputs.first_int(
        getattr(tokenizer, "pad_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
        getattr(gen_cfg, "pad_token_id", None),
        getattr(hf.config, "pad_token_id", None),
    )


class HFBackend:
    """An HF model's attention sites, geometry, generation and per-batch recording (the driver does the rest)."""

    def __init__(self, model: Any, tokenizer: Any, options: TraceOptions):
        self.nn_model, self.hf, self.tokenizer = as_nnsight(model, tokenizer)
        self.sites = attention_sites(self.nn_model, self.hf)
        self.model_info = model_info(self.hf, self.sites)
        self.num_layers, self.num_heads = len(self.sites), self.model_info["num_heads"]
        self.remote = options.remote
        self.device = _device(self.hf)
        gen_cfg = getattr(self.hf, "generation_config", None)
        self.pad_id = pad_id(self.tokenizer, self.hf)
        self.eos_ids = inputs.id_set(getattr(gen_cfg, "eos_token_id", None))
        self.settings = {"name": "nnsight"}

    def encode(self, prompts: Any, completions: Any) -> inputs.Encoded:
        return inputs.encode(prompts, self.tokenizer, completions)

    def generate(self, sequences: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy new tokens of one batch from `hf.generate` (or nnsight's generate where `remote` says)."""
        ids, mask = inputs.left_pad(sequences, self.pad_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        greedy = dict(  # plain argmax decoding, whatever penalties the checkpoint's generation_config sets
            max_new_tokens=max_new_tokens, min_new_tokens=0, do_sample=False, num_beams=1,
            repetition_penalty=1.0, no_repeat_ngram_size=0, pad_token_id=self.pad_id,
        )
        if self.remote:  # generate where the weights are: NDIF, or nnsight's local round trip
            out = ndif.generate(self.nn_model, ids, mask, remote=self.remote, **greedy)
        else:
            out = self.hf.generate(input_ids=ids, attention_mask=mask, **greedy)
        return out[:, ids.shape[1] :].tolist()

    def record(
        self, sequences: list[list[int]], positions: list[list[int]], *, layers: list[int], heads: str | Tensor,
        dtype: torch.dtype,
    ) -> Float[Tensor, "batch layer head row key"]:
        """Patterns of one left-padded batch from one `model.trace(...)`, rows right-aligned."""
        ids, mask = inputs.left_pad(sequences, self.pad_id)
        pos = inputs.position_ids(mask)
        rows = inputs.row_index(positions, [len(s) for s in sequences], ids.shape[1]).to(self.device)
        envoys = [self.nn_model.get(self.sites[layer].path) for layer in layers]
        ops = [self.sites[layer].op for layer in layers]
        causal = [self.sites[layer].is_causal for layer in layers]
        weights = [heads if isinstance(heads, str) else heads[i] for i in range(len(layers))]
        stop_early = layers[-1] < len(self.sites) - 1  # nothing to read past the last requested layer
        extra = ndif.trace_kwargs(self.nn_model, self.remote)  # {} locally; a checked RemoteBackend for NDIF
        with ndif.translate_errors(extra):
            with self.nn_model.trace(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                position_ids=pos.to(self.device),
                use_cache=False,  # one forward: a KV cache would only hold memory
                **extra,
            ) as tracer:
                patterns = None  # [batch, layer, head, row, key], filled layer by layer (no second copy from a stack)
                for i in range(len(envoys)):
                    args, kwargs = getattr(envoys[i].source, ops[i]).inputs
                    p = reduce.interface_pattern(  # float32: the copy into `patterns` casts to the storage dtype
                        args, kwargs, row_index=rows, heads=weights[i], dtype=None, is_causal=causal[i]
                    )
                    if patterns is None:
                        patterns = p.new_empty((p.shape[0], len(envoys), *p.shape[1:]), dtype=dtype)
                    patterns[:, i] = p
                patterns = patterns.save()
                if stop_early:
                    tracer.stop()
        return patterns.detach().cpu()
