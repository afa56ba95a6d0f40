"""Offline attention views of evaluated examples: `views/<index>/index.html`, with the answer rows' rollout.

    >>> write_views(tr, batch, targets, Path("runs/demo"), limit=50)     # examples with index < 50
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from attnflow.attribution import target_flow
from attnflow.eval.jobs import Job
from attnflow.exporters import to_html

# (name in the viewer, flow method, exclude the first-token sink)
VIEW_METHODS = (("rollout", "rollout", False), ("rollout/nosink", "rollout", True))


def write_views(tr, batch: list[Job], targets: Sequence[Sequence[int]], out: Path, limit: int) -> None:
    """One offline attention view per example with index < `limit`, with rollout of its `targets` rows (unpadded).

    Written before the batch's part is committed, so a committed part has its views.
    """
    for b, job in enumerate(batch):
        if job.example.index >= limit:
            continue
        item = tr.item(b)
        q = torch.tensor([list(targets[b])])  # [1, rows], unpadded
        composed = {
            name: (target_flow(item, q.tolist(), method, exclude_keys=(0,) if sink else ()), q)
            for name, method, sink in VIEW_METHODS
        }
        to_html(item, out / "views" / f"{job.example.index:09d}", flow=composed)
