"""The quick-start notebook runs top to bottom on the embedded demo model (so it cannot rot)."""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_quickstart_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = NOTEBOOK.read_bytes()
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert [c for c in nb.cells if c.cell_type == "code" and (c.outputs or c.execution_count)] == []  # committed clean
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert "AttentionTrace(batch=1" in text
    assert "flow puts the answer in" in text
    html = [o for o in outputs if "text/html" in o.get("data", {})]
    assert html and "attnflow" in html[-1]["data"]["text/html"]
    assert "flow_methods&quot;:[&quot;rollout&quot;]" in html[-1]["data"]["text/html"]  # the inline view has its flow
    assert "run the cell" in html[-1]["data"]["text/html"]  # the text an untrusted, saved output shows
    assert NOTEBOOK.read_bytes() == before  # executed in memory, in tmp_path: nothing written back
