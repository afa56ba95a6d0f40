"""The TransformerLens tracer: same AttentionTrace as the nnsight tracer, from `blocks.{l}.attn.hook_pattern`.

Parity: a TransformerBridge booted with `boot_transformers` from a copy of an HF
model's weights (tiny Llama with GQA, tiny GPT-2; q/k scaled so attention is
peaked) records, on a left-padded batch of token-id prompts, the patterns the
nnsight tracer records from the original model, within 1e-5 in float32, with
every reduction and with greedy generation.  A `boot_native` model (rotary, GQA)
is checked against TransformerLens's own cache of each prompt run alone.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import VOCAB, prompts_ids, tiny_model, tiny_tokenizer

import attnflow as af
from attnflow.errors import BadArgumentError, PromptError
from attnflow.tracers import lens

tl = pytest.importorskip("transformer_lens.model_bridge")  # a dependency: present wherever attnflow is installed
TransformerBridge = tl.TransformerBridge

TOL = 1e-5
PROMPTS = prompts_ids((5, 9, 13))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    # boot_transformers re-reads the tokenizer by name_or_path (to add a BOS), so it must come from disk
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tok")
    tiny_tokenizer().save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def pair(request, tokenizer):
    """(family, HF model under sdpa, bridge booted from a deep copy of its weights)."""
    hf = tiny_model(request.param)
    bridge = TransformerBridge.boot_transformers(
        f"tiny-{request.param}", hf_model=copy.deepcopy(hf), tokenizer=tokenizer, device="cpu"
    )
    return request.param, hf, bridge


@pytest.fixture(scope="module")
def native():
    from transformer_lens.config import TransformerBridgeConfig

    cfg = TransformerBridgeConfig(
        d_model=32, d_head=8, n_layers=2, n_heads=4, n_key_value_heads=2, n_ctx=64, d_vocab=VOCAB,
        act_fn="gelu", normalization_type="LN", positional_embedding_type="rotary", seed=0,
    )
    bridge = TransformerBridge.boot_native(cfg)  # offline: a random TL-native model, no tokenizer
    with torch.no_grad():
        for name, p in bridge.named_parameters():
            if ".attn." in name and (".q._original_component.weight" in name or ".k._original_component.weight" in name):
                p.mul_(6.0)
    return bridge


def close(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


CASES = [dict(), dict(heads="mean", rows="last"), dict(heads="max", rows=[0, -2], layers=[1])]


@pytest.mark.parametrize("kwargs", CASES, ids=["all", "mean-last", "max-rows-layer1"])
def test_bridge_matches_nnsight_tracer(pair, kwargs):
    family, hf, bridge = pair
    ref = af.trace(hf, PROMPTS, dtype=torch.float32, progress=False, **kwargs)
    got = af.trace(bridge, PROMPTS, dtype=torch.float32, progress=False, batch_size=2, **kwargs)
    assert got.patterns.dtype == torch.float32
    assert close(got.patterns, ref.patterns) < TOL, family
    assert torch.equal(got.input_ids, ref.input_ids) and torch.equal(got.attention_mask, ref.attention_mask)
    assert torch.equal(got.query_positions, ref.query_positions)
    assert (got.layers, got.heads, got.prompt_lengths) == (ref.layers, ref.heads, ref.prompt_lengths)
    assert got.model_info["source"] == "transformer_lens" and got.model_info["num_heads"] == 4
    if not kwargs:
        peak = torch.cat([got.item(i).patterns.amax(-1).flatten() for i in range(3)]).mean()
        assert peak >= 0.5, f"{family}: attention not peaked enough to test"


def test_bridge_generation_matches_nnsight_tracer(pair):
    family, hf, bridge = pair
    kw = dict(max_new_tokens=4, heads="mean", rows="completion", dtype=torch.float32, progress=False)
    ref = af.trace(hf, PROMPTS, **kw)
    got = af.trace(bridge, PROMPTS, **kw)
    assert got.input_ids.tolist() == ref.input_ids.tolist(), family  # the same greedy tokens
    assert close(got.patterns, ref.patterns) < TOL
    assert got.prompt_lengths == [len(p) for p in PROMPTS]
    assert torch.equal(got.query_positions, ref.query_positions)


def test_teacher_forced_completions(pair):
    _, hf, bridge = pair
    completions = [[7, 8], [9], [10, 11, 12]]
    kw = dict(completions=completions, rows="completion", dtype=torch.float32, progress=False)
    ref, got = af.trace(hf, PROMPTS, **kw), af.trace(bridge, PROMPTS, **kw)
    assert close(got.patterns, ref.patterns) < TOL
    assert got.query_positions.shape == (3, 3)


def test_string_prompts_record_the_bridge_bos(pair, tokenizer):
    _, hf, bridge = pair
    text = ["the cat sat on the mat", "bob lives in paris"]
    got = af.trace(bridge, text, heads="mean", dtype=torch.float32, progress=False)
    bos = tokenizer.bos_token_id
    ids = [[bos] + tokenizer(t, add_special_tokens=False)["input_ids"] for t in text]
    assert [t[0] for t in got.tokens] == [tokenizer.bos_token] * 2
    assert got.prompt_lengths == [len(i) for i in ids] == [7, 5]
    ref = af.trace(hf, ids, heads="mean", dtype=torch.float32, progress=False)
    assert close(got.patterns, ref.patterns) < TOL


def test_float16_storage_and_weighted_heads(pair):
    _, hf, bridge = pair
    w = torch.rand(2, 4) + 0.1
    ref = af.trace(hf, PROMPTS, heads=w, progress=False)
    got = af.trace(bridge, PROMPTS, heads=w, progress=False)
    assert got.patterns.dtype == torch.float16 and got.heads == "weighted"
    assert close(got.patterns, ref.patterns) < 1e-3


def test_native_bridge_matches_its_own_cache(native):
    tr = af.trace(native, PROMPTS, dtype=torch.float32, progress=False)
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(2)]
    for i, p in enumerate(PROMPTS):
        _, cache = native.run_with_cache(torch.tensor([p]), names_filter=lambda n: n in names)
        expected = torch.stack([cache[n][0] for n in names])  # [layer, head, query, key], unpadded
        assert close(tr.item(i).patterns[0], expected) < TOL
        assert expected.amax(-1).mean() >= 0.5
    assert tr.model_info["class"] == "TransformerBridge"
    causal = torch.ones(13, 13).tril().bool()
    assert tr.item(2).patterns[0][..., ~causal].abs().max() == 0
    assert close(tr.item(2).patterns.sum(-1), torch.ones(1, 2, 4, 13)) < 1e-5


def test_native_reductions_are_reductions_of_all(native):
    full = af.trace(native, PROMPTS, dtype=torch.float32, progress=False)
    small = af.trace(native, PROMPTS, heads="mean", rows="last", layers=[-1], dtype=torch.float32, progress=False)
    assert small.patterns.shape == (3, 1, 1, 1, 13)  # layers x rows x seq, no head or query dims kept
    assert close(small.patterns[:, 0, 0, 0], full.patterns[:, 1, :, -1].mean(1)) < 1e-6


def test_hooks_keep_only_selected_rows(native, monkeypatch):
    kept = []
    real = lens.select

    def spy(pattern, *args):
        out = real(pattern, *args)
        kept.append(out.numel())
        return out

    monkeypatch.setattr(lens, "select", spy)
    af.trace(native, PROMPTS, heads="mean", rows="last", progress=False)
    assert kept == [3 * 1 * 1 * 13] * 2  # per layer: batch x head x row x key


def test_same_errors_as_nnsight_tracer(native, pair):
    with pytest.raises(BadArgumentError, match="layer 5 is out of range"):
        af.trace(native, PROMPTS, layers=[5], progress=False)
    with pytest.raises(BadArgumentError, match="heads='median'"):
        af.trace(native, PROMPTS, heads="median", progress=False)
    with pytest.raises(BadArgumentError, match="rows='completion' needs a completion"):
        af.trace(native, PROMPTS, rows="completion", progress=False)
    with pytest.raises(PromptError, match="at most 64 positions"):
        af.trace(native, [list(range(4, 70))], progress=False)
    with pytest.raises(PromptError, match="outside 0..99"):
        af.trace(native, [[4, 5, 100]], progress=False)
    with pytest.raises(BadArgumentError, match="no tokenizer"):
        af.trace(native, "the cat", progress=False)
    with pytest.raises(BadArgumentError, match="records locally"):
        af.trace(native, PROMPTS, remote=True, progress=False)
    for kw in (dict(norms=True), dict(heads="norm")):
        with pytest.raises(BadArgumentError, match="TransformerLens model records patterns only"):
            af.trace(native, PROMPTS, progress=False, **kw)
    _, _, bridge = pair
    with pytest.raises(PromptError, match="prompt 1 is empty"):
        af.trace(bridge, ["the cat", "  "], progress=False)


def test_is_lens_model(native, pair):
    assert lens.is_lens_model(native) and lens.is_lens_model(pair[2])
    assert not lens.is_lens_model(pair[1]) and not lens.is_lens_model(torch.nn.Linear(2, 2))

