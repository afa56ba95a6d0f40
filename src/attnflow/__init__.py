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
    >>> R = af.flow.rollout(tr.patterns, alpha=0.5)  # [batch, query, key]
    >>> af.attribute(tr, method="flow", sources="tokens")
"""

__version__ = "0.1.0"

# `trace` the function is bound after `attnflow.trace` the module is imported, so
# `af.trace(...)` records while `from attnflow.attention_trace import AttentionTrace` still works.
from attnflow import errors, flow
from attnflow.attention_trace import AttentionTrace, Span
from attnflow.attribution import attribute
from attnflow.tracers import load, trace
from attnflow import exporters, demo

__all__ = [
    "AttentionTrace",
    "Span",
    "attribute",
    "demo",
    "errors",
    "exporters",
    "flow",
    "load",
    "trace",
    "__version__",
]
