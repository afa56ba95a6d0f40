"""Ranking metrics for attribution against gold supporting items, answer EM/F1, bootstrap CIs.

Every ranking metric takes `scores` (one float per candidate: sentence or
paragraph, in document order) and `gold` (one bool per candidate) of one example.

Tie handling (fixed, so numbers are reproducible):

* rankings (precision@k, recall@k, MRR, nDCG) sort by score, descending, and break
  ties by document order: of two candidates with equal scores the earlier one
  ranks higher (a stable sort).  NaN scores rank last.
* AUROC is the Mann-Whitney probability that a gold candidate outscores a
  non-gold one, counting a tie as 1/2; it is NaN when every candidate or no
  candidate is gold.
* precision@k divides by min(k, n) when there are only n < k candidates (the
  demo task has 3-8 documents), so a perfect ranking always scores 1.

    >>> scores, gold = np.array([0.1, 0.5, 0.5, 0.2]), np.array([0, 0, 1, 1], bool)
    >>> ranking(scores)                  # tie between 1 and 2 -> document order
    array([1, 2, 3, 0])
    >>> precision_at_k(scores, gold, 2), recall_at_k(scores, gold, 2), mrr(scores, gold)
    (0.5, 0.5, 0.5)
    >>> auroc(scores, gold)              # pairs (2,0) 1, (2,1) 1/2, (3,0) 1, (3,1) 0
    0.625
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

import numpy as np

KS = (1, 2, 3, 5, 10)


def ranking(scores: np.ndarray) -> np.ndarray:
    """Candidate indices from best to worst; ties keep document order, NaN ranks last."""
    s = np.asarray(scores, dtype=np.float64)
    key = np.where(np.isnan(s), np.inf, -s)
    return np.argsort(key, kind="stable")


def _hits(scores: np.ndarray, gold: np.ndarray, k: int) -> int:
    return int(np.asarray(gold, bool)[ranking(scores)[:k]].sum())


def precision_at_k(scores: np.ndarray, gold: np.ndarray, k: int) -> float:
    """|top_k ∩ S| / min(k, n)."""
    n = len(scores)
    return _hits(scores, gold, k) / min(k, n) if n else float("nan")


def recall_at_k(scores: np.ndarray, gold: np.ndarray, k: int) -> float:
    """|top_k ∩ S| / |S|; NaN without gold."""
    n_gold = int(np.asarray(gold, bool).sum())
    return _hits(scores, gold, k) / n_gold if n_gold else float("nan")


def mrr(scores: np.ndarray, gold: np.ndarray) -> float:
    """1 / rank of the best-ranked gold candidate (ranks from 1); NaN without gold."""
    g = np.asarray(gold, bool)[ranking(scores)]
    return 1.0 / (int(np.argmax(g)) + 1) if g.any() else float("nan")


def ndcg(scores: np.ndarray, gold: np.ndarray) -> float:
    """Binary-relevance nDCG over the whole ranking: Σ_gold 1/log2(rank+1) / Σ_{r<=|S|} 1/log2(r+1)."""
    g = np.asarray(gold, bool)[ranking(scores)]
    if not g.any():
        return float("nan")
    discount = 1.0 / np.log2(np.arange(2, len(g) + 2))
    return float((discount * g).sum() / discount[: int(g.sum())].sum())


def auroc(scores: np.ndarray, gold: np.ndarray) -> float:
    """P(score of a gold candidate > score of a non-gold one), ties counted 1/2."""
    s = np.asarray(scores, dtype=np.float64)
    g = np.asarray(gold, bool)
    pos, neg = s[g], s[~g]
    if not len(pos) or not len(neg):
        return float("nan")
    diff = pos[:, None] - neg[None, :]  # [gold, non-gold]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def metric_names(ks: tuple[int, ...] = KS) -> list[str]:
    """Column names of `example_metrics`, in order."""
    return [f"precision@{k}" for k in ks] + [f"recall@{k}" for k in ks] + ["mrr", "ndcg", "auroc"]


def example_metrics(scores: np.ndarray, gold: np.ndarray, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """Every metric of one example: precision@k and recall@k for each k, MRR, nDCG, AUROC.

    >>> example_metrics(np.array([3.0, 1.0, 2.0]), np.array([0, 0, 1], bool), ks=(1,))
    {'precision@1': 0.0, 'recall@1': 0.0, 'mrr': 0.5, 'ndcg': 0.6309..., 'auroc': 0.5}
    """
    out = {f"precision@{k}": precision_at_k(scores, gold, k) for k in ks}
    out |= {f"recall@{k}": recall_at_k(scores, gold, k) for k in ks}
    out |= {"mrr": mrr(scores, gold), "ndcg": ndcg(scores, gold), "auroc": auroc(scores, gold)}
    return out


# --- against the leave-one-out ground truth (`eval.loo`) ---------------------------------
LOO_METRICS = ("spearman_loo", "drop@1", "drop@2")


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation: Pearson's r of the average ranks (ties share their mean rank).

    NaN when either side is constant (no ranking to compare) or has a NaN.

    >>> spearman(np.array([1.0, 2.0, 2.0, 4.0]), np.array([0.1, 0.3, 0.2, 0.4]))   # ranks 1, 2.5, 2.5, 4 vs 1, 3, 2, 4
    0.9486832980505138
    """
    from scipy.stats import rankdata

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 2 or np.isnan(x).any() or np.isnan(y).any() or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    rx, ry = rankdata(x) - (len(x) + 1) / 2, rankdata(y) - (len(y) + 1) / 2  # centred ranks
    return float((rx * ry).sum() / np.sqrt((rx**2).sum() * (ry**2).sum()))


