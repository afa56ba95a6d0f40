"""attnflow: where did this token's information come from?

Record attention patterns from HuggingFace causal LMs (through nnsight, with the
fast attention kernel left on, locally or on NDIF) and from TransformerLens
models; compose them into attention rollout and residual-inclusive flow;
attribute generated tokens to prompt tokens and documents; export Parquet tables
and offline, sharded HTML views.

    >>> import attnflow as af
    >>> model = af.demo.load()                       # the embedded model organism
    >>> tr = af.trace(model, "doc1 : alice lives in paris . question : what is the city of alice ? answer :",
    ...               max_new_tokens=1)
    >>> tr.tokens[0][-4:]                            # the prompt's end and the generated token
    ['?', 'answer', ':', 'paris']
    >>> R = af.flow.rollout(tr.patterns, alpha=0.5)  # [batch, query, key]
    >>> R.shape
    torch.Size([1, 20, 20])
    >>> scores = af.attribute(tr, method="flow", sources="tokens")
    >>> top = scores.sort_by("rank")["source_token"].to_pylist()[:3]
    >>> [tr.tokens[0][i] for i in top]               # the BOS sink, then the document's answer word
    ['<s>', 'paris', 'in']

The public names are imported on first use (PEP 562), so `import attnflow` and
`attnflow --help` do not pay for torch.
"""

from __future__ import annotations

import importlib
import importlib.util

from attnflow._version import __version__

# the public functions and classes -> their modules; submodules (flow, demo, exporters, ...) import on access
_OBJECTS = {
    "AttentionTrace": "attnflow.attention_trace",
    "Span": "attnflow.attention_trace",
    "SavedTrace": "attnflow.attention_trace",
    "attribute": "attnflow.attribution",
    "load": "attnflow.tracers",
    "trace": "attnflow.tracers",
    "TraceOptions": "attnflow.tracers",
    "head_weights_from_o_proj": "attnflow.tracers.heads",
    "save_model": "attnflow.gguf",
    "serve": "attnflow.explorer",  # the function; the package is `attnflow.explorer`
}

__all__ = [
    "AttentionTrace",
    "SavedTrace",
    "Span",
    "TraceOptions",
    "attribute",
    "demo",
    "errors",
    "exporters",
    "flow",
    "head_weights_from_o_proj",
    "load",
    "save_model",
    "serve",
    "trace",
    "__version__",
]


def __getattr__(name: str):
    if name in _OBJECTS:
        value = getattr(importlib.import_module(_OBJECTS[name]), name)
    elif not name.startswith("__") and importlib.util.find_spec(f"attnflow.{name}"):
        value = importlib.import_module(f"attnflow.{name}")  # af.flow, af.demo, af.attribution, ...
    else:
        raise AttributeError(f"module 'attnflow' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
