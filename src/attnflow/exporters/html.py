"""Offline HTML viewer: `index.html` plus attention shards loaded on demand.

`to_html` writes

    out/index.html        the page: tokens, spans, settings and the shard index as inline JSON
    out/viewer.js         the viewer (plain JavaScript written for attnflow)
    out/viewer.css
    out/shards/*.js       one example x layer x group of <= 8 heads each, split further
                          (smaller head groups, then query-row chunks) to stay under shard_bytes,
                          and per example the layer x head thumbnails (`e{b}-thumbs-*.js`)

Browsers block `fetch` on file://, so each shard is a script that calls the
global `attnflowShard(header, data, scales)`; the page adds a `<script src>` for
a shard the first time a view needs it.  Only the causal prefix of each recorded
row over real positions is stored: row q of an example holds keys 0..q.  Values
are quantised per row: uint8 codes `round(w / max(row) * 255)` (or float16 of
`w / max(row)` with precision="float16") plus one float32 scale per row, all
base85-encoded (`b85`: 5 characters per 4 bytes), so a uint8 value costs 5/4 bytes.

    >>> to_html(tr, "view/")                          # then open view/index.html
    PosixPath('view')
    >>> sorted(p.name for p in Path("view").iterdir())
    ['index.html', 'shards', 'thumbs', 'viewer.css', 'viewer.js']
    >>> scores = af.attribute(tr, method="rollout")
    >>> to_html(tr, "view/", flow={"rollout": af.flow.rollout(tr.patterns)}, attributions=scores, overwrite=True)
    PosixPath('view')
    >>> R = af.attribution.flow_rows(tr, "rollout", exclude_keys=(0,))   # [batch, query, key]
    >>> to_html(tr, "view/", flow={"rollout": R}, flow_info={"rollout": {"alpha": 0.5, "exclude_keys": [0]}},
    ...         gold={0: ["doc1"]}, examples=[{"question": "what is the city of alice ?", "answer": "paris", "correct": True}],
    ...         overwrite=True)
    PosixPath('view')

What each panel shows (the page says the same in words): Observer, hovering position p, shows
attention row p (what p attended to); Observed shows column p (who attended to p); Flow,
hovering token p, shows the composed row p-1, the row whose output produced token p.

Sinks.  Per example, `sinks` lists the keys that take more than SINK_SHARE of the head- and
layer-averaged attention in more than half of the recorded rows, plus position 0 when it is a
special token.  When there are any, the viewer leaves them out of the colour scale by default
(a checkbox turns it off) and says so on screen.
"""

from __future__ import annotations

import html as _html
import json
import math
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from functools import partial
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from attnflow import _checks, _io
from attnflow._version import __version__
from attnflow.attention_trace import AttentionTrace
from attnflow.codec import FlowArg, attribution_table, dtype_name, flow_rows, is_causal, pack, row_widths
from attnflow.errors import BadArgumentError, DataError

MAX_GROUP = 8  # heads per shard before splitting
HEADER_BYTES = 400  # generous bound on a shard's JS wrapper and JSON header
INLINE_LIMIT = 4 * 2**20  # bytes of encoded weights `inline_html` embeds at most
PRECISIONS = {"uint8": 1, "float16": 2}
CSP = (
    "default-src 'none'; script-src 'self' file:; style-src 'self' file:; "
    "img-src 'none'; connect-src 'none'; base-uri 'none'; form-action 'none'"
)
INLINE_CSP = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'"
SINK_SHARE = 0.3  # a key is a sink when it takes more than this share of most rows
THUMB = 48  # thumbnail side (query x key cells) in the layer x head grid
INLINE_FLOW_ROWS = 64  # `inline_html` composes rollout for at most this many completion rows
COMPLETION_ROWS = 64  # rows per example that `flow=[method, ...]` composes (the last completion tokens')
MAXFLOW_ROWS = 16  # the same for maxflow, whose rows cost ~n^3 each
MAXFLOW_TOKENS = 256  # longest example `flow=["maxflow"]` accepts: ~4.4 s per row on 30 layers (bench/maxflow.py)
SPECIAL = re.compile(r"^(<\|[^|]*\|>|</?s>|<unk>|<pad>|\[[A-Z]+\])$")  # the viewer's isSpecial
PATHLIKE = re.compile(r"^([A-Za-z]:[\\/]|[\\/]|~|\.{1,2}[\\/])")
# RFC 1924's base85 digits with & < > ` swapped for . , : ] so that the text needs no escaping
# in a JS string, in HTML or in _json (viewer.js has the same string)
B85 = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz!#$%.()*+-;,=:?@^_]{|}~"
_B85_TABLE = B85 + bytes(256 - len(B85))  # digit value -> its character, for bytes.translate


