"""The tracing parameters that are not data, in one frozen dataclass, checked once when it is made.

    >>> opts = TraceOptions(heads="mean", rows="last", layers=[0, -1], dtype="float32")
    >>> opts.dtype, opts.layers, opts.batch_size
    (torch.float32, (0, -1), 8)
    >>> TraceOptions(rows="first")
    Traceback (most recent call last):
    attnflow.errors.BadArgumentError: rows='first'; use None (all rows), 'last', 'completion' or a list of positions

`attnflow.trace(model, prompts, options=opts)` and `attnflow.trace(model, prompts,
heads="mean", ...)` are the same call; the CLI builds the same object.  What
needs the model (the range of `layers`, the shape of a head-weight tensor) is
checked by the driver, and what needs the data (`rows="completion"` without a
completion, spans) too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from attnflow._dtypes import dtype_name, storage_dtype
from attnflow.errors import BadArgumentError
from attnflow.tracers import inputs
from attnflow.tracers.remote import check_remote


@dataclass(frozen=True, eq=False)
class TraceOptions:
    """How to record: every `attnflow.trace` keyword but the model, the prompts and their data.

    max_new_tokens  generate this many tokens greedily and record prompt + completion
    heads           "all" | "mean" | "max" | "norm" | Tensor[layer, head] of non-negative weights (normalised
                    per layer).  "norm" sums the heads weighted by each key's value norm,
                    rownorm(Σ_h α^h_ij·‖W_O^h v^h_j‖) (Kobayashi et al. 2020; HF models only)
    layers          None (all), an index or a list of them, negatives from the end; stored sorted
    rows            None (every query row) | "last" | "completion" (rows prompt_length-1 .. length-2,
                    which produce the completion tokens) | list of positions (negatives from each end)
    dtype           storage dtype of the patterns, a torch dtype or its name (computed in float32, then cast)
    batch_size      prompts per forward pass
    remote          False | True (NDIF) | "local" (nnsight's round trip) | an http(s) host (HF models only)
    progress        show a tqdm bar
    memory_budget   bytes (or "512MiB", "2GiB") the in-trace float32 transient of one layer may take: rows are
                    computed and their heads reduced in query chunks that fit it (None: all rows at once)
    one_pass        with max_new_tokens, record while generating (HF models, locally or remotely): the prompt's
                    rows at prefill and each new token's row at its decode step, inside the one generation.  False,
                    or a TransformerLens model: generate, then one forward over prompt + completion.
                    Both give the same patterns (the KV cache holds the same keys)
    norms           also record, in the same forward, `AttentionTrace.norms` (float32, HF models, locally or
                    remote, with generation and any rows=): "value" [batch, layer, head, key] = ‖W_O^h v^h_j‖,
                    "attn" [batch, layer, query] = ‖attention output‖ and "residual" [batch, layer, query] =
                    ‖residual input of the layer‖ at every position; for heads="norm" and
                    `attnflow.flow.measured_rollout`

    Lists come back as tuples and `dtype` as a torch dtype; a head-weight tensor
    is copied, so changing the caller's tensor later changes nothing here.

        >>> TraceOptions(rows=-1, remote="https://ndif.example/").remote
        'https://ndif.example'
    """

    max_new_tokens: int | None = None
    heads: str | Tensor = "all"
    layers: int | Sequence[int] | None = None
    rows: str | int | Sequence[int] | None = None
    dtype: str | torch.dtype = torch.float16
    batch_size: int = 8
    remote: bool | str = False
    progress: bool = True
    memory_budget: int | str | None = "256MiB"
    one_pass: bool = True
    norms: bool = False

    def __post_init__(self):
        if self.max_new_tokens is not None:
            inputs.check_count("max_new_tokens", self.max_new_tokens)
        heads = inputs.head_mode(self.heads)
        layers = inputs.layer_list(self.layers)
        rows = inputs.check_rows(self.rows, has_completion=True)  # whether there is one is the data's business
        self._set(
            heads=heads if isinstance(heads, str) else heads.detach().clone(),
            layers=None if layers is None else tuple(layers),
            rows=tuple(rows) if isinstance(rows, list) else rows,
            dtype=storage_dtype(self.dtype),
            batch_size=inputs.check_count("batch_size", self.batch_size, minimum=1),
            remote=check_remote(self.remote),
            memory_budget=inputs.byte_count("memory_budget", self.memory_budget),
        )
        for name in ("progress", "one_pass", "norms"):
            if not isinstance(getattr(self, name), bool):
                raise BadArgumentError(f"{name}={getattr(self, name)!r}; use True or False")

    def _set(self, **values: Any) -> None:
        for name, value in values.items():
            object.__setattr__(self, name, value)  # frozen: normalised once, here

    def to_settings(
        self, *, layers: list[int], heads: str | Tensor, teacher_forced: bool, pad_token_id: int, backend: dict[str, Any]
    ) -> dict[str, Any]:
        """The JSON-serialisable `AttentionTrace.settings`, given what the driver resolved.

        `layers` are the recorded layer indices and `heads` the checked mode or
        the normalised weights of those layers; `backend` holds what only one
        backend knows (its name, a hook name, ...).

            >>> TraceOptions(heads="mean", rows=-1).to_settings(
            ...     layers=[0, 1], heads="mean", teacher_forced=False, pad_token_id=0, backend={"name": "nnsight"})
            {'heads': 'mean', 'head_weights': None, 'rows': [-1], 'layers': [0, 1], 'dtype': 'float16', \
'max_new_tokens': None, 'teacher_forced': False, 'pad_token_id': 0, 'remote': False, 'norms': False, \
'backend': {'name': 'nnsight'}}
        """
        return {
            "heads": inputs.head_label(heads),
            "head_weights": heads.tolist() if isinstance(heads, Tensor) else None,  # per recorded layer
            "rows": list(self.rows) if isinstance(self.rows, tuple) else self.rows,
            "layers": list(layers),
            "dtype": dtype_name(self.dtype),
            "max_new_tokens": self.max_new_tokens,
            "teacher_forced": teacher_forced,
            "pad_token_id": pad_token_id,
            "remote": self.remote,
            "norms": self.norms,
            "backend": backend,
        }
