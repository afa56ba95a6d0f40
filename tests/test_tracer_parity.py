"""attnflow.trace under each model's default kernel == eager attention with output_attentions=True.

Every family is built offline from a tiny random config with its q/k projections
scaled so attention is peaked (a missing soft-cap, window or sink would show).
The traced batch is 3 left-padded prompts of different lengths; each prompt is
compared with an eager run of that prompt alone, on every real row.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import FAMILIES, eager_copy, eager_patterns, prompts_ids, scale_qk, tiny_model, tiny_tokenizer

import attnflow as af

TOL = 1e-5
PROMPTS = prompts_ids((7, 12, 16))


def gpt_oss_model():
    """gpt-oss: attention sinks (s_aux) and alternating sliding/full layers."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from tiny_models import COMMON

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        "gpt_oss", **COMMON, num_key_value_heads=2, head_dim=16, sliding_window=4, num_local_experts=4,
        num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"],
    )
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0, 2)
    scale_qk(model, 10.0)
    return model


def build(family: str, **overrides):
    return gpt_oss_model() if family == "gpt_oss" else tiny_model(family, **overrides)


@pytest.fixture(scope="module", params=[*FAMILIES, "gpt_oss"])
def family_case(request):
    model = build(request.param)
    ref = eager_copy(model)
    return request.param, model, [eager_patterns(ref, p) for p in PROMPTS]


def test_all_rows_match_eager(family_case):
    family, model, expected = family_case
    impl = model.config._attn_implementation
    tr = af.trace(model, PROMPTS, dtype=torch.float32, progress=False)
    assert tr.patterns.dtype == torch.float32
    assert tr.patterns.shape == (3, 2, 4, 16, 16)
    for i, (p, E) in enumerate(zip(PROMPTS, expected)):
        assert E.amax(-1).mean() >= 0.5, f"{family}: attention not peaked enough to test"
        one = tr.item(i)
        assert one.patterns.shape == (1, 2, 4, len(p), len(p))
        assert (one.query_positions[0] == torch.arange(len(p))).all()
        diff = (one.patterns[0] - E).abs().max().item()
        assert diff <= TOL, f"{family} prompt {i}: max abs diff {diff:.2e}"
    # pad rows and pad keys are zero in the padded batch
    pad = (tr.attention_mask == 0)
    assert (tr.patterns.abs().sum((1, 2, 3))[pad] == 0).all()
    assert (tr.patterns.abs().sum((1, 2, 4))[pad] == 0).all()
    assert (tr.query_positions[0, :9] == -1).all() and tr.query_positions[0, -1] == 15
    assert model.config._attn_implementation == impl


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_reductions_match_eager(family):
    model = tiny_model(family, num_hidden_layers=3)
    ref = eager_copy(model)
    expected = [eager_patterns(ref, p) for p in PROMPTS]  # [layer, head, query, key]

    last = af.trace(model, PROMPTS, rows="last", dtype=torch.float32, progress=False)
    assert last.patterns.shape == (3, 3, 4, 1, 16)
    assert last.query_positions.tolist() == [[15]] * 3
    for i, E in enumerate(expected):
        assert (last.item(i).patterns[0, :, :, 0] - E[:, :, -1]).abs().max() <= TOL

    mean = af.trace(model, PROMPTS, heads="mean", dtype=torch.float32, progress=False)
    assert mean.heads == "mean" and mean.patterns.shape[2] == 1
    for i, E in enumerate(expected):
        assert (mean.item(i).patterns[0, :, 0] - E.mean(1)).abs().max() <= TOL

    hmax = af.trace(model, PROMPTS, heads="max", dtype=torch.float32, progress=False)
    for i, E in enumerate(expected):
        assert (hmax.item(i).patterns[0, :, 0] - E.amax(1)).abs().max() <= TOL

    w = torch.tensor([[1.0, 0, 0, 3], [0, 1, 1, 0], [2, 2, 0, 0]])
    weighted = af.trace(model, PROMPTS, heads=w, dtype=torch.float32, progress=False)
    assert weighted.heads == "weighted"
    for i, E in enumerate(expected):
        want = torch.einsum("lhqk,lh->lqk", E, w / w.sum(-1, keepdim=True))
        assert (weighted.item(i).patterns[0, :, 0] - want).abs().max() <= TOL

    sub = af.trace(model, PROMPTS, layers=[0, -1], dtype=torch.float32, progress=False)
    assert sub.layers == [0, 2] and sub.patterns.shape[1] == 2
    for i, E in enumerate(expected):
        assert (sub.item(i).patterns[0] - E[[0, 2]]).abs().max() <= TOL

    calls = []
    hook = model.model.norm.register_forward_hook(lambda *a: calls.append(1))
    first = af.trace(model, PROMPTS, layers=[0], dtype=torch.float32, progress=False)
    hook.remove()
    assert calls == []  # the forward stopped after layer 0
    for i, E in enumerate(expected):
        assert (first.item(i).patterns[0] - E[:1]).abs().max() <= TOL

    both = af.trace(model, PROMPTS, rows="last", heads="mean", layers=[-1], dtype=torch.float32, progress=False)
    for i, E in enumerate(expected):
        assert (both.item(i).patterns[0, 0, 0, 0] - E[2, :, -1].mean(0)).abs().max() <= TOL


