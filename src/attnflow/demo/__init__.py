"""The embedded model organism: a small Llama trained on a synthetic multi-document QA task.

The weights, tokenizer and model card ship in `MODEL_DIR`; nothing is fetched
from a hub.  The task generator (`attnflow.demo.task`) knows which documents
support each answer, so attribution can be checked against the truth.

    >>> import attnflow as af
    >>> hf_model, tok = af.demo.load_hf()            # transformers model (eval mode) + tokenizer
    >>> model = af.demo.load()                       # the same, wrapped by nnsight via attnflow.load
    >>> ex = af.demo.task.generate(1, seed=0)[0]
    >>> prompt, doc_spans = af.demo.task.render_prompt(ex)
"""

from __future__ import annotations

from pathlib import Path

from attnflow.demo import task

MODEL_DIR = Path(__file__).resolve().parent / "model"


def load_hf():
    """(LlamaForCausalLM in eval mode, PreTrainedTokenizerFast) from `MODEL_DIR`, offline."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from attnflow.errors import ModelNotFoundError

    if not (MODEL_DIR / "model.safetensors").is_file():
        raise ModelNotFoundError(
            f"the demo model is missing from {MODEL_DIR}; reinstall attnflow or run `python -m attnflow.demo.train --out {MODEL_DIR}`"
        )
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, local_files_only=True).eval()
    tok = PreTrainedTokenizerFast.from_pretrained(MODEL_DIR, local_files_only=True)
    return model, tok


def load(**kwargs):
    """The demo model wrapped for tracing: `attnflow.load(MODEL_DIR, **kwargs)` (imports nnsight lazily)."""
    from attnflow.tracers import load as _load

    return _load(MODEL_DIR, **kwargs)


__all__ = ["MODEL_DIR", "load", "load_hf", "task"]
