"""Exporters: Parquet tables and the offline HTML viewer.

    >>> R = af.flow.rollout(tr.patterns)                          # [batch, query, key]
    >>> scores = af.attribute(tr, method="rollout", sources="spans")
    >>> af.exporters.to_parquet(tr, "run/", flow={"rollout": R}, attributions=scores)
    PosixPath('run')
    >>> af.exporters.to_html(tr, "view/")                         # open view/index.html from disk
    PosixPath('view')
"""

from attnflow.exporters.html import inline_html, to_html
from attnflow.exporters.parquet import flow_tensor, read_attributions, read_flow, to_parquet

__all__ = ["flow_tensor", "inline_html", "read_attributions", "read_flow", "to_html", "to_parquet"]
