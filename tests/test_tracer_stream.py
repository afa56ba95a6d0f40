"""`trace(..., out=DIR)`: layers written to disk as they are recorded load exactly as `trace(...).save()` does.

The reference is the in-memory trace saved and loaded again (itself checked against eager
`output_attentions` in test_tracer_parity.py); every field must be equal, bit for bit.
"""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch
from test_parquet import assert_same
from tiny_models import prompts_ids, tiny_model, tiny_tokenizer

import attnflow as af
from attnflow import Span, codec
from attnflow.errors import DataError, NonFiniteError
from attnflow.tracers import hf

PROMPTS = prompts_ids((5, 9, 7))
SPANS = [[Span("doc", "document", 0, 3, 0, 10), Span("q", "question", 3, 5)], [], [Span("all", "prompt", 0, 7)]]


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


CASES = {
    "all-rows-fp16": dict(),
    "mean-fp32-layers": dict(heads="mean", layers=[0, -1], dtype=torch.float32),
    "listed-rows-bf16": dict(rows=[0, -1], dtype=torch.bfloat16),
    "weighted-completion": dict(
        rows="completion", completions=[[5, 6], [], [7]], heads=torch.tensor([[1.0, 2, 0, 1], [0, 0, 1, 0]])
    ),
    "generated-two-pass": dict(max_new_tokens=3, heads="max", one_pass=False),
    "generated-one-pass": dict(max_new_tokens=3, heads="all", norms=True),
    "generated-one-pass-mean": dict(max_new_tokens=4, heads="mean", dtype=torch.float32),
    "generated-one-pass-rows": dict(max_new_tokens=3, rows=[0, -1], norms=True),
    "norms": dict(norms=True, layers=[0, -1]),
    "norm-heads": dict(heads="norm", norms=True, dtype=torch.float32),
}


def same(a, b):
    assert_same(a, b)
    assert a.text == b.text


@pytest.mark.parametrize("batch_size", [2, 8])
@pytest.mark.parametrize("case", CASES)
def test_streamed_folder_loads_equal_to_saved(model, tmp_path, case, batch_size):
    kw = dict(spans=SPANS, progress=False, batch_size=batch_size, **CASES[case])
    saved = af.trace(model, PROMPTS, out=tmp_path / "stream", **kw)
    ref = af.trace(model, PROMPTS, **kw)
    assert isinstance(saved, af.SavedTrace) and saved.layers == ref.layers and saved.batch_size == 3
    same(saved.load(), af.AttentionTrace.load(ref.save(tmp_path / "ref")))
    files = lambda d: sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file())  # noqa: E731
    assert files(tmp_path / "stream") == files(tmp_path / "ref")  # the normal saved-trace layout
    for li, layer in enumerate(ref.layers):  # one layer at a time
        part = saved.load(layers=[layer])
        assert torch.equal(part.patterns[:, 0], ref.patterns[:, li])
        if ref.norms is not None:  # the norms of that layer only
            assert all(torch.equal(part.norms[k][:, 0], ref.norms[k][:, li]) for k in ref.norms)


def test_streamed_generation_matches_the_two_pass_trace(model, tmp_path):
    saved = af.trace(model, PROMPTS, max_new_tokens=4, heads="mean", dtype=torch.float32, out=tmp_path / "s", progress=False)
    two = af.trace(model, PROMPTS, max_new_tokens=4, heads="mean", dtype=torch.float32, one_pass=False, progress=False)
    back = saved.load()
    assert back.input_ids.equal(two.input_ids) and back.query_positions.equal(two.query_positions)
    assert (back.patterns - two.patterns).abs().max() <= 1e-6  # one pass vs two: the last bits of float32


def first_tokens(model):
    with torch.no_grad():
        return [int(model.generate(torch.tensor([p]), max_new_tokens=1, do_sample=False, pad_token_id=0)[0, -1]) for p in PROMPTS]


@pytest.mark.parametrize("heads", ["all", "mean"])
def test_streamed_generation_is_one_generation_and_cuts_at_eos(tmp_path, heads):
    """Prompt 0 stops at its first token in a left-padded batch: its rows after EOS are not written, the others run on."""
    m = tiny_model("llama")
    m.generation_config.eos_token_id = first_tokens(m)[0]
    widths = []
    handle = m.register_forward_pre_hook(lambda mod, a, kw: widths.append(kw["input_ids"].shape[1]), with_kwargs=True)
    kw = dict(max_new_tokens=4, heads=heads, norms=True, spans=SPANS, progress=False, batch_size=3)
    try:
        saved = af.trace(m, PROMPTS, out=tmp_path / "s", **kw)
        assert widths == [9, 1, 1, 1, 1]  # prefill, then one token per step: no forward over prompt + completion
    finally:
        handle.remove()
    one = af.trace(m, PROMPTS, **kw)
    assert len(one.tokens[0]) == len(PROMPTS[0]) + 1 and len(one.tokens[1]) == len(PROMPTS[1]) + 4
    same(saved.load(), af.AttentionTrace.load(one.save(tmp_path / "ref")))
    m.generation_config.eos_token_id = sorted(set(first_tokens(m)))  # every example stops at once: 1 step of 4
    early = af.trace(m, PROMPTS, out=tmp_path / "early", **kw)
    same(early.load(), af.AttentionTrace.load(af.trace(m, PROMPTS, **kw).save(tmp_path / "early-ref")))
    assert [len(t) for t in early.load(layers=[0]).tokens] == [len(p) + 1 for p in PROMPTS]
    table = pq.read_table(tmp_path / "s" / "attention" / "layer=0" / "part-0.parquet")
    keys = list(zip(table["example"].to_pylist(), table["head"].to_pylist(), table["query"].to_pylist()))
    assert keys == sorted(keys)  # prompt rows and new tokens' rows sorted into save()'s (example, head, query) order


