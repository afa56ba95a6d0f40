"""Offline attention views of evaluated examples: `views/<index>/index.html`, with the answer rows' rollout,
within a count and a byte budget.

A view stores every layer's (head-averaged) causal pattern as uint8 in base85: about
`layers x n(n+1)/2 x 5/4` bytes for n tokens, 42 MB for SmolLM2's 30 layers at 1,500
tokens.  `estimate_bytes` gives that size before anything is written; `ViewBudget`
writes views for examples with index < `count` while the bytes already under `views/`
plus the next view's estimate stay within `max_bytes` (default 200 MB), and skips the rest.

    >>> from attnflow.eval.config import RunConfig
    >>> from attnflow.eval.datasets import demo_examples
    >>> from attnflow.eval.jobs import batches, prepare
    >>> batch, = batches(prepare(demo_examples(3, seed=0), tokenizer, RunConfig(task="demo"), None), 3)
    >>> tr = af.trace(model, [j.prompt.input_ids for j in batch], heads="mean", max_new_tokens=1, progress=False)
    >>> [j.example.index for j in batch], tr.lengths            # shortest prompt first
    ([1, 0, 2], [27, 48, 48])
    >>> targets = [[len(j.prompt) - 1] for j in batch]          # the rows producing the first answer token
    >>> round(estimate_bytes(48, n_layers=4) / 1e6, 2)          # MB of one 48-token view of the 4-layer demo model
    0.1
    >>> budget = ViewBudget(Path("runs/demo"), count=50, max_bytes=150_000)
    >>> write_views(tr, batch, targets, Path("runs/demo"), budget)
    >>> budget.written, budget.skipped                          # the second view would pass 150 kB
    (1, [0, 2])
    >>> sorted(p.name for p in Path("runs/demo/views/000000001").iterdir())
    ['index.html', 'shards', 'thumbs', 'viewer.css', 'viewer.js']
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from attnflow.attribution import target_flow
from attnflow.eval.jobs import Job
from attnflow.exporters import to_html

# (name in the viewer, flow method, exclude the first-token sink)
VIEW_METHODS = (("rollout", "rollout", False), ("rollout/nosink", "rollout", True))
DEFAULT_VIEW_BYTES = 200 * 10**6
PAGE_BYTES = 4_500  # index.html around the data (measured)
THUMB = 48  # the viewer's thumbnail side (exporters.html.THUMB)
TOKEN_BYTES = 15  # index.html's JSON per token (measured: 14 on SmolLM2 HotPotQA prompts)
SHARD_BYTES = 8 * 2**20  # to_html's default shard size; each shard has a ~400 byte header


def estimate_bytes(n_tokens: int, n_layers: int, n_heads: int = 1, flow_rows: int = 1, n_flows: int = len(VIEW_METHODS)) -> int:
    """Bytes of one view of `n_tokens` tokens (every row recorded, causal, uint8), before writing it.

    >>> round(estimate_bytes(1159, 30, flow_rows=3) / 1e6, 2)      # SmolLM2, HotPotQA dev row 14 (27.3 MB in base64)
    25.58
    """
    values = n_layers * n_heads * n_tokens * (n_tokens + 1) // 2
    attention = _b85(values) + _b85(n_layers * n_heads * n_tokens * 4)
    flows = n_flows * (_b85(flow_rows * n_tokens) + _b85(flow_rows * 4))
    side = min(THUMB, n_tokens)
    thumbs = _b85(n_layers * n_heads * side * side)
    headers = 400 * (math.ceil((attention + flows + thumbs) / SHARD_BYTES) + n_layers + n_flows + 1)
    return attention + flows + thumbs + headers + static_bytes() + PAGE_BYTES + TOKEN_BYTES * n_tokens


def _b85(n: int) -> int:
    return n + math.ceil(n / 4)  # exporters.html.b85: 5 characters per 4 bytes


@functools.cache
def static_bytes() -> int:
    """Bytes of the viewer's static files (viewer.js, viewer.css), copied into every view."""
    from importlib import resources

    files = resources.files("attnflow.exporters").joinpath("static")
    return sum(f.stat().st_size if hasattr(f, "stat") else len(f.read_bytes()) for f in files.iterdir() if f.is_file())


def tree_bytes(path: Path) -> int:
    """Total size of the files under `path` (0 when it does not exist)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


@dataclass
class ViewBudget:
    """Which examples get a view: index < `count`, while `views/` stays within `max_bytes` (None: no limit)."""

    out: Path
    count: int
    max_bytes: int | None = DEFAULT_VIEW_BYTES
    used: int = -1  # bytes under out/views, measured on first use
    written: int = 0
    skipped: list[int] = field(default_factory=list)  # example indices left out for the byte budget

    def admit(self, index: int, estimate: int) -> bool:
        if index >= self.count:
            return False
        self.measure()
        if self.max_bytes is not None and self.used + estimate > self.max_bytes:
            self.skipped.append(index)
            return False
        return True

    def measure(self) -> None:
        if self.used < 0:
            self.used = tree_bytes(self.out / "views")

    def add(self, path: Path) -> None:
        self.used += tree_bytes(path)
        self.written += 1


def write_views(tr, batch: list[Job], targets: Sequence[Sequence[int]], out: Path, budget: ViewBudget | int) -> None:
    """One offline attention view per admitted example, with rollout of its `targets` rows (unpadded).

    Written before the batch's part is committed, so a committed part has its views.
    An int `budget` means views for the examples with index < budget, without a byte limit.
    """
    if isinstance(budget, int):
        budget = ViewBudget(out, budget, None)
    n_layers, n_heads = tr.patterns.shape[1], tr.patterns.shape[2]
    for b, job in enumerate(batch):
        if job.example.index >= budget.count:
            continue
        path = out / "views" / f"{job.example.index:09d}"
        budget.measure()
        if path.is_dir():  # a batch rerun after a kill: its view is replaced, so its bytes don't count twice
            budget.used -= tree_bytes(path)
        estimate = estimate_bytes(tr.lengths[b], n_layers, n_heads, len(targets[b]))
        if not budget.admit(job.example.index, estimate):
            continue
        item = tr.item(b)
        q = torch.tensor([list(targets[b])])  # [1, rows], unpadded
        composed = {
            name: (target_flow(item, q.tolist(), method, exclude_keys=(0,) if sink else (), validate=False), q)  # just recorded
            for name, method, sink in VIEW_METHODS
        }
        to_html(item, path, flow=composed, overwrite=True)  # a resumed batch redraws
        budget.add(path)


def views_summary(out: Path, dirs: Sequence[Path], candidates: Sequence[int], count: int | None, max_bytes: int | None) -> dict:
    """Facts on the views of a run: written (count, bytes), and the candidates (index < count) without one."""
    have = {int(p.name) for d in dirs if (d / "views").is_dir() for p in (d / "views").iterdir() if p.name.isdigit()}
    size = sum(tree_bytes(d / "views") for d in dirs)
    missing = [i for i in candidates if count is not None and i < count and i not in have]
    return {"written": len(have), "bytes": size, "missing": missing, "count": count, "max_bytes": max_bytes}
