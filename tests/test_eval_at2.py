"""AT2 head weights (eval/at2.py): the fit recovers known weights, cross-validation never scores an example with
weights its own drops helped fit, the features against a per-head loop, the weights file and heads=W."""

import numpy as np
import pytest
import torch

import attnflow as af
from attnflow import flow as F
from attnflow.errors import DataError
from attnflow.eval import at2


def synthetic(n_examples=12, docs=4, features=6, seed=0, noise=0.0):
    rng = np.random.default_rng(seed)
    w = np.array([0.0, 1.5, 0.0, 0.3, 2.0, 0.0])[:features]
    X = rng.random((n_examples * docs, features))
    groups = np.repeat(np.arange(n_examples) * 7 + 3, docs)  # indices need not be consecutive
    offsets = np.repeat(rng.normal(size=n_examples) * 5, docs)  # each example's own sensitivity
    y = X @ w + offsets + noise * rng.normal(size=len(X))
    return X, y, groups, w


def test_fit_recovers_known_nonnegative_weights():
    X, y, groups, w = synthetic()
    np.testing.assert_allclose(at2.fit_weights(X, y, groups, ridge=0.0), w, atol=1e-8)  # offsets are centred away
    got = at2.fit_weights(X, y, groups)  # ridge chosen by inner CV: exact data wants none
    assert at2.choose_ridge(X, y, groups) == 0.0
    np.testing.assert_allclose(got, w, atol=1e-8)
    neg = at2.fit_weights(X, X @ np.array([1.0, -2.0, 0, 0, 0, 0]), groups, ridge=0.0)
    assert (neg >= 0).all() and neg[1] == 0.0  # non-negative: a negative weight is clipped, not learned


def test_cross_validation_scores_only_held_out_examples():
    """An example's score never depends on its own drops (or its fold-mates'): change them, its scores stay."""
    X, y, groups, _ = synthetic(noise=0.5)
    base = at2.held_out_scores(X, y, groups)
    ids = np.unique(groups)
    fold = at2.fold_of(ids, at2.FOLDS)
    assert sorted(fold.values()) == sorted(i % at2.FOLDS for i in range(len(ids)))  # deterministic: i-th id, fold i % 5
    for target in ids[:3]:
        mates = [g for g in ids if fold[int(g)] == fold[int(target)]]
        y2 = y.copy()
        m = np.isin(groups, mates)
        y2[m] = np.random.default_rng(1).normal(size=m.sum()) * 100  # their drops, replaced by large noise
        again = at2.held_out_scores(X, y2, groups)
        np.testing.assert_array_equal(again[m], base[m])  # held out: unchanged
        assert not np.allclose(again[~m], base[~m])  # while the other folds' fits did see the change
    # and the scores are exactly those of a fit on the other folds
    f = np.array([fold[int(g)] for g in groups])
    w0 = at2.fit_weights(X[f != 0], y[f != 0], groups[f != 0])
    np.testing.assert_allclose(base[f == 0], X[f == 0] @ w0)


def test_features_match_a_per_head_loop():
    model = af.demo.load()
    tr = af.trace(model, ["doc1 : alice lives in paris .\ndoc2 : bob owns a cat .\nquestion : where ?\nanswer :",
                          "doc1 : bob owns a cat .\nquestion : who ?\nanswer :"], heads="all", dtype=torch.float32,
                  max_new_tokens=2, progress=False)  # fmt: skip
    for b in range(2):
        n = tr.prompt_lengths[b]
        rows, spans = [n - 1, n], [(1, 4), (4, 9)]
        x = at2.example_features(tr, b, rows, spans)
        pad = tr.pad_offsets[b]
        L, H = tr.patterns.shape[1:3]
        assert x.shape == (L, H, 2)
        for l in range(L):
            for h in range(H):
                for d, (s, e) in enumerate(spans):
                    want = np.mean([float(tr.patterns[b, l, h, pad + r, pad + s : pad + e].double().sum()) for r in rows])
                    assert x[l, h, d] == pytest.approx(want, abs=1e-6)


