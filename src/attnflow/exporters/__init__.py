"""Exporters: Parquet tables and the offline HTML viewer.

    >>> af.exporters.to_parquet(tr, "run/", flow={"rollout": R}, attributions=scores)
    >>> af.exporters.to_html(tr, "view/")          # open view/index.html from disk
"""

from attnflow.exporters.html import inline_html, to_html
from attnflow.exporters.parquet import flow_tensor, read_attributions, read_flow, to_parquet

__all__ = ["flow_tensor", "inline_html", "read_attributions", "read_flow", "to_html", "to_parquet"]
