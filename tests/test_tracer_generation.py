"""Recording while generating (one `hf.generate`) equals generating and then recording (two passes).

The two-pass path (`one_pass=False`) is the reference: generate greedily, then one
forward over prompt + completion; it is itself checked against eager
`output_attentions` in test_tracer_parity.py.  Here the one-pass trace must give
the same tokens as `model.generate(do_sample=False)` and the same patterns
(<= 1e-6) on a GQA Llama, GPT-2 and a sliding-window Mistral (window 4: the
cache keeps only the window), left-padded batches of different prompt lengths,
early EOS, and every `rows=` / `heads=` form.  The models run in float64: in
float32 the decode step's one-token matmuls round differently from the full
forward's (~1e-6 on these peaked random models), which is not what is tested here.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import prompts_ids, tiny_model

import attnflow as af
from attnflow.tracers import hf as hf_backend
from attnflow.tracers import TraceOptions, reduce

TOL = 1e-6
PROMPTS = prompts_ids((5, 11, 8))
ROWS = [None, "completion", "last", [0, -1, 6]]


def hf_greedy(model, prompt, n):
    """Greedy ids of `model.generate(do_sample=False)` on one unpadded prompt, cut after the first EOS."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0].tolist()


def both(model, prompts, **kw):
    kw = dict(dtype=torch.float32, progress=False, **kw)
    return af.trace(model, prompts, **kw), af.trace(model, prompts, one_pass=False, **kw)


def assert_same(one, two):
    assert torch.equal(one.input_ids, two.input_ids) and torch.equal(one.attention_mask, two.attention_mask)
    assert torch.equal(one.query_positions, two.query_positions)
    assert one.prompt_lengths == two.prompt_lengths and one.tokens == two.tokens
    assert one.patterns.shape == two.patterns.shape and one.patterns.dtype == two.patterns.dtype
    diff = (one.patterns - two.patterns).abs().max().item()
    assert diff <= TOL, f"max abs diff {diff:.2e}"


@pytest.fixture(scope="module", params=["llama", "gpt2", "mistral"])
def model(request):
    return tiny_model(request.param, eos_token_id=None).double()


@pytest.mark.parametrize("rows", ROWS, ids=str)
@pytest.mark.parametrize("heads", ["all", "mean"])
def test_one_pass_equals_two_pass(model, rows, heads):
    one, two = both(model, PROMPTS, max_new_tokens=5, rows=rows, heads=heads, batch_size=2)
    assert_same(one, two)
    for i, p in enumerate(PROMPTS):
        assert one.item(i).input_ids[0].tolist() == hf_greedy(model, p, 5)
    if rows is None:  # every real row sums to 1: nothing was left out
        real = one.query_positions >= 0
        sums = one.patterns.sum(-1)  # [batch, layer, head, row]
        assert (sums.permute(0, 3, 1, 2)[real] - 1).abs().max() < 1e-5


def test_weighted_heads_and_layer_subset(model):
    L, H = 2, model.config.num_attention_heads
    w = torch.rand(L, H) + 0.1
    one, two = both(model, PROMPTS, max_new_tokens=3, heads=w, layers=[-1])
    assert one.patterns.shape[1:3] == (1, 1)
    assert_same(one, two)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_early_eos_in_a_left_padded_batch(family):
    model = tiny_model(family).double()
    firsts = [hf_greedy(model, p, 1)[-1] for p in PROMPTS]
    model.generation_config.eos_token_id = firsts[0]  # prompt 0 stops after one token, the others run on
    one, two = both(model, PROMPTS, max_new_tokens=6, rows=None)
    assert_same(one, two)
    assert one.item(0).input_ids[0].tolist() == PROMPTS[0] + [firsts[0]]
    for i, p in enumerate(PROMPTS):
        expected = hf_greedy(model, p, 6)
        if firsts[0] in expected[len(p) :]:
            expected = expected[: expected.index(firsts[0], len(p)) + 1]
        assert one.item(i).input_ids[0].tolist() == expected
    # every example ends at its first token: the generation stops early, after those EOS rows were computed
    model.generation_config.eos_token_id = sorted(set(firsts))
    for rows in (None, "last", "completion"):
        one, two = both(model, PROMPTS, max_new_tokens=6, rows=rows)
        assert_same(one, two)
        assert [len(s) for s in one.tokens] == [len(p) + 1 for p in PROMPTS]


def test_one_generation_no_second_forward(monkeypatch):
    model = tiny_model("llama", eos_token_id=None)
    widths = []
    handle = model.register_forward_pre_hook(lambda m, a, kw: widths.append(kw["input_ids"].shape[1]), with_kwargs=True)
    try:
        af.trace(model, PROMPTS, max_new_tokens=4, progress=False)
        assert widths == [11, 1, 1, 1, 1]  # prefill, then one token per step: no forward over prompt + completion
        widths.clear()
        af.trace(model, PROMPTS, max_new_tokens=4, progress=False, one_pass=False)
        assert widths == [11, 1, 1, 1, 15]  # the two-pass path: generate, then a full forward
    finally:
        handle.remove()


