"""The names docstring examples use (`pytest --doctest-modules`), and where they run.

Every doctest runs in a fresh temporary directory (so `"run/"`, `"view/"`, `"models/"` land
there) and sees `af`, `torch`, `np`, `pa`; the names below are built once per session, and
only for the doctests that mention them:

    model, tok, tokenizer   the embedded demo model (`af.demo.load()`) and its tokenizer
    example                 `af.demo.task.generate(1, seed=0)[0]`
    tr                      a trace of the demo model on PROMPT: two document spans, one generated token, norms

A module's own globals win over these names.  Doctests of the `gguf` module also find
`models/tiny.gguf`: a 2-layer random Llama with a byte-level tokenizer and a chat template.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from _pytest.doctest import DoctestItem

PROMPT = "doc1 : alice lives in paris .\ndoc2 : bob owns a cat .\nquestion : what is the city of alice ?\nanswer :"
DOCS = [(name, PROMPT.index(text), PROMPT.index(text) + len(text))  # (name, char_start, char_end) in PROMPT
        for name, text in [("doc1", "alice lives in paris ."), ("doc2", "bob owns a cat .")]]

# the NDIF stand-in: helpers, no tests; server.py blocks `import attnflow` in the process that imports it,
# and the package's example needs a model directory and a subprocess
collect_ignore = ["tests/ndif_mock", "tests/ndif_real/cpu_actor.py", "tests/ndif_real/deploy.py", "tests/ndif_real/stack.py"]  # server side: ray, ndif


@pytest.fixture(scope="session")
def _demo_model():
    import attnflow as af

    return af.demo.load()


@pytest.fixture(scope="session")
def _demo_trace(_demo_model):
    import attnflow as af
    from attnflow.attribution import text_spans

    spans = text_spans(_demo_model.tokenizer, PROMPT, DOCS)
    return af.trace(_demo_model, [PROMPT], spans=[spans], max_new_tokens=1, progress=False, norms=True)


def _example():
    import attnflow as af

    return af.demo.task.generate(1, seed=0)[0]


# name -> how to get it (a fixture name, or a function); built only if a doctest's source uses the name
LAZY = {
    "model": "_demo_model",
    "tok": lambda request: request.getfixturevalue("_demo_model").tokenizer,
    "tokenizer": lambda request: request.getfixturevalue("_demo_model").tokenizer,
    "tr": "_demo_trace",
    "example": lambda request: _example(),
}


@pytest.fixture(scope="session")
def _tiny_gguf(tmp_path_factory) -> Path:
    """A 2-layer random Llama with a byte-level BPE tokenizer and a chat template, as a float32 GGUF file."""
    import gguf
    import numpy as np
    from tokenizers import pre_tokenizers

    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *sorted(pre_tokenizers.ByteLevel.alphabet()), "Ġh"]
    vocab, hidden, ffn, layers, heads, kv_heads = len(tokens), 32, 64, 2, 4, 2
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tiny")
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_block_count(layers)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(hidden // heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (vocab - 3))  # 3 = control
    w.add_token_scores([0.0] * vocab)
    w.add_token_merges(["Ġ h"])  # transformers builds the BPE from merges and scores; one merge, its token in the list
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")
    rng = np.random.default_rng(0)
    shapes = {"token_embd": (vocab, hidden), "output": (vocab, hidden)}
    for i in range(layers):
        kv = kv_heads * hidden // heads
        shapes |= {f"blk.{i}.attn_q": (hidden, hidden), f"blk.{i}.attn_k": (kv, hidden), f"blk.{i}.attn_v": (kv, hidden),
                   f"blk.{i}.attn_output": (hidden, hidden), f"blk.{i}.ffn_gate": (ffn, hidden),
                   f"blk.{i}.ffn_up": (ffn, hidden), f"blk.{i}.ffn_down": (hidden, ffn)}
    for name, shape in shapes.items():
        w.add_tensor(f"{name}.weight", (0.1 * rng.standard_normal(shape)).astype(np.float32))
    for name in ["output_norm"] + [f"blk.{i}.{n}" for i in range(layers) for n in ("attn_norm", "ffn_norm")]:
        w.add_tensor(f"{name}.weight", np.ones(hidden, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(autouse=True)
def _doctest_names(request, doctest_namespace):
    """Fill `doctest_namespace` for this doctest only, and run it inside a fresh `tmp_path` (other tests: nothing)."""
    if not isinstance(request.node, DoctestItem):
        yield
        return
    tmp_path = request.getfixturevalue("tmp_path")
    monkeypatch = request.getfixturevalue("monkeypatch")
    import numpy as np
    import pyarrow as pa
    import torch

    import attnflow as af

    monkeypatch.chdir(tmp_path)
    test = request.node.dtest
    if test.name.startswith("attnflow.gguf"):
        (tmp_path / "models").mkdir()
        (tmp_path / "models" / "tiny.gguf").symlink_to(request.getfixturevalue("_tiny_gguf"))
    source = "\n".join(e.source for e in test.examples)
    names = {"af": af, "torch": torch, "np": np, "pa": pa}
    for name, get in LAZY.items():
        if re.search(rf"\b{name}\b", source):
            names[name] = request.getfixturevalue(get) if isinstance(get, str) else get(request)
    added = {k: v for k, v in names.items() if k not in test.globs}  # the module's own names win
    doctest_namespace.update(added)
    yield
    for name in added:
        doctest_namespace.pop(name, None)