def test_row_list_negative_positions_and_batching():
    model = tiny_model("qwen2")
    ref = eager_copy(model)
    tr = af.trace(model, PROMPTS, rows=[0, -2, -1], dtype=torch.float32, batch_size=2, progress=False)
    assert tr.patterns.shape == (3, 2, 4, 3, 16)
    for i, p in enumerate(PROMPTS):
        n = len(p)
        one = tr.item(i)
        assert one.query_positions[0].tolist() == [0, n - 2, n - 1]
        E = eager_patterns(ref, p)[:, :, [0, n - 2, n - 1]]
        assert (one.patterns[0] - E).abs().max() <= TOL
    full = af.trace(model, PROMPTS, dtype=torch.float32, batch_size=1, progress=False)
    whole = af.trace(model, PROMPTS, dtype=torch.float32, batch_size=3, progress=False)
    assert torch.allclose(full.patterns, whole.patterns, atol=TOL)
    assert torch.equal(full.query_positions, whole.query_positions)


def greedy(ref, ids, n):
    """Greedy continuation by repeated full eager forwards (independent of generate())."""
    ids = list(ids)
    for _ in range(n):
        with torch.no_grad():
            ids.append(int(ref(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_max_new_tokens_matches_eager(family):
    model = tiny_model(family, eos_token_id=None)
    ref = eager_copy(model)
    tr = af.trace(model, PROMPTS, max_new_tokens=5, dtype=torch.float32, progress=False)
    assert tr.prompt_lengths == [len(p) for p in PROMPTS]
    assert tr.settings["max_new_tokens"] == 5
    for i, p in enumerate(PROMPTS):
        one = tr.item(i)
        full = one.input_ids[0].tolist()
        assert full == greedy(ref, p, 5)
        diff = (one.patterns[0] - eager_patterns(ref, full)).abs().max()
        assert diff <= TOL
    # the rows that produced the completion
    comp = af.trace(model, PROMPTS, max_new_tokens=5, rows="completion", dtype=torch.float32, progress=False)
    for i, p in enumerate(PROMPTS):
        one = comp.item(i)
        assert one.query_positions[0].tolist() == list(range(len(p) - 1, len(p) + 4))
        E = eager_patterns(ref, one.input_ids[0].tolist())[:, :, len(p) - 1 : len(p) + 4]
        assert (one.patterns[0] - E).abs().max() <= TOL


def test_generation_is_plain_greedy_despite_checkpoint_penalties():
    model = tiny_model("llama", eos_token_id=None)
    ref = eager_copy(model)
    model.generation_config.repetition_penalty = 50.0
    model.generation_config.no_repeat_ngram_size = 1
    prompts = [[8] * 6, [11] * 6]  # greedy continuations that repeat tokens, e.g. 96 42 42 42 42
    for p in prompts:  # the checkpoint's penalties would change them
        with torch.no_grad():
            penalised = model.generate(torch.tensor([p]), max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert penalised[0].tolist() != greedy(ref, p, 5)
    tr = af.trace(model, prompts, max_new_tokens=5, progress=False)
    for i, p in enumerate(prompts):
        assert tr.item(i).input_ids[0].tolist() == greedy(ref, p, 5)


def test_generation_stops_at_eos():
    model = tiny_model("llama")
    ref = eager_copy(model)
    p = PROMPTS[0]
    first = greedy(ref, p, 1)[-1]
    model.generation_config.eos_token_id = first  # the first generated token ends the completion
    tr = af.trace(model, [p, PROMPTS[1]], max_new_tokens=4, progress=False)
    assert tr.item(0).input_ids[0].tolist() == p + [first]


def test_teacher_forcing_and_text_prompts_through_nnsight_model():
    import nnsight

    tok = tiny_tokenizer()
    hf = tiny_model("mistral")
    ref = eager_copy(hf)
    model = nnsight.TransformersModel(hf, tokenizer=tok)
    prompts = ["alice lives in paris . where does alice live ?", "the cat sat on the mat"]
    tr = af.trace(model, prompts, completions=[" paris", [9, 10]], rows="completion", dtype=torch.float32, progress=False)
    assert tr.tokens[0][-2:] == ["?", "paris"] and tr.tokens[1][-3:] == ["mat", "on", "mat"]
    assert tr.prompt_lengths == [10, 6] and tr.settings["teacher_forced"]
    for i in range(2):
        one = tr.item(i)
        ids = one.input_ids[0].tolist()
        n, p = len(ids), tr.prompt_lengths[i]
        assert one.query_positions[0].tolist() == list(range(p - 1, n - 1))
        assert (one.patterns[0] - eager_patterns(ref, ids)[:, :, p - 1 : n - 1]).abs().max() <= TOL
    assert tr.model_info["source"] == "nnsight" and tr.model_info["num_kv_heads"] == 2


def test_storage_dtype_and_plain_model_with_tokenizer():
    hf = tiny_model("phi3")
    ref = eager_copy(hf)
    tok = tiny_tokenizer()
    tr = af.trace(hf, "alice lives in paris", tokenizer=tok, progress=False)
    assert tr.patterns.dtype == torch.float16
    assert tr.tokens == [["alice", "lives", "in", "paris"]]
    E = eager_patterns(ref, tok("alice lives in paris")["input_ids"])
    assert (tr.patterns[0].float() - E).abs().max() <= 1e-3  # float16 storage rounding
    chat = [{"role": "q", "content": "where does alice live ?"}]
    tr = af.trace(hf, [chat, "alice lives in paris"], tokenizer=tiny_tokenizer(chat_template=True), progress=False)
    assert tr.tokens[0][:3] == ["<bos>", "q", ":"] and tr.tokens[0][-2:] == ["answer", ":"]
    assert tr.prompt_lengths == [11, 4]


def test_tracing_leaves_attention_implementation_alone():
    for family, impl in [("llama", "sdpa"), ("llama", "eager"), ("gemma2", None)]:
        model = tiny_model(family, attn_implementation=impl)
        before = model.config._attn_implementation
        layers_before = copy.copy([m.config._attn_implementation for m in model.modules() if hasattr(m, "config")])
        with torch.no_grad():
            logits = model(torch.tensor(PROMPTS[:1])).logits
        af.trace(model, PROMPTS[:2], heads="mean", progress=False)
        assert model.config._attn_implementation == before == (impl or before)
        assert [m.config._attn_implementation for m in model.modules() if hasattr(m, "config")] == layers_before
        with torch.no_grad():  # and the model computes what it computed before
            assert torch.equal(model(torch.tensor(PROMPTS[:1])).logits, logits)