def test_remote_records_while_generating():
    """The remote block (nnsight's round trip) records as it generates: no forward over prompt + completion.

    It runs all max_new_tokens + 1 steps (no stopping criterion travels) and cuts after each example's EOS here.
    """
    import nnsight
    from tiny_models import tiny_tokenizer

    hf = tiny_model("llama").double()
    firsts = [hf_greedy(hf, p, 1)[-1] for p in PROMPTS]
    hf.generation_config.eos_token_id = firsts[0]  # prompt 0 stops after one token
    model = nnsight.TransformersModel(hf, tokenizer=tiny_tokenizer())
    assert hasattr(hf_backend.HFBackend(model, None, TraceOptions(remote="local")), "generate_record")
    widths = []
    handle = hf.register_forward_pre_hook(lambda m, a, kw: widths.append(kw["input_ids"].shape[1]), with_kwargs=True)
    kw = dict(max_new_tokens=4, rows=None, progress=False, dtype=torch.float32)
    try:
        remote = af.trace(model, PROMPTS, remote="local", **kw)
        assert widths == [11, 1, 1, 1, 1]  # prefill, then one token per step
    finally:
        handle.remove()
    assert_same(af.trace(model, PROMPTS, **kw), remote)
    assert_same(af.trace(model, PROMPTS, one_pass=False, **kw), remote)
    assert remote.item(0).input_ids[0].tolist() == PROMPTS[0] + [firsts[0]]


def test_chunked_rows_equal_whole_and_respect_the_budget(monkeypatch):
    model = tiny_model("mistral").double()
    prompts = prompts_ids((30, 22))
    whole = af.trace(model, prompts, heads="mean", dtype=torch.float32, progress=False, memory_budget=None)
    seen = []
    real = reduce.attention_pattern

    def spy(*args, row_index=None, **kw):
        seen.append(row_index.shape[1])
        return real(*args, row_index=row_index, **kw)

    monkeypatch.setattr(reduce, "attention_pattern", spy)
    budget = 2 * 30 * (8 * 4 + 16) * 7  # 7 rows of 2 examples x 4 heads x 30 keys
    chunked = af.trace(model, prompts, heads="mean", dtype=torch.float32, progress=False, memory_budget=budget)
    assert seen == [7, 7, 7, 7, 2] * 2  # 30 rows in chunks of 7, per layer
    assert (whole.patterns - chunked.patterns).abs().max() <= TOL
    seen.clear()
    gen = af.trace(model, prompts, max_new_tokens=3, heads="mean", dtype=torch.float32, progress=False, memory_budget=budget)
    assert max(seen) == 7  # the prefill too
    ref = af.trace(model, prompts, max_new_tokens=3, heads="mean", dtype=torch.float32, progress=False, one_pass=False)
    assert (gen.patterns - ref.patterns).abs().max() <= TOL


def test_memory_budget_option():
    assert TraceOptions(memory_budget="512MiB").memory_budget == 512 * 2**20
    assert TraceOptions(memory_budget="1.5g").memory_budget == 3 * 2**29
    assert TraceOptions(memory_budget=None).memory_budget is None
    assert TraceOptions().memory_budget == 256 * 2**20
    for bad in ("lots", 0, -5, "0MiB", 1.5, True):
        with pytest.raises(af.errors.BadArgumentError, match="memory_budget="):
            TraceOptions(memory_budget=bad)
    with pytest.raises(af.errors.BadArgumentError, match="one_pass="):
        TraceOptions(one_pass="yes")


def test_chunk_rows():
    assert reduce.chunk_rows(None, batch=2, heads=9, keys=100, rows=50) == 50
    assert reduce.chunk_rows(1, batch=2, heads=9, keys=100, rows=50) == 1  # at least one row
    per_row = 2 * 100 * (8 * 9 + 16)  # scores + probabilities of 9 heads, plus masks
    assert reduce.chunk_rows(per_row * 5 + 1, batch=2, heads=9, keys=100, rows=50) == 5
    assert reduce.chunk_rows(per_row * 5 * 3, batch=2, heads=9, keys=100, rows=50, sinks=True) < 15


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_check_finite_finds_nan_and_inf_in_any_storage_dtype(dtype):
    from attnflow.tracers.driver import check_finite

    P = torch.full((3, 2, 4, 5, 6), 1 / 6, dtype=dtype)
    check_finite(P, [0, 1])
    for value, where in [(float("nan"), (2, 1, 3, 4, 5)), (float("inf"), (1, 0, 0, 0, 0)), (-float("inf"), (0, 1, 2, 2, 1))]:
        Q = P.clone()
        Q[where] = value
        with pytest.raises(af.errors.NonFiniteError, match=f"layer {[7, 9][where[1]]} \\(example {where[0]}\\)"):
            check_finite(Q, [7, 9])


def test_unmasked_causal_chunks_skip_later_keys(monkeypatch):
    """One unpadded prompt under sdpa: no mask, so each chunk computes only keys up to its last row."""
    from tiny_models import eager_copy, eager_patterns

    model = tiny_model("llama")
    prompt = prompts_ids((30,))[0]
    expected = eager_patterns(eager_copy(model), prompt)  # [layer, head, query, key]
    ends = []
    real = reduce.attention_pattern

    def spy(*args, key_end=None, **kw):
        ends.append(key_end)
        return real(*args, key_end=key_end, **kw)

    monkeypatch.setattr(reduce, "attention_pattern", spy)
    budget = 1 * 30 * (8 * 4 + 16) * 8  # 8 rows
    tr = af.trace(model, [prompt], dtype=torch.float32, progress=False, memory_budget=budget)
    assert ends == [8, 16, 24, 30] * 2
    assert (tr.patterns[0] - expected).abs().max() <= 1e-5
    mean = af.trace(model, [prompt], heads="mean", dtype=torch.float32, progress=False, memory_budget=budget)
    assert (mean.patterns[0, :, 0] - expected.mean(1)).abs().max() <= 1e-5
