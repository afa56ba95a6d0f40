"""Attribution metrics against hand-computed values, ties included; answer EM/F1; bootstrap CIs."""

import math

import numpy as np
import pytest

from attnflow.eval import metrics as M

# Case A: a three-way tie at the top (0.4 at documents 0, 1, 3), gold = {1, 3}.
# Ranking, ties in document order: 0, 1, 3, 2, 4 -> gold at ranks 2 and 3.
A_SCORES = np.array([0.4, 0.4, 0.1, 0.4, 0.0])
A_GOLD = np.array([False, True, False, True, False])


def test_ranking_breaks_ties_by_document_order_and_puts_nan_last():
    assert M.ranking(A_SCORES).tolist() == [0, 1, 3, 2, 4]
    assert M.ranking(np.array([np.nan, 0.0, 1.0, 0.0])).tolist() == [2, 1, 3, 0]


@pytest.mark.parametrize(
    "k, precision, recall",
    [(1, 0.0, 0.0), (2, 1 / 2, 1 / 2), (3, 2 / 3, 1.0), (5, 2 / 5, 1.0), (10, 2 / 5, 1.0)],  # k=10 > n=5: / min(k, n)
)
def test_precision_recall_at_k_with_ties(k, precision, recall):
    assert M.precision_at_k(A_SCORES, A_GOLD, k) == pytest.approx(precision)
    assert M.recall_at_k(A_SCORES, A_GOLD, k) == pytest.approx(recall)


def test_mrr_ndcg_auroc_with_ties():
    assert M.mrr(A_SCORES, A_GOLD) == 0.5
    dcg = 1 / math.log2(3) + 1 / math.log2(4)  # gold at ranks 2 and 3
    idcg = 1 / math.log2(2) + 1 / math.log2(3)
    assert M.ndcg(A_SCORES, A_GOLD) == pytest.approx(dcg / idcg)
    # each gold 0.4 vs non-gold (0.4, 0.1, 0.0): 1/2 + 1 + 1 -> (2.5 + 2.5) / 6
    assert M.auroc(A_SCORES, A_GOLD) == pytest.approx(5 / 6)


def test_all_scores_tied():
    s, g = np.zeros(4), np.array([False, False, True, False])
    assert M.mrr(s, g) == pytest.approx(1 / 3)
    assert M.precision_at_k(s, g, 1) == 0.0 and M.recall_at_k(s, g, 3) == 1.0
    assert M.auroc(s, g) == 0.5  # every pair a tie
    assert M.ndcg(s, g) == pytest.approx(1 / math.log2(4))


def test_perfect_and_worst_rankings():
    s, g = np.array([0.9, 0.1, 0.8, 0.2]), np.array([True, False, True, False])
    assert M.auroc(s, g) == 1.0 and M.ndcg(s, g) == pytest.approx(1.0) and M.mrr(s, g) == 1.0
    assert M.precision_at_k(s, g, 2) == 1.0 and M.recall_at_k(s, g, 2) == 1.0
    assert M.auroc(-s, g) == 0.0
    assert M.ndcg(-s, g) == pytest.approx((1 / math.log2(4) + 1 / math.log2(5)) / (1 + 1 / math.log2(3)))


def test_undefined_metrics_are_nan():
    s = np.array([0.3, 0.2])
    assert math.isnan(M.auroc(s, np.array([True, True])))  # no negatives
    none = np.array([False, False])
    assert math.isnan(M.auroc(s, none)) and math.isnan(M.recall_at_k(s, none, 1))
    assert math.isnan(M.mrr(s, none)) and math.isnan(M.ndcg(s, none))
    assert M.precision_at_k(s, none, 1) == 0.0


def test_auroc_matches_a_pairwise_loop():
    rng = np.random.default_rng(1)
    for _ in range(20):
        s = rng.integers(0, 4, size=9).astype(float)  # many ties
        g = rng.random(9) < 0.4
        if g.all() or not g.any():
            continue
        pairs = [(1.0 if a > b else 0.5 if a == b else 0.0) for a in s[g] for b in s[~g]]
        assert M.auroc(s, g) == pytest.approx(sum(pairs) / len(pairs))


def test_example_metrics_names_and_values():
    m = M.example_metrics(A_SCORES, A_GOLD)
    assert list(m) == M.metric_names()
    assert m["precision@3"] == pytest.approx(2 / 3) and m["recall@2"] == 0.5 and m["mrr"] == 0.5


@pytest.mark.parametrize("n, g", [(1, 1), (2, 1), (3, 1), (4, 2), (5, 2), (5, 3), (6, 1), (4, 0)])
def test_random_expectation_equals_the_average_over_every_ranking(n, g):
    import itertools

    gold = np.arange(n) < g
    per_perm = [M.example_metrics(np.array(p, float), gold) for p in itertools.permutations(range(n))]
    got = M.random_expectation(n, g)
    assert list(got) == M.metric_names()
    for name in got:
        want = np.mean([m[name] for m in per_perm])
        assert (np.isnan(want) and np.isnan(got[name])) or got[name] == pytest.approx(want), name


