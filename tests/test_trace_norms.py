"""`trace(norms=True)` and `trace(heads="norm")`: value, attention-output and residual norms recorded in the forward.

References are independent of the tracer: a float64 eager run of the same tiny model, whose
values are recomputed from each layer's input (`input_layernorm` then `v_proj`) and multiplied
by the output projection's column block in an explicit per-head, per-key loop; the attention
module's output from a forward hook; the residual input from `output_hidden_states`.  The
measured rollout is checked against a plain-python loop over the recorded norms.
"""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import eager_copy, eager_run, prompts_ids, tiny_model, tiny_tokenizer

import attnflow as af
from attnflow.errors import BadArgumentError, DataError

PROMPTS = prompts_ids((6, 11))  # left padding: the first example is padded by 5


@pytest.fixture(scope="module")
def llama():
    """A tiny GQA llama (4 query heads over 2 kv heads) in float64, sdpa, and its eager twin."""
    hf = tiny_model("llama", seed=3).double()
    return hf, eager_copy(hf).double()


def reference_norms(ref, ids):
    """{value [layer, head, key], attn [layer, query], residual [layer, query]} of one prompt, float64, by loops."""
    cfg = ref.config
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = cfg.hidden_size // H
    res, outs = eager_run(ref, ids)
    value, attn, residual = [], [], []
    for l, layer in enumerate(ref.model.layers):
        x = res.hidden_states[l][0]  # [key, hidden]: the residual stream entering layer l
        with torch.no_grad():
            v = layer.self_attn.v_proj(layer.input_layernorm(x)).view(len(ids), Hkv, d)
        W_O = layer.self_attn.o_proj.weight.detach()  # [hidden, H·d]
        value.append(
            [[float(torch.linalg.vector_norm(W_O[:, h * d : (h + 1) * d] @ v[j, h // (H // Hkv)])) for j in range(len(ids))]
             for h in range(H)]
        )
        attn.append([float(outs[l][i].norm()) for i in range(len(ids))])
        residual.append([float(x[i].norm()) for i in range(len(ids))])
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in (("value", value), ("attn", attn), ("residual", residual))}


def check_against_reference(tr, ref, prompts, rtol=1e-5):
    for b, ids in enumerate(prompts):
        one = tr.item(b)
        want = reference_norms(ref, ids)
        for k in ("value", "attn", "residual"):
            got = one.norms[k][0].double()
            torch.testing.assert_close(got, want[k], rtol=rtol, atol=1e-7, msg=lambda m, k=k, b=b: f"{k} of example {b}: {m}")
        pad = tr.pad_offsets[b]
        assert tr.norms["value"][b, ..., :pad].abs().sum() == 0 and tr.norms["attn"][b, :, :pad].abs().sum() == 0


def test_recorded_norms_match_a_per_head_loop_and_hooks(llama):
    hf, ref = llama
    tr = af.trace(hf, PROMPTS, norms=True, dtype=torch.float32, progress=False)
    assert tr.norms["value"].shape == (2, 2, 4, 11) and tr.norms["attn"].shape == (2, 2, 11)
    assert all(t.dtype == torch.float32 for t in tr.norms.values())
    check_against_reference(tr, ref, PROMPTS)
    # the heads differ (GQA pairs share values but not W_O blocks): a wrong head order would show
    v = tr.norms["value"][1, 0]
    assert (v[0] - v[1]).abs().max() > 1e-3 and (v[0] - v[2]).abs().max() > 1e-3
    assert tr.settings["norms"] is True and af.trace(hf, PROMPTS, progress=False).norms is None


def test_rows_layers_and_dtype_leave_the_norms_alone(llama):
    hf, _ = llama
    full = af.trace(hf, PROMPTS, norms=True, dtype=torch.float32, progress=False)
    some = af.trace(hf, PROMPTS, norms=True, rows="last", layers=[-1], heads="mean", dtype=torch.float16,
                    memory_budget=1, batch_size=1, progress=False)
    for k in full.norms:
        torch.testing.assert_close(some.norms[k], full.norms[k][:, 1:], rtol=0, atol=0)


def test_heads_norm_in_trace_is_flow_reduce_heads_on_recorded_norms(llama):
    hf, _ = llama
    full = af.trace(hf, PROMPTS, norms=True, dtype=torch.float64, progress=False)
    want = af.flow.reduce_heads(full.patterns, "norm", value_norms=full.norms["value"])  # [batch, layer, 1, q, k]
    got = af.trace(hf, PROMPTS, heads="norm", dtype=torch.float64, memory_budget=1, progress=False)
    assert got.heads == "norm" and got.norms is None and got.patterns.shape == (2, 2, 1, 11, 11)
    torch.testing.assert_close(got.patterns, want, rtol=1e-6, atol=1e-7)
    assert (got.patterns - af.flow.reduce_heads(full.patterns, "mean")).abs().max() > 1e-3  # not the plain mean
    last = af.trace(hf, PROMPTS, heads="norm", rows="last", dtype=torch.float64, progress=False)
    torch.testing.assert_close(last.patterns, want[..., -1:, :], rtol=1e-6, atol=1e-7)
    real = got.patterns.sum(-1)[got.query_positions.unsqueeze(1).unsqueeze(1).expand_as(got.patterns.sum(-1)) >= 0]
    torch.testing.assert_close(real, torch.ones_like(real))  # rows renormalised


def plain_measured_rollout(A, attn, residual):
    """R = Â_L ··· Â_1 with Â_l = rownorm(w·Ā_l + (1-w)·I), w_i = a_i / (a_i + x_i), Ā_l the head mean: lists only."""
    L, H, N = len(A), len(A[0]), len(A[0][0])
    R = [[float(i == j) for j in range(N)] for i in range(N)]
    for l in range(L):
        mixed = []
        for i in range(N):
            w = attn[l][i] / (attn[l][i] + residual[l][i])
            row = [w * sum(A[l][h][i][j] for h in range(H)) / H + (1 - w) * (i == j) for j in range(N)]
            mixed.append([r / sum(row) for r in row])
        R = [[sum(mixed[i][m] * R[m][j] for m in range(N)) for j in range(N)] for i in range(N)]
    return torch.tensor(R, dtype=torch.float64)


def test_measured_rollout_on_recorded_norms_matches_a_plain_loop(llama):
    hf, _ = llama
    tr = af.trace(hf, PROMPTS, norms=True, dtype=torch.float64, progress=False)
    batched = af.flow.measured_rollout(tr.patterns, tr.norms["attn"], tr.norms["residual"])
    for b in range(2):
        one = tr.item(b)
        want = plain_measured_rollout(one.patterns[0].tolist(), one.norms["attn"][0].tolist(), one.norms["residual"][0].tolist())
        got = af.flow.compose(one.patterns, "rollout_measured", attn_norms=one.norms["attn"], residual_norms=one.norms["residual"])
        torch.testing.assert_close(got[0], want, rtol=1e-6, atol=1e-9)
        pad = tr.pad_offsets[b]
        torch.testing.assert_close(batched[b, pad:, pad:], want, rtol=1e-6, atol=1e-9)  # padding is neutral
    assert (batched - af.flow.rollout(tr.patterns, alpha=0.5)).abs().max() > 1e-3  # the measured weights matter


@pytest.mark.parametrize("kwargs", [dict(), dict(rows="completion", heads="norm"), dict(rows=[0, -1], heads="mean")],
                         ids=["all", "completion-norm", "rows-mean"])
def test_generation_records_norms_of_every_position(llama, kwargs):
    hf, ref = llama
    kw = dict(max_new_tokens=4, norms=True, dtype=torch.float64, progress=False, **kwargs)
    one = af.trace(hf, PROMPTS, **kw)
    two = af.trace(hf, PROMPTS, one_pass=False, **kw)
    assert all(n > p for n, p in zip(one.lengths, one.prompt_lengths))  # tokens were generated
    assert one.input_ids.tolist() == two.input_ids.tolist()
    torch.testing.assert_close(one.patterns, two.patterns, rtol=1e-6, atol=1e-7)
    for k in one.norms:
        torch.testing.assert_close(one.norms[k], two.norms[k], rtol=1e-6, atol=1e-7)
    seqs = [one.input_ids[b, one.pad_offsets[b] :].tolist() for b in range(2)]
    check_against_reference(one, ref, seqs)  # generated tokens' values, residuals and outputs included


def test_teacher_forcing_float16_all_heads_with_left_padding(llama):
    """What the evaluation runs: heads="all", float16 patterns, completions=, a left-padded batch."""
    hf, ref = llama
    completions = [[5, 6, 7], [8, 9]]
    tr = af.trace(hf, PROMPTS, completions=completions, heads="all", norms=True, dtype=torch.float16, progress=False)
    assert tr.patterns.dtype == torch.float16 and tr.norms["value"].dtype == torch.float32
    assert tr.patterns.shape == (2, 2, 4, 13, 13) and tr.prompt_lengths == [6, 11]
    check_against_reference(tr, ref, [p + c for p, c in zip(PROMPTS, completions)])


def test_gpt2_conv1d_projection(tmp_path):
    """GPT-2's c_proj is a Conv1D ([heads·d, hidden]): head h is a row block."""
    hf = tiny_model("gpt2", seed=1).double()
    ids = PROMPTS[1]
    tr = af.trace(hf, [ids], norms=True, dtype=torch.float64, progress=False)
    with torch.no_grad():
        out = hf(torch.tensor([ids]), output_hidden_states=True)
    H, hidden = hf.config.n_head, hf.config.n_embd
    d = hidden // H
    for l, block in enumerate(hf.transformer.h):
        with torch.no_grad():
            v = block.attn.c_attn(block.ln_1(out.hidden_states[l][0]))[:, 2 * hidden :].view(len(ids), H, d)
        W = block.attn.c_proj.weight.detach()  # [H·d, hidden]
        want = torch.tensor([[float((v[j, h] @ W[h * d : (h + 1) * d]).norm()) for j in range(len(ids))] for h in range(H)])
        torch.testing.assert_close(tr.norms["value"][0, l].double(), want.double(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(tr.norms["residual"][0, l].double(), out.hidden_states[l][0].norm(dim=-1), rtol=1e-5, atol=1e-7)


def test_save_load_round_trip_and_damage(llama, tmp_path):
    hf, _ = llama
    tok = tiny_tokenizer()
    tr = af.trace(hf, ["the cat sat on the mat", "bob lives in paris"], tokenizer=tok, norms=True, heads="norm",
                  dtype=torch.float32, progress=False)
    tr.save(tmp_path / "t")
    back = af.AttentionTrace.load(tmp_path / "t")
    assert back.heads == "norm" and torch.equal(back.patterns, tr.patterns)
    for k in tr.norms:
        assert torch.equal(back.norms[k], tr.norms[k])
    assert torch.equal(back.item(1).norms["value"], tr.item(1).norms["value"])
    plain = af.trace(hf, PROMPTS, progress=False)  # a trace without norms saves and loads as before
    plain.save(tmp_path / "plain")
    assert af.AttentionTrace.load(tmp_path / "plain").norms is None
    assert not (tmp_path / "plain" / "norms").exists()
    # a changed norms file fails its sha256; a missing one is named
    f = tmp_path / "t" / "norms" / "part-0.parquet"
    import pyarrow.parquet as pq

    t = pq.read_table(f)
    pq.write_table(t.slice(1), f)
    with pytest.raises(DataError, match="norms"):
        af.AttentionTrace.load(tmp_path / "t")
    f.unlink()
    f.parent.rmdir()
    with pytest.raises(DataError, match="no norms table"):
        af.AttentionTrace.load(tmp_path / "t")


def test_bad_norms_arguments(llama):
    hf, _ = llama
    with pytest.raises(BadArgumentError, match="norms="):
        af.TraceOptions(norms="yes")
    tr = af.trace(hf, PROMPTS, norms=True, dtype=torch.float32, progress=False)
    with pytest.raises(af.errors.ShapeError, match="norms"):
        af.AttentionTrace(**{**tr.__dict__, "norms": {"value": tr.norms["value"]}})
    assert math.isfinite(float(tr.norms["value"].sum()))


def test_cli_trace_heads_norm_with_norms(tmp_path):
    from attnflow.cli import main as cli

    tiny_model("llama", seed=3).save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    args = ["trace", str(tmp_path / "m"), "--prompt", "the cat sat on the mat", "--heads", "norm", "--norms",
            "--dtype", "float32", "--no-progress", "--out", str(tmp_path / "t")]
    assert cli(args) == 0
    tr = af.AttentionTrace.load(tmp_path / "t")
    assert tr.heads == "norm" and tr.settings["norms"] is True
    want = af.flow.reduce_heads(
        af.trace(af.load(tmp_path / "m"), "the cat sat on the mat", dtype=torch.float32, progress=False).patterns,
        "norm", value_norms=tr.norms["value"],
    )
    torch.testing.assert_close(tr.patterns, want.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["qwen2", "mistral", "gemma2", "phi3", "gpt_neox"])
def test_other_families_residual_and_output_norms(family):
    """The residual input is the layer's hidden-state input, the output the attention module's; and
    ‖a_i‖ <= Σ_h Σ_j α^h_ij·‖W_O^h v^h_j‖ + ‖bias‖ (the triangle inequality on a_i = Σ α·W_O v + b)."""
    import nnsight

    from attnflow.tracers.hf import attention_sites

    hf = tiny_model(family, seed=2).double()
    ids = PROMPTS[1]
    tr = af.trace(hf, [ids], norms=True, dtype=torch.float64, progress=False)
    sites = attention_sites(nnsight.NNsight(hf), hf)
    outs = {}
    hooks = [hf.get_submodule(s.path).register_forward_hook(lambda m, a, o, l=l: outs.__setitem__(l, o[0][0]))
             for l, s in enumerate(sites)]
    try:
        with torch.no_grad():
            res = hf(torch.tensor([ids]), output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    for l, s in enumerate(sites):
        torch.testing.assert_close(tr.norms["residual"][0, l].double(), res.hidden_states[l][0].norm(dim=-1), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(tr.norms["attn"][0, l].double(), outs[l].norm(dim=-1), rtol=1e-5, atol=1e-7)
        module = hf.get_submodule(s.path)
        proj = next(getattr(module, n) for n in ("o_proj", "dense", "out_proj", "c_proj") if hasattr(module, n))
        bias = 0.0 if proj.bias is None else float(proj.bias.detach().norm())
        bound = torch.einsum("hqk,hk->q", tr.patterns[0, l].double(), tr.norms["value"][0, l].double()) + bias
        assert (tr.norms["attn"][0, l].double() <= bound * (1 + 1e-5)).all()
        assert (tr.norms["value"][0, l] > 0).all()


def test_attribution_reads_the_recorded_norms(llama):
    """flow_rows / attribute take heads="norm" and method="rollout_measured" from `trace.norms` (no arguments)."""
    from attnflow.attribution import flow_rows

    tr = af.trace(llama[0], PROMPTS, norms=True, dtype=torch.float32, progress=False)
    mask = tr.attention_mask
    measured = af.flow.compose(tr.patterns, "rollout_measured", attn_norms=tr.norms["attn"],
                               residual_norms=tr.norms["residual"], key_mask=mask)  # fmt: skip
    torch.testing.assert_close(flow_rows(tr, "rollout_measured"), measured)
    normed = af.flow.total_attention(tr.patterns, heads="norm", value_norms=tr.norms["value"], key_mask=mask)
    torch.testing.assert_close(flow_rows(tr, "sum", heads="norm"), normed)
    assert not torch.allclose(flow_rows(tr, "sum"), normed)  # the weighting changes the result
    table = af.attribute(tr, method="rollout_measured", sources="tokens", targets=[-1], exclude_keys=())
    assert abs(sum(table["score"].to_pylist()[: tr.lengths[0]]) - 1) < 1e-5
    bare = af.trace(llama[0], PROMPTS, dtype=torch.float32, progress=False)
    for kw in (dict(method="rollout_measured"), dict(method="sum", heads="norm")):
        with pytest.raises(BadArgumentError, match="norms=True"):
            flow_rows(bare, **kw)