@pytest.mark.parametrize("family", ["mistral", "gpt2"])
def test_streamed_generation_other_families(tmp_path, family):
    """A sliding-window cache (Mistral, window 4: a decode step sees the last keys only) and GPT-2's Conv1D attention."""
    m = tiny_model(family, eos_token_id=None)
    kw = dict(max_new_tokens=5, heads="all", norms=True, progress=False, batch_size=2)
    saved = af.trace(m, PROMPTS, out=tmp_path / "s", **kw)
    same(saved.load(), af.AttentionTrace.load(af.trace(m, PROMPTS, **kw).save(tmp_path / "r")))


def test_remote_streamed_generation_records_the_batch_then_writes(tmp_path):
    import nnsight

    m = tiny_model("llama")
    nn_model = nnsight.TransformersModel(m, tokenizer=tiny_tokenizer())
    kw = dict(max_new_tokens=3, heads="mean", progress=False, batch_size=2)
    saved = af.trace(nn_model, PROMPTS, remote="local", out=tmp_path / "s", **kw)
    same(saved.load(), af.AttentionTrace.load(af.trace(nn_model, PROMPTS, remote="local", **kw).save(tmp_path / "r")))


def test_each_layer_is_handed_over_during_the_forward(model, tmp_path, monkeypatch):
    """The backend calls the sink once per layer per batch with one reused buffer, never a [layer, ...] tensor."""
    seen = []
    real = codec.AttentionWriter.write

    def spy(self, li, P, qpos, lengths, **kw):
        seen.append((li, P.data_ptr(), P.ndim))
        real(self, li, P, qpos, lengths, **kw)

    monkeypatch.setattr(codec.AttentionWriter, "write", spy)
    af.trace(model, PROMPTS, out=tmp_path / "s", batch_size=2, progress=False)
    assert [li for li, _, _ in seen] == [0, 1, 0, 1] and {nd for _, _, nd in seen} == {4}
    assert seen[0][1] == seen[1][1]  # the batch's one layer buffer, reused for the next layer


def test_backend_without_streaming_records_the_batch_then_writes(model, tmp_path, monkeypatch):
    monkeypatch.setattr(hf.HFBackend, "streams", property(lambda self: False))
    saved = af.trace(model, PROMPTS, out=tmp_path / "s", batch_size=2, spans=SPANS, progress=False)
    same(saved.load(), af.AttentionTrace.load(af.trace(model, PROMPTS, batch_size=2, spans=SPANS, progress=False).save(tmp_path / "r")))


def test_overwrite_rules_as_save(model, tmp_path):
    out = tmp_path / "t"
    first = af.trace(model, PROMPTS, rows="last", out=out, progress=False)
    with pytest.raises(DataError, match="pass overwrite=True"):
        af.trace(model, PROMPTS, out=out, progress=False)
    assert first.load().patterns.shape[3] == 1  # untouched
    af.trace(model, PROMPTS[:1], out=out, overwrite=True, progress=False)
    assert af.AttentionTrace.load(out).batch_size == 1
    user = tmp_path / "thesis"
    user.mkdir()
    (user / "ch1.tex").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(DataError, match="holds files attnflow did not write"):
            af.trace(model, PROMPTS, out=user, overwrite=overwrite, progress=False)
    assert [p.name for p in user.iterdir()] == ["ch1.tex"]


def test_a_failure_mid_recording_leaves_nothing(tmp_path):
    from tiny_models import scale_qk

    broken = tiny_model("llama")
    scale_qk(broken, 1e30)  # q.k overflows: the first layer's pattern is NaN
    with pytest.raises(NonFiniteError, match="layer 0"):
        af.trace(broken, PROMPTS, out=tmp_path / "t", progress=False)
    assert list(tmp_path.iterdir()) == []  # no folder, no temporary left behind
    with pytest.raises(NonFiniteError, match="layer 0"):  # raised at prefill, inside the generation
        af.trace(broken, PROMPTS, out=tmp_path / "t", max_new_tokens=3, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_weights_after_the_query_when_causal(tmp_path):
    P = torch.tensor([[[[0.5, 0.5], [0.5, 0.5]]]])  # [example, head, query, key]; row 0 sees key 1
    w = codec.AttentionWriter(tmp_path, layers=[0], dtype=torch.float32, heads="all", causal=True)
    with pytest.raises(DataError, match="not causal"):
        w.write(0, P, torch.tensor([[0, 1]]), [2])
    w.close()
    loose = codec.AttentionWriter(tmp_path / "b", layers=[0], dtype=torch.float32, heads="all", causal=False)
    loose.write(0, P, torch.tensor([[0, 1]]), [2])
    assert loose.close() == ["attention/layer=0/part-0.parquet"]


def test_load_layers_refuses_unrecorded_ones(model, tmp_path):
    saved = af.trace(model, PROMPTS, layers=[1], tokenizer=tiny_tokenizer(), out=tmp_path / "t", progress=False)
    assert saved.load(layers=[1]).layers == [1]
    with pytest.raises(DataError, match=r"holds layers \[1\], not \[0\]"):
        saved.load(layers=[0])