def test_random_expectation_by_hand():
    r = M.random_expectation(3, 1)
    assert r["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3) and r["auroc"] == 0.5
    assert r["precision@1"] == pytest.approx(1 / 3) and r["recall@2"] == pytest.approx(2 / 3) and r["recall@5"] == 1.0
    assert r["ndcg"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(4)) / 3)


def test_bootstrap_ci_is_seeded_drops_nan_and_covers_the_mean():
    v = np.array([0.0, 1.0] * 50 + [np.nan])
    mean, lo, hi, n = M.bootstrap_ci(v)
    assert n == 100 and mean == 0.5
    assert M.bootstrap_ci(v) == (mean, lo, hi, n)  # same seed, same interval
    # normal approximation: 0.5 +- 1.96 * sqrt(0.25 / 100) = 0.5 +- 0.098
    assert lo == pytest.approx(0.402, abs=0.03) and hi == pytest.approx(0.598, abs=0.03)
    assert M.bootstrap_ci(np.full(7, 0.25))[:3] == (0.25, 0.25, 0.25)
    assert M.bootstrap_ci(np.array([np.nan]))[3] == 0


@pytest.mark.parametrize(
    "pred, truth, em, f1",
    [
        ("The Cat!", "cat", 1.0, 1.0),
        ("Chief of Protocol", "the chief protocol officer", 0.0, 2 / 3),
        ("yes", "no", 0.0, 0.0),
        ("  an   apple pie ", "apple-pie", 0.0, 0.0),  # punctuation removed, not split: "applepie"
        ("paris", "Paris.", 1.0, 1.0),
    ],
)
def test_squad_em_f1(pred, truth, em, f1):
    assert M.exact_match(pred, truth) == em
    assert M.f1_score(pred, truth) == pytest.approx(f1)


# --- against the LOO drops ---------------------------------------------------------------------------
def test_spearman_by_hand_with_ties():
    # x ranks 1, 2.5, 2.5, 4 (a tie), y ranks 4, 3, 1, 2; centred: (-1.5, 0, 0, 1.5) and (1.5, 0.5, -1.5, -0.5)
    # sum of products -2.25 - 0.75 = -3; sums of squares 4.5 and 5 -> -3 / sqrt(22.5)
    x, y = np.array([0.1, 0.4, 0.4, 0.9]), np.array([7.0, 5.0, -1.0, 2.0])
    assert M.spearman(x, y) == pytest.approx(-3 / np.sqrt(22.5))
    assert M.spearman(x, x * 3 + 1) == pytest.approx(1.0)
    assert np.isnan(M.spearman(np.ones(3), y[:3])) and np.isnan(M.spearman(x[:1], y[:1]))  # constant / one item
    assert np.isnan(M.spearman(np.array([np.nan, 1.0, 2.0]), y[:3]))
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 4, 9).astype(float), rng.random(9)
    assert M.spearman(a, b) == pytest.approx(spearmanr(a, b).statistic)


def test_drop_at_k_by_hand():
    drops = np.array([0.2, 3.0, 1.0, -0.5])
    removal = {(0,): 0.2, (1,): 3.0, (2,): 1.0, (3,): -0.5, (1, 2): 5.0, (0, 1): 2.5}
    # top-1 = doc 1 (tie 0.6/0.6 between docs 1 and 2 goes to the earlier), top-2 = {1, 2}
    got = M.loo_metrics(np.array([0.1, 0.6, 0.6, 0.0]), drops, removal)
    assert got["drop@1"] == 3.0 and got["drop@2"] == 5.0
    got = M.loo_metrics(np.array([0.9, 0.1, 0.0, 0.5]), drops, removal)  # top-2 {0, 3} was never removed
    assert got["drop@1"] == 0.2 and np.isnan(got["drop@2"])
    assert np.isnan(M.loo_metrics(np.array([np.nan] * 4), drops, removal)["drop@1"])  # a skipped method
    one = M.loo_metrics(np.array([1.0]), np.array([0.7]), {(0,): 0.7})  # one document: top-2 is that document
    assert one["drop@1"] == one["drop@2"] == 0.7 and np.isnan(one["spearman_loo"])


def test_random_loo_expectation_is_the_average_over_every_ranking():
    from itertools import combinations, permutations

    drops = np.array([0.2, 3.0, 1.0, -0.5])
    removal = {p: float(drops[list(p)].sum() + 0.1 * p[0]) for p in combinations(range(4), 2)}
    removal |= {(k,): float(d) for k, d in enumerate(drops)}
    per = [M.loo_metrics(np.array(order, dtype=float), drops, removal) for order in permutations(range(4))]
    want = {k: float(np.mean([p[k] for p in per])) for k in M.LOO_METRICS}
    got = M.random_loo_expectation(drops, removal)
    assert got == pytest.approx(want)
    del removal[(0, 1)]
    assert np.isnan(M.random_loo_expectation(drops, removal)["drop@2"])  # not every pair known, none drawn: unknown
    drawn = [(2, 3), (0, 2)]  # pairs drawn for the baseline: their mean drop estimates the expectation
    assert M.random_loo_expectation(drops, removal, drawn)["drop@2"] == pytest.approx((removal[(2, 3)] + removal[(0, 2)]) / 2)
    assert np.isnan(M.random_loo_expectation(drops, removal, [(0, 1)])["drop@2"])  # a drawn pair never removed
