"""Where a completion came from: each document's share and its top tokens, per example, as plain data.

`summarize` runs `af.attribute` twice on the rows that produce the completion
(or, without a completion, on the last row: the next token) and returns
JSON-ready dicts, the content of `attnflow trace`'s printout and of its `--json`.

    >>> s = summarize(tr, "rollout")[0]        # tr: the demo model on two documents, one generated token
    >>> s
    {'example': 0, 'method': 'rollout', 'targets': 'completion', 'completion': ' paris', 'completion_tokens': 1,
     'documents': [{'name': 'doc1', 'share': 0.305, 'rank': 1, 'start': 3, 'end': 8,
                    'top_tokens': [{'position': 6, 'text': ' paris', 'share': 0.180},
                                   {'position': 5, 'text': ' in', 'share': 0.062},
                                   {'position': 3, 'text': ' alice', 'share': 0.034}]},
                   {'name': 'doc2', 'share': 0.118, 'rank': 2, 'start': 10, 'end': 15,
                    'top_tokens': [{'position': 13, 'text': ' cat', 'share': 0.038},
                                   {'position': 10, 'text': ' bob', 'share': 0.026},
                                   {'position': 11, 'text': ' owns', 'share': 0.022}]}],
     'other_share': 0.577,
     'top_tokens': [{'position': 6, 'text': ' paris', 'share': 0.180},
                    {'position': 0, 'text': '<s>', 'share': 0.140},
                    {'position': 25, 'text': ' :', 'share': 0.074}]}
    >>> round(sum(d["share"] for d in s["documents"]) + s["other_share"], 6)
    1.0

A share is the document's part of the composed row, averaged over the target rows;
`other_share` is the rest (question, template, completion tokens), so the
documents' shares and `other_share` sum to 1.  On deep models rollout and flow pour
nearly everything into the first token (the attention sink): pass `exclude_keys=(0,)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from attnflow.attention_trace import AttentionTrace


def summarize(
    trace: AttentionTrace, method: str = "rollout", top: int = 3, exclude_keys: Sequence[int] = ()
) -> list[dict[str, Any]]:
    """One dict per example: the completion's display text, document shares (best first) and top source tokens.

    method        an `af.attribute` method (rollout, flow, flow_normalized, sum, raw)
    top           how many source tokens to list, overall and per document
    exclude_keys  key positions zeroed before composing (e.g. `(0,)`, the attention sink), as in `af.attribute`
    """
    import attnflow as af

    has_completion = all(p < n for p, n in zip(trace.prompt_lengths, trace.lengths))
    targets = "completion" if has_completion else "last"
    tokens = af.attribute(trace, method=method, sources="tokens", targets=targets, exclude_keys=exclude_keys).to_pydict()
    has_docs = any(s.kind == "document" for ex in trace.spans for s in ex)
    docs = af.attribute(trace, method=method, span_kind="document", targets=targets, exclude_keys=exclude_keys).to_pydict() if has_docs else None
    out = []
    for b in range(trace.batch_size):
        display = trace.display(b)
        p, n = trace.prompt_lengths[b], trace.lengths[b]
        token_share = {t: s for e, t, s in zip(tokens["example"], tokens["source_token"], tokens["score"]) if e == b}
        ranked = sorted(token_share, key=lambda t: (-token_share[t], t))
        documents = []
        if docs is not None:
            for e, i, s, r in zip(docs["example"], docs["source_span"], docs["score"], docs["rank"]):
                if e != b:
                    continue
                span = trace.spans[b][i]
                inside = [t for t in ranked if span.start <= t < span.end][:top]
                documents.append(
                    {"name": span.name, "share": s, "rank": r, "start": span.start, "end": span.end,
                     "top_tokens": [_token(t, display, token_share) for t in inside]}
                )  # fmt: skip
        documents.sort(key=lambda d: d["rank"])
        out.append(
            {
                "example": b,
                "method": method,
                "targets": targets,
                "completion": completion_text(trace, b),
                "completion_tokens": n - p,
                "documents": documents,
                "other_share": max(0.0, 1.0 - sum(d["share"] for d in documents)),
                "top_tokens": [_token(t, display, token_share) for t in ranked[:top]],
            }
        )
    return out


def completion_text(trace: AttentionTrace, example: int) -> str:
    """The display text of example `example`'s completion (empty without one).

        >>> completion_text(tr, 0)            # tr: one generated token
        ' paris'
    """
    p, n = trace.prompt_lengths[example], trace.lengths[example]
    return "".join(trace.display(example)[p:n])


def _token(position: int, display: list[str], share: dict[int, float]) -> dict[str, Any]:
    return {"position": position, "text": display[position], "share": share[position]}


__all__ = ["completion_text", "summarize"]