# ------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------
def to_html(
    trace: AttentionTrace,
    path: str | Path,
    shard_bytes: int = 8 * 2**20,
    flow: FlowArg | Sequence[str] | None = None,
    attributions: Any = None,
    precision: str = "uint8",
    progress: bool = False,
    *,
    flow_info: dict[str, dict] | None = None,
    gold: dict[int, list[str | int]] | None = None,
    examples: list[dict] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write an offline, sharded viewer of `trace` in the new folder `path`; open `path/index.html`.

    An existing folder is replaced (whole, readers see the old view or the new one) only if
    `to_html` wrote it and `overwrite=True`; a file, or a folder of anything else, is never touched.

    `flow` and `attributions` follow `to_parquet`: a dict method -> Tensor [batch, query, key]
    (or (Tensor [batch, rows, key], query positions [batch, rows])), and the table
    `attnflow.attribute` returns.  `flow` may instead name methods (`flow=["rollout", "maxflow"]`):
    `completion_flow` composes them here for the rows that produced each example's completion
    tokens, and the viewer's flow selector offers each.  Every shard file is at most `shard_bytes`
    long; index.html grows with the number of tokens only.  `progress=True` shows a progress bar
    over the shards.

    `flow_info` records how each flow was made (e.g. `{"rollout": {"alpha": 0.5, "exclude_keys": [0]}}`);
    the page shows it in its settings block.  `gold` marks supporting spans per example, by span
    name or index (`{0: ["Document 2"]}`): the viewer outlines them and adds a legend.  `examples`
    gives one dict per example, shown in the example picker: `question`, `answer` and `correct`
    (True/False) are read; any other JSON value is listed in the settings block.

    >>> to_html(tr, "view/", shard_bytes=2**20, gold={0: ["doc2"]})
    PosixPath('view')
    >>> to_html(tr, "maxflow-view/", flow=["rollout", "maxflow"])   # Abnar & Zuidema's attention flow too
    PosixPath('maxflow-view')
    >>> to_html(tr, "view/")
    Traceback (most recent call last):
    attnflow.errors.DataError: view already holds an attnflow html; pass overwrite=True (CLI: --overwrite) to replace it
    """
    _checks.instance("trace", trace, AttentionTrace, "an attnflow.AttentionTrace (af.trace or AttentionTrace.load)")
    path = _checks.path("path", path)
    _check(shard_bytes, precision)
    progress = _checks.flag("progress", progress)
    flow, flow_info = _named_flow(trace, flow, flow_info)
    meta, jobs = build(trace, shard_bytes, flow, attributions, precision, flow_info, gold, examples)
    thumbs = meta.pop("_thumb_jobs")
    with _io.output_dir(path, "html", overwrite=overwrite) as tmp:
        for job in tqdm(jobs + thumbs, desc="attnflow: shards", unit="shard", disable=not progress, leave=False):
            shard = job()
            text = shard.text
            if len(text) > shard_bytes:  # plan() bounds every shard; this would be a bug
                raise AssertionError(f"shard {shard.file} has {len(text)} bytes > shard_bytes={shard_bytes}")
            _io.write_text(tmp / shard.file, text)
        for name in ("viewer.js", "viewer.css"):
            _io.write_text(tmp / name, _static(name))
        _io.write_text(tmp / "index.html", page(meta))
    return path


def inline_html(
    trace: AttentionTrace,
    flow: FlowArg | Sequence[str] | str | None = "auto",
    attributions: Any = None,
    *,
    flow_info: dict[str, dict] | None = None,
    gold: dict[int, list[str | int]] | None = None,
    examples: list[dict] | None = None,
) -> str:
    """One self-contained view (an iframe with everything inline) for Jupyter, or a short refusal.

    `flow="auto"` (what `trace._repr_html_` uses) composes rollout (alpha 0.5, heads averaged,
    no keys excluded) for the rows that produced the completion tokens, at most INLINE_FLOW_ROWS
    of them, when every row was recorded; `flow=None` leaves the Flow view out; a dict or a list
    of method names is used as in `to_html`.  Traces whose encoded weights exceed INLINE_LIMIT bytes get a
    message pointing to `to_html`.  A saved notebook opened untrusted shows a line of text in
    place of the view, saying how to render it again.

    >>> tr                     # in a notebook: shows the viewer inline, with rollout for the answer
    AttentionTrace(batch=1, layers=[0, 1, 2, 3], heads='all', patterns=(1, 4, 8, 27, 27) float16, model='...')
    >>> af.exporters.inline_html(tr, flow=None)[:31]
    '<iframe class="attnflow-inline"'
    """
    values = _stored_values(trace)
    if _b85_len(values) > INLINE_LIMIT:
        mb = _b85_len(values) / 2**20
        return (
            '<div class="attnflow-too-large" style="font-family:sans-serif;padding:4px">'
            f"attnflow: this trace is too large to show inline ({mb:.1f} MiB of attention, limit "
            f"{INLINE_LIMIT / 2**20:.0f} MiB). Write it with <code>attnflow.exporters.to_html(trace, 'view/')</code> "
            "and open <code>view/index.html</code>, or select fewer layers, rows or heads.</div>"
        )
    if isinstance(flow, str):
        if flow != "auto":
            raise BadArgumentError(f"flow={flow!r}; use 'auto', None or a dict method -> Tensor")
        flow, auto_info = default_flow(trace)
        flow_info = {**auto_info, **(flow_info or {})}
    flow, flow_info = _named_flow(trace, flow, flow_info)
    meta, jobs = build(trace, 2**62, flow, attributions, "uint8", flow_info, gold, examples)
    meta["inline"] = {s.header["id"]: [s.header, s.data, s.scales] for s in (job() for job in jobs)}
    meta["inline_thumbs"] = {s.header["id"]: [s.header, s.data, s.scales] for s in (job() for job in meta.pop("_thumb_jobs"))}
    doc = page(meta, inline=True)
    fallback = (
        "attnflow viewer: not rendered. This output was saved or the notebook is not trusted; run the cell "
        "again (or trust the notebook), or write a standalone viewer with attnflow.exporters.to_html(trace, 'view/')."
    )
    # An untrusted or saved notebook strips the iframe but keeps the text inside it (an iframe's
    # content is never shown where iframes work), so the text is the fallback.
    return (
        '<iframe class="attnflow-inline" style="width:100%;height:640px;border:1px solid #ccc;resize:vertical" '
        f'srcdoc="{_html.escape(doc, quote=True)}">{fallback}</iframe>'
    )


# ------------------------------------------------------------------------------------
# shards
# ------------------------------------------------------------------------------------
@dataclass
class Shard:
    header: dict
    data: str  # b85 of the values
    scales: str  # b85 of float32 row scales

    @property
    def file(self) -> str:
        folder = "thumbs" if self.header["kind"] == "thumb" else "shards"
        return f"{folder}/{self.header['id']}.js"

    @property
    def text(self) -> str:
        return f'attnflowShard({_json(self.header)},"{self.data}","{self.scales}");\n'


def plan(
    widths: list[int], n_heads: int, shard_bytes: int, value_bytes: int, header_bytes: int = HEADER_BYTES
) -> list[tuple[int, int, int, int]]:
    """Split (heads, rows) into (h0, h1, r0, r1) blocks whose shard file fits in `shard_bytes`.

    Groups of <= 8 heads first; halve the group while a block is too large; with one head,
    cut the rows into consecutive chunks.

    >>> plan([1, 2, 3, 4], n_heads=2, shard_bytes=10**6, value_bytes=1)
    [(0, 2, 0, 4)]
    >>> plan([1, 2, 3, 4], n_heads=2, shard_bytes=HEADER_BYTES + 40, value_bytes=1)  # one head each
    [(0, 1, 0, 4), (1, 2, 0, 4)]
    >>> plan([1, 2, 3, 4], n_heads=1, shard_bytes=HEADER_BYTES + 16, value_bytes=1)  # then row chunks
    [(0, 1, 0, 2), (0, 1, 2, 3), (0, 1, 3, 4)]
    """

    def size(g: int, values: int, rows: int) -> int:
        return header_bytes + _b85_len(g * values * value_bytes) + _b85_len(g * rows * 4)

    g = min(MAX_GROUP, n_heads)
    while g > 1 and size(g, sum(widths), len(widths)) > shard_bytes:
        g = (g + 1) // 2
    groups = [(h, min(h + g, n_heads)) for h in range(0, n_heads, g)]
    if size(g, sum(widths), len(widths)) <= shard_bytes:
        return [(h0, h1, 0, len(widths)) for h0, h1 in groups]
    chunks, r0, values = [], 0, 0
    for r, w in enumerate(widths):
        if size(1, w, 1) > shard_bytes:
            raise BadArgumentError(f"shard_bytes={shard_bytes} cannot hold one row of {w} keys; use at least {size(1, w, 1)}")
        if r > r0 and size(1, values + w, r - r0 + 1) > shard_bytes:
            chunks.append((r0, r))
            r0, values = r, 0
        values += w
    chunks.append((r0, len(widths)))
    return [(h0, h1, a, b) for h0, h1 in groups for a, b in chunks]


def encode(
    rows: Float[Tensor, "head row key"], widths: Tensor, precision: str
) -> tuple[bytes, bytes]:
    """Quantise each row's prefix `rows[h, r, :widths[r]]` against its max; (values, float32 scales).

    Keys past a row's width must be zero (causal rows, or rows built so), so the max runs over
    the whole row.  uint8 codes are `round(w / max * 255)`; float16 values are `w / max`.

    >>> encode(torch.tensor([[[1.0, 0.0], [0.25, 0.5]]]), torch.tensor([1, 2]), "uint8")
    (b'\\xff\\x80\\xff', b'\\x00\\x00\\x80?\\x00\\x00\\x00?')
    """
    values = pack(rows, torch.zeros_like(widths), widths).float()  # [head, stored]: row prefixes in turn
    scales = rows.amax(-1).float().clamp(min=0)  # [head, row]
    row_of = torch.repeat_interleave(torch.arange(rows.shape[1]), widths)  # [stored]
    inv = 1 / scales.clamp(min=torch.finfo(torch.float32).tiny)
    if precision == "uint8":
        codes = values.mul_((inv * 255)[:, row_of]).clamp_(0, 255).add_(0.5).to(torch.uint8)  # add + truncate = round
    else:
        codes = values.mul_(inv[:, row_of]).clamp_(0, 1).to(torch.float16)
    return _le_bytes(codes), _le_bytes(scales)


def build(
    trace: AttentionTrace, shard_bytes: int, flow, attributions, precision: str,
    flow_info: dict | None = None, gold: dict | None = None, examples: list | None = None,
) -> tuple[dict, list[Callable[[], Shard]]]:
    """The page's JSON metadata (with the list of shards) and one deferred encoder per shard.

    Flow and attributions are validated here, before anything is written; shards are
    encoded one at a time, when called, so memory stays at one block.  Thumbnails and sinks
    take one pass over each example's layers; their encoders are in `meta["_thumb_jobs"]`.
    """
    causal = is_causal(trace.patterns, trace.query_positions)
    meta = metadata(trace, causal, precision)
    _annotate(meta, trace, flow_info, gold, examples)
    value_bytes = PRECISIONS[precision]
    jobs: list[Callable[[], Shard]] = []
    for b, ex in enumerate(meta["examples"]):
        pad = trace.pad_offsets[b]
        rows = torch.nonzero(trace.query_positions[b] >= 0).squeeze(1)
        widths = row_widths(torch.tensor(ex["rows"], dtype=torch.long), ex["length"], causal)
        for h0, h1, r0, r1 in plan(widths.tolist(), trace.patterns.shape[2], shard_bytes, value_bytes):
            for li in range(len(trace.layers)):
                head = {"kind": "attn", "example": b, "layer": li, "heads": list(range(h0, h1)), "r0": r0, "r1": r1}
                block = (slice(h0, h1), rows[r0:r1], slice(pad, None))  # [head, row, key], unpadded
                jobs.append(partial(_shard, head, trace.patterns[b, li], block, widths[r0:r1], precision, f"l{li}"))
    if flow:
        flows = {m: flow_rows(trace, m, value) for m, value in flow.items()}  # all validated before any shard
        for b, ex in enumerate(meta["examples"]):
            ex["flow"] = {}
            for i, (m, (F_all, qpos, causal_m)) in enumerate(flows.items()):
                qs, F, widths = _example_flow(F_all, qpos, trace, b, causal_m)
                ex["flow"][m] = {"rows": qs.tolist(), "causal": bool((widths == qs + 1).all())}
                header_bytes = HEADER_BYTES + len(_json(m))  # the method's name is in the header
                for _, _, r0, r1 in plan(widths.tolist(), 1, shard_bytes, value_bytes, header_bytes):
                    head = {"kind": "flow", "example": b, "method": m, "heads": [0], "r0": r0, "r1": r1}
                    block = (None, slice(r0, r1))  # F[None, r0:r1]: one "head"
                    # the method's index names the file: its name may not suit a file name
                    jobs.append(partial(_shard, head, F, block, widths[r0:r1], precision, f"f{i}"))
        meta["flow_methods"] = list(flow)
    if attributions is not None:
        tab = attribution_table(attributions)
        if "source_span" in tab.column_names:  # the viewer charts spans; token scores show as the flow row
            cols = ["example", "method", "target", "source_span", "score", "rank"]
            meta["attributions"] = {c: tab[c].to_pylist() for c in cols}
    meta["shards"] = [_shard_entry(job.args[0], job.args[-1]) for job in jobs]
    thumb_jobs: list[Callable[[], Shard]] = []
    for b, ex in enumerate(meta["examples"]):
        grid, ex["sinks"] = summarise(trace, b)
        thumb_jobs += thumb_shards(b, grid, shard_bytes)
    meta["thumbs"] = [job().header for job in thumb_jobs]
    meta["_thumb_jobs"] = thumb_jobs
    return meta, jobs


def default_flow(trace: AttentionTrace) -> tuple[dict, dict]:
    """`inline_html`'s flow: rollout rows that produced the completion tokens (`({}, {})` when not computable).

    Needs every row recorded (rollout composes all of them) and at least one completion token.

    >>> flow, info = default_flow(tr); info["rollout"]["alpha"]
    0.5
    """
    from attnflow import flow as F

    S = trace.input_ids.shape[1]
    full = bool((trace.query_positions.shape[1] == S) and (trace.query_positions == torch.arange(S)).masked_fill(
        trace.attention_mask == 0, True).all())
    k = min(INLINE_FLOW_ROWS, max(n - p for n, p in zip(trace.lengths, trace.prompt_lengths)))
    if not full or k <= 0 or S < 2:
        return {}, {}
    rows = list(range(S - k - 1, S - 1))  # padded rows that produced the last k tokens
    R = F.rollout(trace.patterns, alpha=0.5, rows=rows, key_mask=trace.attention_mask)  # [batch, rows, key]
    qpos = torch.tensor(rows).expand(trace.batch_size, k).clone()
    qpos[qpos < torch.tensor(trace.pad_offsets).view(-1, 1)] = -1  # pad rows of shorter examples
    info = {"rollout": {"alpha": 0.5, "heads": "mean", "exclude_keys": [], "rows": f"the {k} rows that produced the last {k} tokens",
                        "made_by": "inline_html (default)"}}
    return {"rollout": (R, qpos)}, info


def completion_flow(trace: AttentionTrace, methods: Sequence[str]) -> tuple[dict, dict]:
    """(flow, flow_info) for `to_html`: each method composed (heads averaged, alpha 0.5, no keys excluded)
    for the rows that produced each example's completion tokens, the last COMPLETION_ROWS of them
    (MAXFLOW_ROWS for maxflow, whose examples may hold at most MAXFLOW_TOKENS tokens).

    The methods are `attnflow.flow.METHODS`: "flow" is the residual recurrence, "maxflow" the
    maximum flow through the attention graph (Abnar & Zuidema 2020).  They need a trace with every
    query row and layer recorded (`attnflow.attribution.target_flow` says so otherwise).

    >>> flow, info = completion_flow(tr, ["maxflow"])
    >>> R, q = flow["maxflow"]; R.shape, q.tolist()              # [batch, rows, key]: row 25 produced token 26, the answer
    (torch.Size([1, 1, 27]), [[25]])
    >>> R.sum(-1), info["maxflow"]["rows"]                        # shares: each row sums to 1
    (tensor([[1.0000]]), 'the rows that produced the last 16 completion tokens (or all of them)')
    """
    from attnflow.attribution import target_flow

    if isinstance(methods, str) or not all(isinstance(m, str) for m in methods):
        raise BadArgumentError(f"flow={methods!r}; name methods in a list, e.g. flow=['rollout', 'maxflow']")
    flow, info = {}, {}
    for m in dict.fromkeys(methods):
        k = MAXFLOW_ROWS if m == "maxflow" else COMPLETION_ROWS
        # token p is produced by row p - 1: the rows behind the last k completion tokens
        rows = [list(range(max(p, n - k, 1) - 1, n - 1)) for n, p in zip(trace.lengths, trace.prompt_lengths)]
        if not any(rows):
            raise BadArgumentError(f"flow=[{m!r}] composes the rows that produced the completion, and this trace has no "
                                   "completion tokens; pass flow={method: Tensor} with the rows you want instead")
        long = [b for b, r in enumerate(rows) if r and trace.lengths[b] > MAXFLOW_TOKENS]
        if m == "maxflow" and long:
            b = long[0]
            raise BadArgumentError(
                f"flow=['maxflow'] solves up to {MAXFLOW_TOKENS} tokens per example, and example {b} has {trace.lengths[b]} "
                f"(max flow costs ~n^3 per row: 4.4 s at 256 tokens, 35 s at 512 on 30 layers); compute the rows you need with "
                "af.attribution.target_flow(trace, rows, 'maxflow') and pass flow={'maxflow': (R, padded query positions)}"
            )
        R = target_flow(trace, [r or [trace.lengths[b] - 1] for b, r in enumerate(rows)], m)  # [batch, rows, key]
        q = torch.full(R.shape[:2], -1, dtype=torch.long)  # padded query positions; -1: a repeat, no row
        for b, r in enumerate(rows):
            q[b, : len(r)] = torch.tensor(r, dtype=torch.long) + trace.pad_offsets[b]
        flow[m] = (R, q)
        info[m] = {"alpha": 0.5, "heads": "mean", "exclude_keys": [],
                   "rows": f"the rows that produced the last {k} completion tokens (or all of them)",
                   "made_by": "to_html(flow=[...])"}
        if m == "maxflow":
            info[m]["what"] = "maximum flow through the layered attention graph (Abnar & Zuidema 2020), shares of each row"
        elif m == "flow":
            info[m]["what"] = "the residual recurrence X_l = A_l X_(l-1) + X_(l-1) (2^L x rollout on stochastic rows), not maxflow"
    return flow, info


def _named_flow(trace: AttentionTrace, flow, flow_info: dict | None) -> tuple[Any, dict | None]:
    """`flow` as a dict: a list of method names composed by `completion_flow`, its info under the caller's."""
    if flow is None or isinstance(flow, Mapping):
        return flow, flow_info
    flow, info = completion_flow(trace, flow)
    if flow_info is not None and not isinstance(flow_info, dict):
        return flow, flow_info  # _annotate says what is wrong
    return flow, {**info, **(flow_info or {})}


def summarise(trace: AttentionTrace, b: int) -> tuple[Tensor, list[int]]:
    """Example b's thumbnails (uint8 [layer, head, tq, tk]) and its sink keys, in one pass over the layers.

    A thumbnail is the [row, key] block average of a head's recorded rows, scaled to its max,
    square-rooted (faint structure stays visible) and quantised to 0..255.

    >>> grid, sinks = summarise(tr, 0); grid.shape, sinks        # 27 tokens < THUMB: one cell per row and key
    (torch.Size([4, 8, 27, 27]), [0])
    >>> grid.dtype, int(grid.max())
    (torch.uint8, 255)
    """
    pad = trace.pad_offsets[b]
    rows = torch.nonzero(trace.query_positions[b] >= 0).squeeze(1)
    L, H = trace.patterns.shape[1:3]
    R, N = len(rows), trace.lengths[b]
    tq, tk = min(THUMB, R), min(THUMB, N)
    share = torch.zeros(R, N)  # [row, key]: attention averaged over layers and heads
    grid = torch.zeros(L, H, tq, tk, dtype=torch.uint8)
    for li in range(L):
        A = trace.patterns[b, li][:, rows, pad:].float()  # [head, row, key]
        share += A.mean(0) / L
        pooled = torch.nn.functional.adaptive_avg_pool2d(A, (tq, tk))  # [head, tq, tk]
        top = pooled.flatten(1).amax(-1).clamp(min=1e-30).view(H, 1, 1)
        grid[li] = (pooled / top).sqrt().mul(255).add(0.5).clamp(0, 255).to(torch.uint8)
    heavy = ((share > SINK_SHARE).sum(0) * 2 > R).nonzero().squeeze(1).tolist() if R else []
    if N and SPECIAL.match(trace.tokens[b][0]) and 0 not in heavy:
        heavy = [0, *heavy]
    return grid, sorted(heavy)


def thumb_shards(b: int, grid: Tensor, shard_bytes: int) -> list[Callable[[], Shard]]:
    """Deferred encoders of example b's thumbnails, in layer chunks that fit `shard_bytes`."""
    L, H, tq, tk = grid.shape
    while tq * tk > 1 and HEADER_BYTES + _b85_len(H * tq * tk) > shard_bytes:  # even one layer is too big
        tq, tk = max(1, tq * 3 // 4), max(1, tk * 3 // 4)
        grid = _shrink(grid, tq, tk)
    per = max(1, (shard_bytes - HEADER_BYTES) * 4 // 5 // (H * tq * tk))
    out = []
    for l0 in range(0, L, per):
        l1 = min(L, l0 + per)
        header = {"id": f"e{b}-thumbs-l{l0}-{l1}", "kind": "thumb", "example": b, "l0": l0, "l1": l1,
                  "heads": H, "tq": tq, "tk": tk}
        data = grid[l0:l1].contiguous().numpy().tobytes()
        out.append(partial(Shard, header, b85(data), ""))
    return out


def _shrink(grid: Tensor, tq: int, tk: int) -> Tensor:
    L, H = grid.shape[:2]
    small = torch.nn.functional.adaptive_max_pool2d(grid.flatten(0, 1).float(), (tq, tk))
    return small.round().to(torch.uint8).view(L, H, tq, tk)


def metadata(trace: AttentionTrace, causal: bool, precision: str) -> dict:
    """What the page needs besides the weights: tokens (raw and display), spans and recorded rows (unpadded), settings."""
    examples = []
    text = getattr(trace, "text", None)  # display strings (attnflow.tokens), when the trace has them
    for b in range(trace.batch_size):
        pad = trace.pad_offsets[b]
        q = trace.query_positions[b]
        examples.append(
            {
                "tokens": list(trace.tokens[b]),
                "text": list(text[b]) if text is not None else None,
                "length": trace.lengths[b],
                "prompt_length": int(trace.prompt_lengths[b]),
                "rows": (q[q >= 0] - pad).tolist(),
                "spans": [
                    {"name": s.name, "kind": s.kind, "start": s.start, "end": s.end} for s in trace.spans[b]
                ] if b < len(trace.spans) else [],
            }
        )
    return {
        "attnflow_version": __version__,
        "title": title(trace.model_info),
        "model_info": trace.model_info,
        "settings": trace.settings,
        "layers": list(trace.layers),
        "heads": trace.heads,
        "num_heads": int(trace.patterns.shape[2]),
        "dtype": dtype_name(trace.patterns.dtype),
        "causal": causal,
        "precision": precision,
        "examples": examples,
        "flow_methods": [],
        "flow_info": {},
        "sink_share": SINK_SHARE,
        "partial_marker": "\u25cc",
    }


def title(model_info: dict) -> str:
    """The model's name for the page title: a file-system path shortened to its last part.

    >>> title({"name": "/usr/lib/python3/site-packages/attnflow/demo/model"}), title({"name": "/data/ckpt/run7"})
    ('attnflow/demo/model', 'run7')
    """
    name = str(model_info.get("name") or "attention")
    if PATHLIKE.match(name):
        parts = [p for p in re.split(r"[\\/]", name) if p]
        inside = [i for i, p in enumerate(parts) if p in ("site-packages", "dist-packages")]
        name = "/".join(parts[inside[-1] + 1 :]) if inside and inside[-1] + 1 < len(parts) else (parts[-1] if parts else name)
    return name


def _annotate(meta: dict, trace: AttentionTrace, flow_info, gold, examples) -> None:
    """Check and add `flow_info`, gold spans and per-example metadata (question, answer, correct)."""
    if flow_info is not None:
        if not isinstance(flow_info, dict) or not all(isinstance(v, dict) for v in flow_info.values()):
            raise BadArgumentError("flow_info must map a flow method to a dict, e.g. {'rollout': {'alpha': 0.5}}")
        meta["flow_info"] = _json_safe(flow_info, "flow_info")
    exs = meta["examples"]
    if examples is not None:
        if not isinstance(examples, (list, tuple)) or len(examples) != len(exs) or not all(isinstance(e, dict) for e in examples):
            raise BadArgumentError(f"examples must be a list of {len(exs)} dicts (one per example), e.g. "
                                   "[{'question': ..., 'answer': ..., 'correct': True}]")
        for ex, info in zip(exs, _json_safe(list(examples), "examples")):
            ex["info"] = info
    for b, names in (gold or {}).items():
        if not isinstance(b, int) or not 0 <= b < len(exs):
            raise BadArgumentError(f"gold has example {b!r}; use example indices 0..{len(exs) - 1}")
        spans = exs[b]["spans"]
        idx = []
        for n in names:
            hits = [i for i, sp in enumerate(spans) if sp["name"] == n] if isinstance(n, str) else [n]
            if not hits or not all(isinstance(i, int) and 0 <= i < len(spans) for i in hits):
                known = ", ".join(repr(sp["name"]) for sp in spans) or "none"
                raise BadArgumentError(f"gold[{b}] names span {n!r}, which example {b} lacks; its spans: {known}")
            idx += hits
        exs[b]["gold"] = sorted(set(idx))


def _json_safe(obj, what: str):
    try:
        return json.loads(json.dumps(obj, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise BadArgumentError(f"{what} must hold JSON values (str, number, bool, list, dict): {e}") from None


def _example_flow(F: Tensor, qpos: Tensor, trace: AttentionTrace, b: int, causal: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(query positions, rows [row, key] over unpadded keys, row widths) of example b's flow rows."""
    pad = trace.pad_offsets[b]
    real = qpos[b] >= 0
    qs = qpos[b][real] - pad
    return qs, F[b, real, pad:], row_widths(qs, trace.lengths[b], causal)


def _shard(header: dict, source: Tensor, block: tuple, widths: Tensor, precision: str, tag: str) -> Shard:
    """Encode `source[block]` ([head, row, key]) as one shard."""
    values, scales = encode(source[block].cpu(), widths, precision)
    header = {**_shard_entry(header, tag), "enc": precision}
    return Shard(header, b85(values), b85(scales))


def _shard_entry(header: dict, tag: str) -> dict:
    """The header with its id (and file name): e{example}-{tag}-h{first}-{last}-r{r0}-{r1}."""
    h = header
    return {"id": f"e{h['example']}-{tag}-h{h['heads'][0]}-{h['heads'][-1]}-r{h['r0']}-{h['r1']}", **h}


def _stored_values(trace: AttentionTrace) -> int:
    causal = is_causal(trace.patterns, trace.query_positions)
    total = 0
    for b in range(trace.batch_size):
        q = trace.query_positions[b]
        total += int(row_widths(q[q >= 0] - trace.pad_offsets[b], trace.lengths[b], causal).sum())
    return total * trace.patterns.shape[1] * trace.patterns.shape[2]


def _le_bytes(t: Tensor) -> bytes:
    a = t.contiguous().numpy()
    return a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()


def b85(data: bytes) -> str:
    """Base85 text of `data` (RFC 1924 digits, with & < > and backtick swapped for . , : ], see B85): each 4 bytes,
    read as a big-endian integer, become 5 digits; a last group of k < 4 bytes is zero-padded and
    keeps k + 1 digits, as `base64.b85encode` (pure Python, ~50x slower) does.

    >>> b85(b"attnflow"), b85(b"\\x00\\xff")
    ('VRUqEW^8YF', '0RI')
    >>> import base64
    >>> base64.b85decode(b85(bytes(range(256))).translate(str.maketrans(".,:]", "&<>`"))) == bytes(range(256))
    True
    """
    pad = -len(data) % 4
    q = np.frombuffer(data + bytes(pad), ">u4").astype(np.uint32)  # [group]
    digits = np.empty((len(q), 5), np.uint8)  # [group, digit], most significant first
    rest = np.empty_like(q)
    for j in range(4, -1, -1):
        np.floor_divide(q, np.uint32(85), out=rest)
        digits[:, j] = q - rest * np.uint32(85)  # q % 85, ~7x faster than numpy's % on uint32
        q, rest = rest, q
    return digits.tobytes()[: digits.size - pad].translate(_B85_TABLE).decode("ascii")


def _b85_len(n: int) -> int:
    return n + math.ceil(n / 4)


# ------------------------------------------------------------------------------------
# the page
# ------------------------------------------------------------------------------------
def page(meta: dict, inline: bool = False) -> str:
    """index.html: CSP, the viewer's static assets (linked, or inlined for Jupyter) and the data as JSON."""
    name = _html.escape(meta["title"])
    if inline:
        css = f"<style>{_static('viewer.css')}</style>"
        js = f"<script>{_script_safe(_static('viewer.js'))}</script>"
    else:
        css = '<link rel="stylesheet" href="viewer.css">'
        js = '<script src="viewer.js"></script>'
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{INLINE_CSP if inline else CSP}">
<title>attnflow: {name}</title>
{css}
</head>
<body>
<div id="app"><noscript>The attnflow viewer needs JavaScript.</noscript></div>
<script type="application/json" id="attnflow-data">{_json(meta)}</script>
{js}
</body>
</html>
"""


def _json(obj) -> str:
    """JSON safe inside a <script> element: `<`, `>`, `&`, U+2028/9 escaped (only strings hold them)."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text


def _script_safe(js: str) -> str:
    if "</script" in js.lower() or "<!--" in js:
        raise DataError("viewer.js holds '</script' or '<!--' and cannot be inlined")  # a packaging bug
    return js


def _static(name: str) -> str:
    return resources.files("attnflow.exporters").joinpath("static", name).read_text(encoding="utf-8")


def _check(shard_bytes: int, precision: str) -> None:
    if precision not in PRECISIONS:
        raise BadArgumentError(f"precision={precision!r}; use 'uint8' or 'float16'")
    if not isinstance(shard_bytes, int) or shard_bytes < 4096:
        raise BadArgumentError(f"shard_bytes={shard_bytes!r} is too small; use at least 4096 (default 8 MiB)")
