"""AT2 learned head weights (Cohen-Wang et al. 2025, "Learning to Attribute with Attention"), fit to LOO drops.

Features (per example, recorded by the eval's heads="all" trace): for every layer l,
head h and document d, the attention from the answer rows to the document,

    x[l, h, d] = mean over answer rows i of Σ_{j in d} A[l, h, i, j]

The "at2" method scores document d by Σ_{l,h} w[l, h] · x[l, h, d] with non-negative
weights fit so that the scores predict the leave-one-out drops (`eval.loo`):
`scipy.optimize.nnls` on features and drops centred within each example (the fit
explains which document matters more, not how sensitive an example is overall; a
ranking is unchanged by the centring), with a ridge term λ‖w‖² chosen from `RIDGES`
by an inner cross-validation on the training examples only.

Held-out only: examples (sorted by index) are dealt into `FOLDS` folds, example i
into fold i % FOLDS; an example's "at2" scores come from weights fit on the other
folds, so its own drops never reach its scores (tests/test_eval_at2.py).  The
weights fit on every example are saved as `out/at2_heads.safetensors`
(tensor "heads" `[layer, head]`); `load_head_weights` reads them for `heads=W`.

    >>> rng = np.random.default_rng(0)
    >>> w_true = np.array([0.0, 2.0, 0.0, 0.5])                         # 4 features = [layer 2, head 2]
    >>> X = rng.random((30, 4)); groups = np.repeat(np.arange(10), 3)   # 10 examples x 3 documents
    >>> np.round(fit_weights(X, X @ w_true, groups, ridge=0.0), 6)
    array([0. , 2. , 0. , 0.5])
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from attnflow import _io
from attnflow.errors import DataError
from attnflow.eval import metrics as M

FOLDS = 5
RIDGES = (0.0, 1e-3, 1e-2, 1e-1, 1.0)  # λ relative to the mean squared (centred) feature
WEIGHTS_FILE = "at2_heads.safetensors"
FEATURE_SCHEMA = pa.schema(
    [
        ("index", pa.int64()),
        ("id", pa.string()),
        ("layers", pa.int64()),
        ("heads", pa.int64()),
        ("features", pa.list_(pa.float32())),  # [layer, head, paragraph], row-major
    ]
)


# --- features ------------------------------------------------------------------------------------
def example_features(tr, b: int, rows, spans) -> np.ndarray:
    """`[layer, head, document]` attention of example b's answer rows (unpadded) to each (start, end) span."""
    pad = tr.pad_offsets[b]
    qpos = tr.query_positions[b].tolist()
    q = [qpos.index(pad + r) for r in rows]  # every row is recorded in the eval's trace
    A = tr.patterns[b, :, :, q, :].float().mean(2)  # [layer, head, key]
    cum = torch.nn.functional.pad(A.double().cumsum(-1), (1, 0))  # [layer, head, key + 1]
    starts = torch.tensor([pad + s for s, _ in spans], dtype=torch.long)
    ends = torch.tensor([pad + e for _, e in spans], dtype=torch.long)
    return (cum[..., ends] - cum[..., starts]).cpu().numpy()  # [layer, head, document]


def feature_row(index: int, ex_id: str, x: np.ndarray) -> dict:
    L, H, _ = x.shape
    return {"index": index, "id": ex_id, "layers": L, "heads": H, "features": x.astype(np.float32).ravel().tolist()}


def feature_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=FEATURE_SCHEMA)


