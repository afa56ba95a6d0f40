"""The HF backend: attention of any HF causal LM through nnsight, locally or on NDIF, its kernel left as it is.

Every attention module written against transformers' attention interface runs

    attn_output, attn_weights = attention_interface(self, query, key, value, attention_mask, scaling=..., ...)

nnsight's `.source` exposes that call site inside the module's forward (named
`attention_interface_<n>`; n drifts between versions, so it is found by prefix).
Inside one `model.trace(...)` the tracer reads the call's inputs (post-rotary
query and key, the mask, sliding_window/softcap/sinks kwargs), recomputes the
probabilities of the requested rows in float32 with `reduce.py`, reduces heads
and casts to the storage dtype there, and saves only that.  The model's own
attention (sdpa, flash, eager) runs untouched: no `output_attentions`.  Rows are
computed in query chunks sized by `memory_budget`, so one layer's float32
transient is O(chunk x key x head) (`reduce.interface_pattern`).

With `max_new_tokens`, `generate_record` records inside the one `hf.generate`
call (nnsight's `tracer.iter` visits every forward of the decode loop): the
prompt's rows at prefill, each new token's row at its decode step over the KV
cache's keys, locally and remotely (on NDIF the block allocates the result where
the model runs and sends it back once).  The keys the cache returns are the keys
a full forward computes, so the patterns equal the two-pass path's up to float
rounding (<= 1e-6 in float32 on real models; tests compare in float64).  With
`trace(..., out=DIR)` the prompt's rows go to the driver's writer layer by layer
at prefill (`generate_record(..., sink=)`), as `record(..., sink=)` hands over a
plain forward's.  The two-pass path (`generate`, then `record` over prompt +
completion) remains for `one_pass=False` and in the TransformerLens backend (no
KV-cache generation).

With `norms=True` (or `heads="norm"`) the same block also reads, per recorded
layer and in the order the model runs them, the decoder layer's input (the
residual stream), the call's `value` and the attention module's output, and
keeps only their norms: `‖x_i‖`, `‖a_i‖` and `‖W_O^h v^h_j‖` (`reduce.value_norms`,
through the QR factor of each head's block of the output projection, computed
once per weight locally and inside the block remotely, where the weights are).
"The attention output" is the module's own output: models with a norm after
attention (Gemma 2's post_attention_layernorm) add a normed version of it.

`HFBackend` is what `tracers/driver.py` drives: the checks, batching and
assembly are the driver's.

    >>> backend = HFBackend(model, None, TraceOptions())   # the 4-layer demo model
    >>> backend.num_layers, backend.sites[0].op.startswith(OP_PREFIX)
    (4, True)
"""

from __future__ import annotations

import inspect
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import nnsight
import torch
from jaxtyping import Float
from torch import Tensor
from transformers import StoppingCriteria, StoppingCriteriaList

from attnflow.errors import UnsupportedModelError
from attnflow.tracers import inputs, reduce
from attnflow.tracers import remote as ndif
from attnflow.tracers.heads import PROJ_NAMES, o_proj_blocks, output_projection
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
        # gpt-oss style sinks take part of each row: its rows sum to less than 1 (attribution.validate_trace)
        "attention_sinks": any(isinstance(getattr(hf.get_submodule(s.path), "sinks", None), torch.Tensor) for s in sites),
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