def top_set(scores: np.ndarray, k: int) -> tuple[int, ...] | None:
    """The top min(k, n) candidates under `ranking` (ties by document order), sorted; None when a score is NaN.

    >>> top_set(np.array([0.2, 0.5, 0.5]), 2), top_set(np.array([np.nan, 1.0]), 1)
    ((1, 2), None)
    """
    s = np.asarray(scores, dtype=np.float64)
    if not len(s) or np.isnan(s).any():
        return None
    return tuple(sorted(int(i) for i in ranking(s)[:k]))


def loo_metrics(scores: np.ndarray, drops: np.ndarray, removal_drops: dict[tuple[int, ...], float]) -> dict[str, float]:
    """`spearman_loo` (with the leave-one-out drops) and `drop@k` (the answer's log-prob drop when the method's
    top-k candidates are removed together, looked up in `removal_drops`: {sorted removed set: drop}; NaN if absent).

    >>> drops = np.array([0.5, 2.0, -0.1])
    >>> loo_metrics(np.array([0.1, 0.7, 0.2]), drops, {(0,): 0.5, (1,): 2.0, (2,): -0.1, (1, 2): 2.5})
    {'spearman_loo': 0.5, 'drop@1': 2.0, 'drop@2': 2.5}
    """
    out = {"spearman_loo": spearman(scores, drops)}
    for k in (1, 2):
        top = top_set(scores, k)
        out[f"drop@{k}"] = float(removal_drops.get(top, float("nan"))) if top is not None else float("nan")
    return out


def random_loo_expectation(
    drops: np.ndarray, removal_drops: dict[tuple[int, ...], float], sampled: Sequence[tuple[int, int]] = ()
) -> dict[str, float]:
    """Expectations of `loo_metrics` for a uniformly random ranking: Spearman 0 (NaN for constant drops),
    drop@1 = the mean LOO drop, drop@2 = the mean over every pair, exact when every pair's drop is given;
    otherwise the mean over the `sampled` pairs (drawn uniformly, so an unbiased estimate; NaN with none).

    >>> random_loo_expectation(np.array([1.0, 2.0, 3.0]), {(0, 1): 2.0, (0, 2): 4.0, (1, 2): 6.0})
    {'spearman_loo': 0.0, 'drop@1': 2.0, 'drop@2': 4.0}
    >>> random_loo_expectation(np.array([1.0, 2.0, 3.0]), {(0, 2): 4.0, (1, 2): 6.0}, sampled=[(1, 2)])["drop@2"]
    6.0
    """
    from itertools import combinations

    d = np.asarray(drops, dtype=np.float64)
    nan = float("nan")
    if not len(d) or np.isnan(d).any():
        return dict.fromkeys(LOO_METRICS, nan)
    pairs = [removal_drops.get(p) for p in combinations(range(len(d)), 2)] if len(d) > 1 else [float(d[0])]
    if any(p is None for p in pairs):
        pairs = [removal_drops.get(tuple(sorted(p))) for p in sampled]
    return {
        "spearman_loo": 0.0 if np.ptp(d) > 0 else nan,
        "drop@1": float(d.mean()),
        "drop@2": float(np.mean(pairs)) if pairs and all(p is not None for p in pairs) else nan,
    }