# --- the fit ----------------------------------------------------------------------------------------
def _centred(X: np.ndarray, y: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    Xc, yc = X.astype(np.float64).copy(), y.astype(np.float64).copy()
    for g in np.unique(groups):
        m = groups == g
        Xc[m] -= Xc[m].mean(0)
        yc[m] -= yc[m].mean()
    return Xc, yc


def fit_weights(X: np.ndarray, y: np.ndarray, groups: np.ndarray, ridge: float | None = None) -> np.ndarray:
    """Non-negative w minimising ‖Xc w - yc‖² + λ‖w‖² (Xc, yc centred per group), by `scipy.optimize.nnls`.

    `ridge` is λ relative to the mean squared centred feature; None chooses it from
    `RIDGES` by `choose_ridge` (an inner CV over these groups only).
    """
    from scipy.optimize import nnls

    if ridge is None:
        ridge = choose_ridge(X, y, groups)
    Xc, yc = _centred(X, y, groups)
    F = Xc.shape[1]
    lam = ridge * float((Xc**2).sum()) / max(F, 1)
    if lam > 0:
        Xc = np.vstack([Xc, np.sqrt(lam) * np.eye(F)])
        yc = np.concatenate([yc, np.zeros(F)])
    w, _ = nnls(Xc, yc, maxiter=50 * max(F, 1))
    return w


def fold_of(groups_sorted: np.ndarray, folds: int) -> dict[int, int]:
    """{group: fold}: the i-th group in sorted order goes to fold i % folds."""
    return {int(g): i % folds for i, g in enumerate(np.unique(groups_sorted))}


def choose_ridge(X: np.ndarray, y: np.ndarray, groups: np.ndarray, folds: int = FOLDS) -> float:
    """The λ of `RIDGES` with the least held-out squared error (centred) over `folds` folds of these groups."""
    ids = np.unique(groups)
    k = min(folds, len(ids))
    if k < 2:
        return 0.0
    fold = fold_of(ids, k)
    f = np.array([fold[int(g)] for g in groups])
    Xc, yc = _centred(X, y, groups)
    errors = []
    for ridge in RIDGES:
        err = 0.0
        for i in range(k):
            w = fit_weights(X[f != i], y[f != i], groups[f != i], ridge=ridge)
            err += float(((Xc[f == i] @ w - yc[f == i]) ** 2).sum())
        errors.append(err)
    return RIDGES[int(np.argmin(errors))]


def held_out_scores(X: np.ndarray, y: np.ndarray, groups: np.ndarray, folds: int = FOLDS) -> np.ndarray:
    """Each row's score X w from weights fit on the other folds' groups only (groups sorted, i-th in fold i % k)."""
    ids = np.unique(groups)
    k = min(folds, len(ids))
    fold = fold_of(ids, k)
    f = np.array([fold[int(g)] for g in groups])
    scores = np.full(len(y), np.nan)
    for i in range(k):
        w = fit_weights(X[f != i], y[f != i], groups[f != i])
        scores[f == i] = X[f == i] @ w
    return scores


# --- the report's rows --------------------------------------------------------------------------------
def with_at2(out: Path, examples: pa.Table, attribution: pa.Table, features: pa.Table | None, removals: pa.Table | None):
    """`attribution` with its "at2" rows (re)computed: held-out paragraph scores, every metric.

    Needs the features and the "loo" paragraph rows of at least 2 examples; writes
    `out/at2_heads.safetensors` (the fit on every example).  Returns (attribution, facts).
    """
    from attnflow.eval.loo import removal_drops
    from attnflow.eval.store import attribution_table, sort_attribution

    keep = np.array(attribution["method"].to_pylist(), dtype=object) != "at2"
    attribution = attribution.filter(pa.array(keep))
    if features is None or not features.num_rows:
        return attribution, {"reason": "no features recorded"}
    drops_of = {
        r["index"]: np.asarray(r["scores"], dtype=np.float64)
        for r in attribution.select(["index", "level", "method", "scores"]).to_pylist()
        if r["method"] == "loo" and r["level"] == "paragraph"
    }
    gold_of = dict(zip(examples["index"].to_pylist(), examples["gold_paragraphs"].to_pylist()))
    id_of = dict(zip(examples["index"].to_pylist(), examples["id"].to_pylist()))
    X, y, groups, shape = [], [], [], None
    for r in sorted(features.to_pylist(), key=lambda r: r["index"]):
        d = drops_of.get(r["index"])
        if d is None or np.isnan(d).any() or r["index"] not in gold_of:
            continue
        x = np.asarray(r["features"], dtype=np.float64).reshape(r["layers"], r["heads"], -1)
        if shape not in (None, x.shape[:2]):
            raise DataError(f"AT2 features of example {r['index']} have shape {x.shape[:2]}, others {shape}; one model per run")
        shape = x.shape[:2]
        X.append(x.reshape(-1, x.shape[-1]).T)  # [document, layer·head]
        y.append(d)
        groups.append(np.full(len(d), r["index"]))
    if len(X) < 2:
        return attribution, {"reason": f"AT2 needs LOO drops of 2 or more examples ({len(X)})"}
    X, y, groups = np.vstack(X), np.concatenate(y), np.concatenate(groups)
    scores = held_out_scores(X, y, groups)
    ridge = choose_ridge(X, y, groups)
    w = fit_weights(X, y, groups, ridge=ridge).reshape(shape)
    save_head_weights(Path(out) / WEIGHTS_FILE, w, {"examples": str(len(np.unique(groups))), "ridge": str(ridge)})
    removal = removal_drops(removals) if removals is not None else {}
    rows = []
    for index in np.unique(groups):
        m = groups == index
        s, gold = scores[m], np.asarray(gold_of[int(index)], bool)
        metrics = M.example_metrics(s, gold) | M.loo_metrics(s, y[m], removal.get(int(index), {}))
        rows.append({"index": int(index), "id": id_of[int(index)], "level": "paragraph", "method": "at2",
                     "scores": s.tolist()} | metrics)  # fmt: skip
    table = pa.concat_tables([attribution, attribution_table(rows)])
    facts = {"examples": int(len(np.unique(groups))), "folds": min(FOLDS, len(np.unique(groups))), "ridge": ridge,
             "nonzero": int((w > 0).sum()), "weights": int(w.size)}  # fmt: skip
    return sort_attribution(table), facts


def at2_line(facts: dict) -> str:
    if "reason" in facts:
        return f"at2: not fit ({facts['reason']})"
    return (
        f"at2: non-negative [layer, head] weights fit by scipy nnls to the LOO drops (features and drops centred per"
        f" example, ridge {facts['ridge']:g} by inner CV), {facts['folds']}-fold CV by example: held-out scores only;"
        f" the fit on all {facts['examples']} examples ({facts['nonzero']} of {facts['weights']} weights > 0) is {WEIGHTS_FILE}"
    )


# --- the weights file -----------------------------------------------------------------------------------
def save_head_weights(path: Path, w: np.ndarray, metadata: dict[str, str] | None = None) -> None:
    """`w [layer, head]` as safetensors tensor "heads" (float32), written to a temporary name and renamed."""
    from safetensors.torch import save_file

    with _io.atomic_path(Path(path)) as tmp:
        save_file({"heads": torch.as_tensor(np.asarray(w), dtype=torch.float32).contiguous()}, str(tmp), metadata=metadata)


def load_head_weights(path: str | Path, raw: bool = False) -> Tensor:
    """AT2 weights `[layer, head]` from a safetensors file, for `heads=W` of `attnflow.flow` and `attnflow.trace`.

    Composed flows weigh the heads within each layer (`flow.normalize_head_weights`), so
    every layer needs a positive weight: a layer the fit left at zero gets uniform weights
    (the plain head mean) unless `raw`, which returns the fit as saved.

        >>> save_head_weights(Path("w.safetensors"), np.array([[0.0, 2.0], [0.0, 0.0]]))
        >>> load_head_weights("w.safetensors")
        tensor([[0., 2.],
                [1., 1.]])
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise DataError(f"no head-weight file at {path}; pass the at2_heads.safetensors of an `attnflow eval` run")
    try:
        with safe_open(str(path), framework="pt") as f:
            if "heads" not in f.keys():
                raise DataError(f"{path} holds no 'heads' tensor; pass an at2_heads.safetensors file")
            w = f.get_tensor("heads").float()
    except DataError:
        raise
    except Exception as err:  # a damaged or foreign file
        raise DataError(f"cannot read head weights from {path} ({err}); pass an at2_heads.safetensors file") from None
    if w.ndim != 2 or not torch.isfinite(w).all() or (w < 0).any():
        raise DataError(f"{path}: head weights must be a finite, non-negative [layer, head] tensor (got {tuple(w.shape)})")
    if not raw:
        empty = w.sum(-1) == 0
        w[empty] = 1.0
    return w
