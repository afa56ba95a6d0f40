"""The real-model tier of the command line: `attnflow trace <SmolLM2 .gguf> --chat --documents ... --json`, `attnflow convert`.

References: `model.generate` on the session's copy of the weights for the answer, the tokenizer on
the rendered chat template for the spans, and eager `output_attentions=True` composed by hand
(rollout in float64) for the per-document shares.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_real_smollm2 import eager_copy

from attnflow import cli

pytestmark = pytest.mark.real

DOCS = {
    "Marie Curie": "Marie Curie was a physicist and chemist. She was born in Warsaw, Poland, in 1867.",
    "Eiffel Tower": "The Eiffel Tower is a wrought-iron lattice tower in Paris, completed in 1889.",
    "Mount Fuji": "Mount Fuji is the highest mountain in Japan, about 3,776 metres tall.",
}
QUESTION = "In which city was Marie Curie born?"


def test_trace_chat_documents_json(smollm2, tmp_path, capsys):
    docs = tmp_path / "docs.json"
    docs.write_text(json.dumps(DOCS))
    code = cli.main(["trace", str(smollm2.file), "--chat", "--documents", str(docs), "--prompt", QUESTION,
                     "--max-new-tokens", "8", "--json", "--no-progress"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    result = json.loads(out)
    ex = result["examples"][0]
    tok, hf = smollm2.tok, smollm2.hf
    blocks = [f"Document [{i}]: {name}\n{text}" for i, (name, text) in enumerate(DOCS.items(), 1)]
    messages = [{"role": "user", "content": "\n\n".join(blocks) + "\n\nQuestion: " + QUESTION}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False).input_ids
    with torch.no_grad():
        new = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids) :].tolist()
    assert ex["completion"] == tok.decode(new) and ex["completion_tokens"] == 8
    assert result["prompt_tokens"] == [len(ids)] and result["model_dtype"] == "float32"
    by_name = {d["name"]: d for d in ex["documents"]}
    for block, name in zip(blocks, DOCS):
        assert tok.decode(ids[by_name[name]["start"] : by_name[name]["end"]]) == block
    # shares: 30 layers of eager attention, heads averaged, rolled out by hand
    seq = ids + new
    with torch.no_grad():
        att = eager_copy(hf)(torch.tensor([seq]), output_attentions=True).attentions
    A = torch.stack([a[0] for a in att]).double().mean(1)  # [layer, query, key]
    n = len(seq)
    R = torch.eye(n, dtype=torch.float64)
    for layer in A:
        step = 0.5 * layer + 0.5 * torch.eye(n, dtype=torch.float64)
        R = (step / step.sum(-1, keepdim=True)) @ R
    rows = R[len(ids) - 1 : n - 1]
    rows = rows / rows.sum(-1, keepdim=True)
    ref = [float(rows[:, by_name[k]["start"] : by_name[k]["end"]].sum(-1).mean()) for k in DOCS]
    np.testing.assert_allclose([by_name[k]["share"] for k in DOCS], ref, atol=1e-3)
    assert abs(sum(d["share"] for d in ex["documents"]) + ex["other_share"] - 1) < 1e-6
    assert sorted(d["rank"] for d in ex["documents"]) == [1, 2, 3]


def test_convert_writes_a_plain_folder_and_refuses_to_clobber(smollm2, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "smollm2"
    assert cli.main(["convert", str(smollm2.file), str(out)]) == 0
    assert f"-> {out}" in capsys.readouterr().out
    man = json.loads((out / "manifest.json").read_text())
    assert man["kind"] == "model" and man["source"] == str(smollm2.file)
    hf = AutoModelForCausalLM.from_pretrained(out)  # logits equality of the saved weights: test_real_smollm2 (save_model)
    assert getattr(hf, "hf_quantizer", None) is None and hf.config.num_hidden_layers == 30
    assert torch.equal(hf.model.embed_tokens.weight, smollm2.hf.model.embed_tokens.weight)
    assert AutoTokenizer.from_pretrained(out).chat_template == smollm2.tok.chat_template
    before = sorted(p.name for p in out.iterdir())
    assert cli.main(["convert", str(smollm2.file), str(out)]) == 2  # refused before loading anything
    assert "(CLI: --overwrite)" in capsys.readouterr().err and sorted(p.name for p in out.iterdir()) == before
