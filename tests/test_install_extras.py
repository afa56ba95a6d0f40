"""TransformerLens is the `lens` extra: the core install records HF models, and a TransformerLens model without
transformer_lens gets a one-line error naming the extra."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest

import attnflow as af
from attnflow.errors import UnsupportedModelError

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_transformer_lens_is_an_extra_not_a_dependency():
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    names = [d.split(">")[0].split("=")[0].split("<")[0].strip().lower() for d in project["dependencies"]]
    assert "transformer-lens" not in names
    extras = project["optional-dependencies"]
    assert any(d.startswith("transformer-lens") for d in extras["lens"])
    assert any(d.startswith("transformer-lens") or d == "attnflow[lens]" for d in extras["test"])


def test_lens_model_without_transformer_lens_names_the_extra(monkeypatch):
    TransformerBridge = type("TransformerBridge", (), {"__module__": "transformer_lens.model_bridge.bridge"})
    monkeypatch.setitem(sys.modules, "transformer_lens", None)  # `import transformer_lens` raises ImportError
    with pytest.raises(UnsupportedModelError, match=r'pip install "attnflow\[lens\]"') as err:
        af.trace(TransformerBridge(), [[4, 5, 6]], progress=False)
    assert "\n" not in str(err.value)


def test_core_import_needs_no_transformer_lens(monkeypatch):
    import subprocess

    code = (
        "import sys; sys.modules['transformer_lens'] = None\n"
        "import attnflow, attnflow.tracers.driver, attnflow.tracers.lens, attnflow.tracers.hf\n"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]