def test_with_at2_adds_held_out_paragraph_rows(tmp_path):
    from attnflow.eval.store import attribution_table, examples_table

    X, y, groups, _ = synthetic(n_examples=6, docs=3, features=4, noise=0.1)
    ids = np.unique(groups)
    feats = [at2.feature_row(int(i), f"e{i}", X[groups == i].T.reshape(2, 2, 3)) for i in ids]
    attribution = attribution_table(
        [{"index": int(i), "id": f"e{i}", "level": "paragraph", "method": "loo", "scores": y[groups == i].tolist()} for i in ids]
    )
    examples = examples_table([{"index": int(i), "id": f"e{i}", "status": "ok", "gold_paragraphs": [True, False, False]} for i in ids])
    table, facts = at2.with_at2(tmp_path, examples, attribution, at2.feature_table(feats), None)
    rows = [r for r in table.to_pylist() if r["method"] == "at2"]
    assert [r["index"] for r in rows] == ids.tolist() and {r["level"] for r in rows} == {"paragraph"}
    held = at2.held_out_scores(X.astype(np.float32).astype(np.float64), y, groups)
    np.testing.assert_allclose(np.concatenate([r["scores"] for r in rows]), held, rtol=1e-6)
    assert all(r["drop@2"] != r["drop@2"] for r in rows)  # no removal table: drop@2 unknown (NaN)
    assert facts["folds"] == 5 and (tmp_path / at2.WEIGHTS_FILE).is_file()
    again, _ = at2.with_at2(tmp_path, examples, table, at2.feature_table(feats), None)  # refit: replaced, not doubled
    assert again.num_rows == table.num_rows
    few, facts = at2.with_at2(tmp_path, examples, attribution, at2.feature_table(feats[:1]), None)
    assert "2 or more examples" in facts["reason"] and few.num_rows == attribution.num_rows


def test_weights_file_round_trip_and_heads_w(tmp_path):
    path = tmp_path / "w.safetensors"
    w = np.array([[0.0, 1.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0] * 8, [1.0] * 8, [0.5] + [0.0] * 7])  # demo: 4 x 8
    at2.save_head_weights(path, w)
    assert at2.load_head_weights(path, raw=True).tolist() == w.tolist()
    W = at2.load_head_weights(path)
    assert W[1].tolist() == [1.0] * 8 and W[0].tolist() == w[0].tolist()  # an empty layer falls back to the mean
    tr = af.trace(af.demo.load(), ["doc1 : alice lives in paris ."], heads="all", dtype=torch.float32, progress=False)
    got = F.rollout(tr.patterns, heads=W)
    A = tr.patterns.double()  # [batch, layer, head, query, key]
    Wn = W.double() / W.double().sum(-1, keepdim=True)
    R = torch.eye(A.shape[-1], dtype=torch.float64)
    for l in range(A.shape[1]):  # rollout, alpha 0.5, of the weighted head mix, written out
        mix = sum(Wn[l, h] * A[0, l, h] for h in range(A.shape[2]))
        R = (0.5 * mix + 0.5 * torch.eye(len(mix), dtype=torch.float64)) @ R
    torch.testing.assert_close(got[0].double(), R, atol=1e-5, rtol=1e-5)


def test_bad_weight_files_are_refused(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(DataError, match="no head-weight file"):
        at2.load_head_weights(tmp_path / "missing.safetensors")
    save_file({"other": torch.ones(2, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(DataError, match="no 'heads' tensor"):
        at2.load_head_weights(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DataError, match="cannot read head weights"):
        at2.load_head_weights(tmp_path / "junk.safetensors")
    save_file({"heads": -torch.ones(2, 2)}, str(tmp_path / "neg.safetensors"))
    with pytest.raises(DataError, match="non-negative"):
        at2.load_head_weights(tmp_path / "neg.safetensors")