def random_expectation(n: int, n_gold: int, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """Exact expected `example_metrics` of a uniformly random ranking of n candidates, n_gold of them gold.

    precision@k = g/n, recall@k = min(k, n)/n, AUROC = 1/2,
    MRR = Σ_r P(first gold at rank r)/r with P = C(n-r, g-1)/C(n, g),
    nDCG = (g/n)·Σ_{r<=n} 1/log2(r+1) / Σ_{r<=g} 1/log2(r+1).

    >>> random_expectation(3, 1, ks=(1,))["mrr"]      # (1 + 1/2 + 1/3) / 3
    0.611111111111111
    """
    from math import comb

    g = n_gold
    nan = float("nan")
    out = {f"precision@{k}": g / n if n else nan for k in ks}
    out |= {f"recall@{k}": min(k, n) / n if g else nan for k in ks}
    if not g:
        return out | {"mrr": nan, "ndcg": nan, "auroc": nan}
    first = sum(comb(n - r, g - 1) / r for r in range(1, n - g + 2)) / comb(n, g)
    discount = 1.0 / np.log2(np.arange(2, n + 2))
    ndcg_ = float(g / n * discount.sum() / discount[:g].sum())
    return out | {"mrr": first, "ndcg": ndcg_, "auroc": 0.5 if g < n else nan}


def random_all_at_k(n: int, n_gold: int, k: int) -> float:
    """Exact P(every gold candidate ranks in the top k) for a uniformly random ranking: C(n-g, k-g) / C(n, k).

    The observed counterpart is `recall_at_k(scores, gold, k) == 1`.

    >>> random_all_at_k(5, 1, 2), random_all_at_k(5, 2, 2), random_all_at_k(2, 2, 2)   # 2/5, 1/C(5,2), all fit
    (0.4, 0.1, 1.0)
    """
    from math import comb

    k = min(k, n)
    return comb(n - n_gold, k - n_gold) / comb(n, k) if n_gold <= k else 0.0


def bootstrap_ci(
    values: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float, int]:
    """(mean, low, high, n) of the per-example `values`: a percentile bootstrap over examples.

    NaN values (an undefined metric, e.g. AUROC with every candidate gold) are
    dropped first; `n` counts the rest.  The same seed gives the same interval.

    >>> bootstrap_ci(np.array([0.0, 1.0, 1.0, 1.0]))   # doctest: +SKIP
    (0.75, 0.25, 1.0, 4)
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if not len(v):
        return float("nan"), float("nan"), float("nan"), 0
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(axis=1)
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(v.mean()), float(lo), float(hi), len(v)


# --- answers (SQuAD v1.1 evaluation script's normalisation) ---------------------------
def normalize_answer(s: str) -> str:
    """Lower case, drop punctuation and the articles a/an/the, collapse whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction: str, truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(truth))


def f1_score(prediction: str, truth: str) -> float:
    """Token-level F1 of the normalised answers (both empty -> 1)."""
    p, t = normalize_answer(prediction).split(), normalize_answer(truth).split()
    if not p or not t:
        return float(p == t)
    common = sum((Counter(p) & Counter(t)).values())
    if not common:
        return 0.0
    precision, recall = common / len(p), common / len(t)
    return 2 * precision * recall / (precision + recall)
