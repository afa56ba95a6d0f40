"""Offline HTML viewer: `index.html` plus attention shards loaded on demand.

`to_html` writes

    out/index.html        the page: tokens, spans, settings and the shard index as inline JSON
    out/viewer.js         the viewer (plain JavaScript written for attnflow)
    out/viewer.css
    out/shards/*.js       one example x layer x group of <= 8 heads each, split further
                          (smaller head groups, then query-row chunks) to stay under shard_bytes

Browsers block `fetch` on file://, so each shard is a script that calls the
global `attnflowShard(header, data, scales)`; the page adds a `<script src>` for
a shard the first time a view needs it.  Only the causal prefix of each recorded
row over real positions is stored: row q of an example holds keys 0..q.  Values
are quantised per row: uint8 codes `round(w / max(row) * 255)` (or float16 of
`w / max(row)` with precision="float16") plus one float32 scale per row, all
base64-encoded, so a uint8 value costs 4/3 bytes.

    >>> to_html(tr, "view/")                          # then open view/index.html
    PosixPath('view')
    >>> to_html(tr, "view/", flow={"rollout": af.flow.rollout(tr.patterns)}, attributions=scores)
"""

from __future__ import annotations

import base64
import html as _html
import json
import math
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from functools import partial
from typing import Any, Callable

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from attnflow import _io
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


# ------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------
def to_html(
    trace: AttentionTrace,
    path: str | Path,
    shard_bytes: int = 8 * 2**20,
    flow: FlowArg | None = None,
    attributions: Any = None,
    precision: str = "uint8",
    progress: bool = False,
) -> Path:
    """Write an offline, sharded viewer of `trace` under `path` (replaced whole); open `path/index.html`.

    `flow` and `attributions` follow `to_parquet`: a dict method -> Tensor [batch, query, key]
    (or (Tensor [batch, rows, key], query positions [batch, rows])), and the table
    `attnflow.attribute` returns.  Every shard file is at most `shard_bytes` long; index.html
    grows with the number of tokens only.  `progress=True` shows a progress bar over the shards.

    >>> to_html(tr, "view/", shard_bytes=2**20)
    PosixPath('view')
    """
    path = Path(path)
    _check(shard_bytes, precision)
    meta, jobs = build(trace, shard_bytes, flow, attributions, precision)
    with _io.atomic_dir(path) as tmp:
        for job in tqdm(jobs, desc="attnflow: shards", unit="shard", disable=not progress, leave=False):
            shard = job()
            text = shard.text
            if len(text) > shard_bytes:  # plan() bounds every shard; this would be a bug
                raise AssertionError(f"shard {shard.file} has {len(text)} bytes > shard_bytes={shard_bytes}")
            _io.write_text(tmp / shard.file, text)
        for name in ("viewer.js", "viewer.css"):
            _io.write_text(tmp / name, _static(name))
        _io.write_text(tmp / "index.html", page(meta))
    return path


def inline_html(trace: AttentionTrace, flow: FlowArg | None = None, attributions: Any = None) -> str:
    """One self-contained view (an iframe with everything inline) for Jupyter, or a short refusal.

    Traces whose encoded weights exceed INLINE_LIMIT bytes get a message pointing to `to_html`.

    >>> tr                     # in a notebook: shows the viewer inline
    """
    values = _stored_values(trace)
    if values > INLINE_LIMIT * 3 // 4:
        mb = values * 4 / 3 / 2**20
        return (
            '<div class="attnflow-too-large" style="font-family:sans-serif;padding:4px">'
            f"attnflow: this trace is too large to show inline ({mb:.1f} MiB of attention, limit "
            f"{INLINE_LIMIT / 2**20:.0f} MiB). Write it with <code>attnflow.exporters.to_html(trace, 'view/')</code> "
            "and open <code>view/index.html</code>, or select fewer layers, rows or heads.</div>"
        )
    meta, jobs = build(trace, 2**62, flow, attributions, "uint8")
    meta["inline"] = {s.header["id"]: [s.header, s.data, s.scales] for s in (job() for job in jobs)}
    doc = page(meta, inline=True)
    return (
        '<iframe class="attnflow-inline" style="width:100%;height:560px;border:1px solid #ccc;resize:vertical" '
        f'srcdoc="{_html.escape(doc, quote=True)}"></iframe>'
    )


# ------------------------------------------------------------------------------------
# shards
# ------------------------------------------------------------------------------------
@dataclass
class Shard:
    header: dict
    data: str  # base64 of the values
    scales: str  # base64 of float32 row scales

    @property
    def file(self) -> str:
        return f"shards/{self.header['id']}.js"

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
    >>> plan([1, 2, 3, 4], n_heads=1, shard_bytes=HEADER_BYTES + 20, value_bytes=1)  # then row chunks
    [(0, 1, 0, 2), (0, 1, 2, 3), (0, 1, 3, 4)]
    """

    def size(g: int, values: int, rows: int) -> int:
        return header_bytes + _b64_len(g * values * value_bytes) + _b64_len(g * rows * 4)

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
    trace: AttentionTrace, shard_bytes: int, flow, attributions, precision: str
) -> tuple[dict, list[Callable[[], Shard]]]:
    """The page's JSON metadata (with the list of shards) and one deferred encoder per shard.

    Flow and attributions are validated here, before anything is written; shards are
    encoded one at a time, when called, so memory stays at one block.
    """
    causal = is_causal(trace.patterns, trace.query_positions)
    meta = metadata(trace, causal, precision)
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
    return meta, jobs


def metadata(trace: AttentionTrace, causal: bool, precision: str) -> dict:
    """What the page needs besides the weights: tokens, spans and recorded rows (unpadded), settings."""
    examples = []
    for b in range(trace.batch_size):
        pad = trace.pad_offsets[b]
        q = trace.query_positions[b]
        examples.append(
            {
                "tokens": list(trace.tokens[b]),
                "length": trace.lengths[b],
                "prompt_length": int(trace.prompt_lengths[b]),
                "rows": (q[q >= 0] - pad).tolist(),
                "spans": [
                    {"name": s.name, "kind": s.kind, "start": s.start, "end": s.end} for s in trace.spans[b]
                ],
            }
        )
    return {
        "attnflow_version": __version__,
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
    }


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
    return Shard(header, base64.b64encode(values).decode("ascii"), base64.b64encode(scales).decode("ascii"))


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


def _b64_len(n: int) -> int:
    return 4 * math.ceil(n / 3)


# ------------------------------------------------------------------------------------
# the page
# ------------------------------------------------------------------------------------
def page(meta: dict, inline: bool = False) -> str:
    """index.html: CSP, the viewer's static assets (linked, or inlined for Jupyter) and the data as JSON."""
    title = _html.escape(str(meta["model_info"].get("name", "attention")))
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
<meta name="referrer" content="no-referrer">
<title>attnflow: {title}</title>
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