def greedy(max_new_tokens: int, pad_token_id: int) -> dict[str, Any]:
    """`generate` keywords of plain argmax decoding, whatever penalties the checkpoint's generation_config sets."""
    return dict(
        max_new_tokens=max_new_tokens, min_new_tokens=0, do_sample=False, num_beams=1,
        repetition_penalty=1.0, no_repeat_ngram_size=0, pad_token_id=pad_token_id,
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
        kw = greedy(max_new_tokens, self.pad_id)
        if self.remote:  # generate where the weights are: NDIF, or nnsight's local round trip
            out = ndif.generate(self.nn_model, ids, mask, remote=self.remote, **kw)
        else:
            out = self.hf.generate(input_ids=ids, attention_mask=mask, **kw)
        return out[:, ids.shape[1] :].tolist()

    def record(
        self, sequences: list[list[int]], positions: list[list[int]], *, layers: list[int], heads: str | Tensor,
        options: TraceOptions, out: Float[Tensor, "batch layer head row key"] | None,
        norms: dict[str, Tensor] | None = None, sink: Callable[[int, Tensor], None] | None = None,
    ) -> None:
        """Patterns of one left-padded batch from one `model.trace(...)`, rows right-aligned, written into `out`.

        Locally each layer's rows are written straight into `out` chunk by chunk
        (`reduce.interface_pattern`); a remote run builds the batch's tensor where
        the model runs and copies what comes back.  `norms` (windows of the
        trace's `AttentionTrace.norms`, keys right-aligned) are filled in the same
        forward: per layer, the residual input's norm (the decoder layer's input),
        each key's value norm through the output projection, the attention output's norm.
        With `sink` (locally only: `streams`)
        and `out=None`, each layer is computed into one reused [batch, head, row, key]
        buffer and handed to `sink(layer_index, buffer)` while the forward runs, so one
        layer is held at a time (`trace(..., out=DIR)` writes it to disk there).
        """
        ids, mask = inputs.left_pad(sequences, self.pad_id)
        pos = inputs.position_ids(mask)
        rows = inputs.row_index(positions, [len(s) for s in sequences], ids.shape[1]).to(self.device)
        envoys = [self.nn_model.get(self.sites[layer].path) for layer in layers]
        ops = [self.sites[layer].op for layer in layers]
        causal = [self.sites[layer].is_causal for layer in layers]
        weights = [heads if isinstance(heads, str) else heads[i] for i in range(len(layers))]
        dtype, budget = options.dtype, options.memory_budget
        stop_early = layers[-1] < len(self.sites) - 1  # nothing to read past the last requested layer
        extra = ndif.trace_kwargs(self.nn_model, self.remote)  # {} locally; a checked RemoteBackend for NDIF
        local = out if not extra else None  # a remote block cannot write into a tensor of this process
        want = norms is not None or (isinstance(heads, str) and heads == "norm")
        # plain lists only in the block: a remote server has no attnflow (only reduce.py travels)
        blocks, projs, conv1d, factors = self.norm_sources(layers, local=not extra) if want else ([], [], [], [])
        layer_envoys = [self.nn_model.get(b) for b in blocks]
        H, L, B, S = self.num_heads, len(layers), len(sequences), ids.shape[1]
        key_mask = mask.to(self.device).float()  # [batch, seq]: pad positions get norm 0
        local_norms = norms if not extra else None
        if sink is not None:
            if extra:
                raise ValueError("a remote recording cannot stream its layers; this is an attnflow bug")
            head_out = self.num_heads if isinstance(heads, str) and heads == "all" else 1
            layer_buf = torch.zeros((len(sequences), head_out, rows.shape[1], ids.shape[1]), dtype=dtype, device=self.device)
        with ndif.translate_errors(extra):
            with self.nn_model.trace(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                position_ids=pos.to(self.device),
                use_cache=False,  # one forward: a KV cache would only hold memory
                **extra,
            ) as tracer:
                patterns = local  # [batch, layer, head, row, key], filled layer by layer (no second copy from a stack)
                found = local_norms
                for i in range(len(envoys)):
                    if want:
                        x = layer_envoys[i].input  # [batch, seq, hidden]: the residual stream entering the layer
                    args, kwargs = getattr(envoys[i].source, ops[i]).inputs
                    vn = None
                    if want:
                        R = factors[i]
                        if R is None:  # remote: the projection's weights are where the block runs
                            R = reduce.value_factors(reduce.output_blocks(getattr(envoys[i], projs[i]).weight, H, conv1d[i]))
                        vn = reduce.value_norms(reduce.bind(args, kwargs)["value"], R) * key_mask[:, None, :]  # [b, head, key]
                    if sink is not None:  # streamed: one layer at a time, handed on while the forward runs
                        reduce.interface_pattern(
                            args, kwargs, row_index=rows, heads=weights[i], dtype=dtype, is_causal=causal[i],
                            out=layer_buf, memory_budget=budget, value_norms=vn,
                        )
                        sink(i, layer_buf)
                    else:
                        if patterns is None:
                            Ho = args[1].shape[1] if isinstance(heads, str) and heads == "all" else 1
                            patterns = args[1].new_zeros((B, L, Ho, rows.shape[1], args[2].shape[2]), dtype=dtype)
                        reduce.interface_pattern(
                            args, kwargs, row_index=rows, heads=weights[i], dtype=dtype, is_causal=causal[i],
                            out=patterns[:, i], memory_budget=budget, value_norms=vn,
                        )
                    if norms is not None:
                        if found is None:
                            found = {
                                "value": args[1].new_zeros((B, L, H, S), dtype=torch.float32),
                                "attn": args[1].new_zeros((B, L, S), dtype=torch.float32),
                                "residual": args[1].new_zeros((B, L, S), dtype=torch.float32),
                            }
                        a = envoys[i].output
                        a = a[0] if isinstance(a, tuple) else a  # [batch, seq, hidden], before the residual add
                        found["value"][:, i] = vn
                        found["residual"][:, i] = reduce.position_norms(x) * key_mask
                        found["attn"][:, i] = reduce.position_norms(a) * key_mask
                if local is None and sink is None:
                    patterns = patterns.save()
                    if norms is not None:  # saved names come back; a dict of saved tensors would not
                        value_n, attn_n, residual_n = found["value"].save(), found["attn"].save(), found["residual"].save()
                if stop_early:
                    tracer.stop()
        if local is None and sink is None:
            out.copy_(patterns.detach())
            if norms is not None:
                for k, t in (("value", value_n), ("attn", attn_n), ("residual", residual_n)):
                    norms[k].copy_(t.detach())

    def norm_sources(self, layers: list[int], local: bool) -> tuple[list[str], list[str], list[bool], list[Tensor | None]]:
        """Per recorded layer: its decoder layer's path, its output projection's name, Conv1D or not, and (locally)
        `reduce.value_factors` of the projection (computed once per backend; remotely the block computes them).

        The decoder layer is the attention module's parent: its input is the
        residual stream the layer's residual connection adds back.
        """
        blocks, projs, conv1d, factors = [], [], [], []
        for layer in layers:
            site = self.sites[layer]
            module = self.hf.get_submodule(site.path)
            found = output_projection(module)
            if found is None or "." not in site.path:
                raise UnsupportedModelError(
                    f"norms=True / heads='norm' need the output projection (one of {', '.join(PROJ_NAMES)}, nn.Linear or "
                    f"Conv1D) of {site.module_class} at {site.path} inside a decoder layer; this model has none"
                )
            blocks.append(site.path.rsplit(".", 1)[0])
            projs.append(found[0])
            conv1d.append(found[1])
            if local:
                factors.append(cached_factors(module, self.hf, getattr(module, found[0]).weight))
            else:
                factors.append(None)
        return blocks, projs, conv1d, factors

    @property
    def streams(self) -> bool:
        """Whether `record` can hand each layer to a `sink` during the forward: locally only."""
        return not self.remote

    def causal(self, layers: list[int]) -> bool:
        """Whether every one of `layers` is a causal attention module (its `is_causal` flag)."""
        return all(self.sites[layer].is_causal for layer in layers)

    # --- one generation that records -----------------------------------------------------------
    def generate_record(
        self, sequences: list[list[int]], max_new_tokens: int, *, layers: list[int], heads: str | Tensor,
        options: TraceOptions, sink: Callable[[int, Tensor, Tensor, list[int]], None] | None = None,
    ) -> tuple[list[list[int]], Float[Tensor, "batch layer head row key"] | None, dict[str, Tensor] | None]:
        """Greedy new tokens of one batch, its patterns and (`options.norms`) its norms, recorded inside the one
        `hf.generate` call.

        Step 0 of the generation (prefill) gives the prompt's rows; decode step j
        gives the row of new token j, its keys the KV cache's (the last K
        positions: a sliding-window cache keeps only the window).  The generation
        runs one token past `max_new_tokens`, so the last kept token's row is
        computed too.  Locally, end-of-sequence stopping is replaced by
        `StopAfterEOS` (stop once every example's EOS has been *fed*) and the rows
        are written into this process's tensor.  Remotely (NDIF, `remote="local"`)
        the block runs where the weights are: it allocates the tensor there at
        prefill, computes the value factors from the server's output projections,
        and makes exactly `max_new_tokens + 1` steps (a stopping criterion is an
        object of this process, so none travels; tokens past an EOS are cut here).
        The returned patterns are laid out as `record` lays out the prompt +
        completion (cut at EOS): the same [batch, layer, head_out, row, key]
        window, right-aligned.  Norms: the prompt's at prefill, each new token's
        (its value, residual input and attention output) at the decode step that feeds it.

        With `sink` (locally, `rows=None`, causal layers: `trace(..., out=DIR)`)
        nothing of the prompt's rows is kept: at prefill each layer is computed
        into one reused [batch, head, prompt row, prompt key] buffer and handed to
        `sink(layer_index, rows, query_positions, lengths)` (`AttentionWriter.write`'s
        arguments, in the buffer's own padding); only the new tokens' rows are held
        through the decode loop, and each layer's are handed over the same way once
        the completions are known (cut at EOS).  The patterns returned are then None.
        """
        B, N = len(sequences), max_new_tokens
        ids, mask = inputs.left_pad(sequences, self.pad_id)
        P = ids.shape[1]
        lengths = [len(s) for s in sequences]
        prompt_pos = [prompt_rows(options.rows, n, N) for n in lengths]  # prompt rows any final length may need
        pre_index = inputs.row_index(prompt_pos, lengths, P)  # [batch, R0] in generation columns
        R0 = pre_index.shape[1]
        head_out = self.num_heads if isinstance(heads, str) and heads == "all" else 1
        extra = ndif.trace_kwargs(self.nn_model, self.remote)  # {} locally; a checked RemoteBackend for NDIF
        elsewhere = bool(extra)  # a plain value: the block cannot carry `extra`
        L, H = len(layers), self.num_heads
        if sink is not None and (elsewhere or options.rows is not None):
            raise ValueError("only a local rows=None generation streams its prompt rows; this is an attnflow bug")
        kept = 0 if sink is not None else R0  # prompt rows held in `gen` (streamed ones are not)
        gen_shape = (B, L, head_out, kept + N, P + N)  # every held row in generation coordinates
        gen = norms = layer_buf = None  # remotely both are made inside the block, where the model runs
        if not elsewhere:  # not zeroed as a whole: the prefill writes every prompt row's first P keys (a seq² block)
            gen = torch.empty(gen_shape, dtype=options.dtype)
            gen[..., :kept, P:] = 0
            gen[..., kept:, :] = 0
        if sink is not None:
            layer_buf = torch.zeros((B, head_out, R0, P), dtype=options.dtype)
        envoys = [self.nn_model.get(self.sites[layer].path) for layer in layers]
        ops = [self.sites[layer].op for layer in layers]
        causal = [self.sites[layer].is_causal for layer in layers]
        weights = [heads if isinstance(heads, str) else heads[i] for i in range(len(layers))]
        want = options.norms or (isinstance(heads, str) and heads == "norm")
        # plain lists only in the block: a remote server has no attnflow (only reduce.py travels)
        blocks, projs, conv1d, factors = self.norm_sources(layers, local=not elsewhere) if want else ([], [], [], [])
        layer_envoys = [self.nn_model.get(b) for b in blocks]
        record_norms = options.norms
        if record_norms and not elsewhere:  # generation columns, like gen's keys
            norms = {"value": torch.zeros((B, L, H, P + N)), "attn": torch.zeros((B, L, P + N)), "residual": torch.zeros((B, L, P + N))}
        prompt_mask = mask.to(self.device).float()  # [batch, P]
        decode_row = torch.zeros((B, 1), dtype=torch.long, device=self.device)
        pre_index = pre_index.to(self.device)
        budget, dtype = options.memory_budget, options.dtype
        run = dict(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **greedy(N + 1, self.pad_id))
        run["eos_token_id"] = None  # steps end at N + 1, or locally one step after the last EOS (`stop`)
        if elsewhere:
            start, how = self.nn_model.generate, extra
        else:
            stop = StopAfterEOS(self.eos_ids, P)
            start, how = self.nn_model.trace, dict(fn=self.hf.generate, stopping_criteria=StoppingCriteriaList([stop]))
        with warnings.catch_warnings(), ndif.translate_errors(extra):
            # the open `tracer.iter[:]` loop ends by asking for a step the generation never makes (by design)
            warnings.filterwarnings("ignore", message=".*was never reached.*")
            with start(**run, **how) as tracer:  # nnsight reads the block from this line
                for step in tracer.iter[0 : N + 1] if elsewhere else tracer.iter[:]:
                    for i in range(len(envoys)):
                        if want:
                            x = layer_envoys[i].input  # [batch, P or 1, hidden]
                            if factors[i] is None:  # remote: the projection's weights are where the block runs
                                factors[i] = reduce.value_factors(
                                    reduce.output_blocks(getattr(envoys[i], projs[i]).weight, H, conv1d[i])
                                )
                        args, kwargs = getattr(envoys[i].source, ops[i]).inputs
                        if gen is None:
                            gen = args[1].new_zeros(gen_shape, dtype=dtype)
                        if record_norms and norms is None:
                            value_n = args[1].new_zeros((B, L, H, P + N), dtype=torch.float32)
                            attn_n = args[1].new_zeros((B, L, P + N), dtype=torch.float32)
                            residual_n = args[1].new_zeros((B, L, P + N), dtype=torch.float32)
                            norms = {"value": value_n, "attn": attn_n, "residual": residual_n}
                        vn = None
                        if want:  # every key's value norm: the prompt's at prefill, the cache's at a decode step
                            vn = reduce.value_norms(reduce.bind(args, kwargs)["value"], factors[i])  # [batch, head, K]
                            if step == 0:
                                vn = vn * prompt_mask[:, None, :]
                        if step == 0:  # prefill: the prompt's rows
                            reduce.interface_pattern(
                                args, kwargs, row_index=pre_index, heads=weights[i], dtype=dtype, is_causal=causal[i],
                                out=gen[:, i, :, :R0, :P] if sink is None else layer_buf, memory_budget=budget,
                                value_norms=vn,
                            )
                            if sink is not None:
                                sink(i, layer_buf, pre_index, lengths)
                        else:  # decode step: the newest token's row over the cached keys
                            p = reduce.interface_pattern(
                                args, kwargs, row_index=decode_row, heads=weights[i], dtype=dtype, is_causal=causal[i],
                                value_norms=vn,
                            )  # [batch, head_out, 1, K]
                            gen[:, i, :, kept + step - 1, reduce.key_columns(p.shape[-1], P + step)] = p[:, :, 0]
                        if record_norms:
                            a = envoys[i].output
                            a = a[0] if isinstance(a, tuple) else a  # [batch, P or 1, hidden]
                            if step == 0:
                                norms["value"][:, i, :, :P] = vn
                                norms["residual"][:, i, :P] = reduce.position_norms(x) * prompt_mask
                                norms["attn"][:, i, :P] = reduce.position_norms(a) * prompt_mask
                            else:  # the newest key is the last one the cache has filled
                                col = P + step - 1
                                norms["value"][:, i, :, col] = vn[:, :, min(vn.shape[-1], P + step) - 1]
                                norms["residual"][:, i, col] = reduce.position_norms(x)[:, -1]
                                norms["attn"][:, i, col] = reduce.position_norms(a)[:, -1]
                if elsewhere:  # saved names come back; a dict of saved tensors would not
                    gen, out_ids = gen.save(), tracer.result.save()
                    if record_norms:
                        value_n, attn_n, residual_n = value_n.save(), attn_n.save(), residual_n.save()
        if elsewhere:
            gen, all_ids = gen.detach().cpu(), out_ids.detach().cpu()
            if record_norms:
                norms = {"value": value_n.detach().cpu(), "attn": attn_n.detach().cpu(), "residual": residual_n.detach().cpu()}
        else:
            all_ids = stop.ids
        new = all_ids[:, P : P + N].tolist()  # the token past N was only there to compute the last row
        steps = all_ids.shape[1] - P - 1
        norms = None if norms is None else assemble_norms(norms, new, sequences, self.eos_ids)
        if sink is not None:
            query_positions, window = new_token_rows(new, lengths, P, N, self.eos_ids, steps=steps)
            for i in range(L):
                sink(i, gen[:, i], query_positions, window)
            return new, None, norms
        return new, assemble(gen, new, sequences, prompt_pos, options.rows, self.eos_ids, steps=steps), norms


_FACTORS: dict[int, tuple[weakref.ref, int, Tensor]] = {}  # id(weight) -> (the weight, its version, factors)


def cached_factors(module: torch.nn.Module, hf: torch.nn.Module, weight: Tensor) -> Tensor:
    """`reduce.value_factors` of an attention module's output projection, computed once per weight tensor.

    Keyed by the weight itself (a weak reference: an id reused by a new tensor
    misses) and its in-place version counter, so a changed weight is never served
    stale factors.
    """
    hit = _FACTORS.get(id(weight))
    if hit is not None and hit[0]() is weight and hit[1] == weight._version:
        return hit[2]
    factors = reduce.value_factors(o_proj_blocks(module, hf)).to(weight.device)
    key = id(weight)
    _FACTORS[key] = (weakref.ref(weight, lambda _, key=key: _FACTORS.pop(key, None)), weight._version, factors)
    return factors


class StopAfterEOS(StoppingCriteria):
    """Stop an example once an EOS is among its new tokens *before* the newest one (so that EOS's row was computed).

    Also keeps the ids of every step: `ids` is [batch, prompt + new] after the generation.
    """

    def __init__(self, eos_ids: set[int], prompt_len: int):
        self.eos = sorted(eos_ids)
        self.prompt_len = prompt_len
        self.ids: Tensor | None = None

    def __call__(self, input_ids: Tensor, scores: Tensor, **kwargs: Any) -> Tensor:
        self.ids = input_ids
        fed = input_ids[:, self.prompt_len : -1]  # new tokens the model has already read
        if not self.eos or fed.shape[1] == 0:
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        return torch.isin(fed, torch.tensor(self.eos, device=input_ids.device)).any(-1)


def prompt_rows(rows: Any, prompt_len: int, max_new_tokens: int) -> list[int]:
    """Prompt positions whose rows a final length of prompt_len + 1 .. prompt_len + max_new_tokens may need.

        >>> prompt_rows(None, 3, 2), prompt_rows("last", 3, 2), prompt_rows("completion", 3, 2), prompt_rows((0, -4), 3, 2)
        ([0, 1, 2], [], [2], [0, 1])
    """
    if rows is None:
        return list(range(prompt_len))
    if rows == "last":
        return []  # the last row is a new token's: at least one is generated
    if rows == "completion":
        return [prompt_len - 1]
    lengths = range(prompt_len + 1, prompt_len + max_new_tokens + 1)
    return sorted({r % n for r in rows for n in lengths if -n <= r < n and r % n < prompt_len})


def new_token_rows(
    new: list[list[int]], prompt_lengths: list[int], P: int, N: int, eos_ids: set[int], *, steps: int
) -> tuple[Tensor, list[int]]:
    """Where the N rows held for the new tokens of a generation (row j: new token j) sit, for `AttentionWriter.write`.

    The rows' keys are generation columns: example b left-padded to the longest
    prompt P, then N new tokens' columns.  Returns each row's padded position (-1: a
    row past the example's EOS, or a step the generation never made: `new` is
    shorter than N when every example stopped early) and the window lengths the
    writer reads its padding from (prompt + N).

        >>> new_token_rows([[7, 2, 7], [7, 7, 7]], [2, 3], 3, 3, {2}, steps=3)   # example 0 stops at EOS 2
        (tensor([[ 3,  4, -1],
                [ 3,  4,  5]]), [5, 6])
        >>> new_token_rows([[2], [2]], [2, 3], 3, 3, {2}, steps=1)[0]          # both stop at once: one step made
        tensor([[ 3, -1, -1],
                [ 3, -1, -1]])
    """
    from attnflow.tracers.driver import cut_at_eos

    kept = [len(cut_at_eos(n, eos_ids)) for n in new]
    if max(kept, default=0) > steps:
        raise RuntimeError("the generation stopped before the last kept token was read; this is an attnflow bug")
    query_positions = torch.full((len(new), N), -1, dtype=torch.long)
    for b, m in enumerate(kept):
        query_positions[b, :m] = torch.arange(P, P + m)
    return query_positions, [p + N for p in prompt_lengths]


def assemble(
    gen: Float[Tensor, "batch layer head gen_row gen_key"], new: list[list[int]], prompts: list[list[int]],
    prompt_pos: list[list[int]], rows: Any, eos_ids: set[int], *, steps: int,
) -> Float[Tensor, "batch layer head row key"]:
    """The rows recorded in generation coordinates -> `record`'s layout of prompt + completion (cut at EOS).

    `gen` holds each example's prompt rows (`prompt_pos`, right-aligned) then one
    row per decode step; its keys are generation columns (prompts left-padded to
    the longest, then the new tokens).  `steps` decode steps ran.
    """
    from attnflow.tracers.driver import cut_at_eos

    P = max(len(p) for p in prompts)
    R0 = max((len(p) for p in prompt_pos), default=0)
    full = [list(p) + cut_at_eos(n, eos_ids) for p, n in zip(prompts, new)]
    lengths, plens = [len(f) for f in full], [len(p) for p in prompts]
    if max(n - p for n, p in zip(lengths, plens)) > steps:
        raise RuntimeError("the generation stopped before the last kept token was read; this is an attnflow bug")
    positions = inputs.row_positions(rows, lengths, plens)
    R, S = max(len(p) for p in positions), max(lengths)
    sources = []
    for b, (pos, p) in enumerate(zip(positions, plens)):
        slot = {t: R0 - len(prompt_pos[b]) + k for k, t in enumerate(prompt_pos[b])}  # prompt position -> gen row
        sources.append([slot[t] if t < p else R0 + t - p for t in pos])
    if len(prompts) == 1 and sources[0] == list(range(gen.shape[3])) and (R, S) == (gen.shape[3], gen.shape[4]):
        return gen  # one example, nothing cut: the layout is already record's (no copy of a seq² tensor)
    out = gen.new_zeros((gen.shape[0], *gen.shape[1:3], R, S))
    for b, (src, n, p) in enumerate(zip(sources, lengths, plens)):
        pad = P - p  # generation columns of example b start here
        contiguous = src == list(range(src[0], src[0] + len(src))) if src else False
        rows_b = slice(src[0], src[0] + len(src)) if contiguous else torch.tensor(src, dtype=torch.long)
        out[b, :, :, R - len(src) :, S - n :] = gen[b, :, :, rows_b, pad : pad + n]
    return out


def assemble_norms(
    gen: dict[str, Tensor], new: list[list[int]], prompts: list[list[int]], eos_ids: set[int]
) -> dict[str, Tensor]:
    """Norms in generation columns (prompts left-padded to the longest, then the new tokens) -> `record`'s layout of
    prompt + completion (cut at EOS), right-aligned on the last dim like the patterns' keys.

        >>> gen = {"attn": torch.tensor([[[0., 5., 7., 1.]], [[4., 6., 8., 9.]]])}   # batch layer (2 prompt + 2 new)
        >>> assemble_norms(gen, [[2, 9], [9, 9]], [[3], [3, 4]], eos_ids={2})["attn"]   # example 0 ends at EOS 2
        tensor([[[0., 0., 5., 7.]],
        <BLANKLINE>
                [[4., 6., 8., 9.]]])
    """
    from attnflow.tracers.driver import cut_at_eos

    P = max(len(p) for p in prompts)
    lengths = [len(p) + len(cut_at_eos(n, eos_ids)) for p, n in zip(prompts, new)]
    S = max(lengths)
    out = {}
    for name, t in gen.items():
        o = t.new_zeros((*t.shape[:-1], S))
        for b, (p, n) in enumerate(zip(prompts, lengths)):
            pad = P - len(p)
            o[b, ..., S - n :] = t[b, ..., pad : pad + n]
        out[name] = o
    return out
