"""Leave-one-out ablation (ContextCite's LOO baseline): the ground truth the attention methods are measured against.

For a removed set R of documents (paragraphs; sentences with `loo_sentences`),

    drop(R) = log p(answer | prompt) - log p(answer | prompt without R's tokens)

where log p(answer) is the sum of the answer span's token log-probabilities under
teacher forcing (teacher mode: the gold answer; generate mode: the model's own
generated answer span, `batch.read_answer`).  The "loo" method scores each document
by drop({k}); every attention method gains `spearman_loo` (its document scores
against these drops) and `drop@k` (the drop when its top-k documents are removed
together; `metrics.loo_metrics`).

Exact and cheap (`AnswerScorer`):

* one forward of the full sequence (prompt + completion up to the answer's last token)
  keeps the KV cache.  Removing ranges whose first token is s leaves tokens 0..s-1
  and their positions unchanged, so the cache cropped to s *is* the shortened
  prompt's prefix cache; only the kept tokens after s are forwarded, at positions
  s, s+1, ..., which equals a fresh forward of the shortened sequence
  (tests/test_eval_loo.py, 1e-4 in log-prob).  Models whose cache keeps a sliding
  window (Mistral, Gemma 2) cannot be cropped: they get fresh forwards (same result,
  more work);
* logits only at the answer rows (`logits_to_keep`): never `[seq, vocab]`;
* the HF module under the nnsight wrapper, `torch.no_grad()`, nothing recorded.

A pair of documents is removed together in one forward; pairs are cached by the
removed set.  `config.pair_mode` "all" removes every pair (the random baseline's
drop@2 is then an exact expectation, and AT2's drop@2 is known); "methods" only the
distinct top-2 pairs of the methods of the batch (and LOO's own), plus `RANDOM_PAIRS`
pairs drawn uniformly, whose mean drop is the random baseline's drop@2 (an unbiased
estimate; AT2's weights are fit after the run, so its top-2 pair may be missing: '-').

    >>> from attnflow.eval.datasets import demo_examples
    >>> from attnflow.eval.jobs import prepare
    >>> job, = prepare(demo_examples(1, seed=0), tokenizer, RunConfig(task="demo", mode="teacher"), None)
    >>> ids = torch.tensor(job.prompt.input_ids + job.completion)      # prompt + the forced gold answer
    >>> P = len(job.prompt)
    >>> scorer = AnswerScorer(model, ids, targets=range(P, len(ids)))   # score the answer's tokens
    >>> round(scorer.full, 3), job.example.answer
    (-0.007, 'madrid')
    >>> [round(scorer.full - scorer.logprob([(s.start, s.end)]), 2) for s in job.prompt.paragraph_spans]
    [-0.01, 5.18, -0.01, 0.0, 0.01]
    >>> job.prompt.gold_paragraphs                                     # only the supporting document matters
    array([False,  True, False, False, False])
    >>> scorer.forwards                                                # the full forward + one per document
    6
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterable, Sequence
from itertools import combinations

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from attnflow.errors import BadArgumentError, UnsupportedModelError
from attnflow.eval import metrics as M
from attnflow.eval.config import RunConfig  # noqa: F401  (the doctest's namespace)

REMOVAL_SCHEMA = pa.schema(
    [
        ("index", pa.int64()),
        ("id", pa.string()),
        ("removed", pa.list_(pa.int64())),  # paragraph indices removed together ([] = the full prompt)
        ("logp", pa.float64()),  # log p(answer span) without them
        ("drop", pa.float64()),  # logp(full) - logp
    ]
)
COST_COLUMNS = ("trace_s", "methods_s", "loo_s", "loo_forwards", "pair_s", "pair_forwards")
COST_SCHEMA = pa.schema(  # seconds per example (a batch's trace and methods split evenly) and forward passes
    [("index", pa.int64()), ("id", pa.string())]
    + [(c, pa.int64() if c.endswith("forwards") else pa.float64()) for c in COST_COLUMNS]
)


def hf_module(model) -> torch.nn.Module:
    """The transformers module behind `model` (an nnsight wrapper or the module itself)."""
    module = getattr(model, "_module", model)
    if not isinstance(module, torch.nn.Module) or "logits_to_keep" not in inspect.signature(module.forward).parameters:
        raise UnsupportedModelError(
            f"leave-one-out needs a transformers causal LM taking logits_to_keep (got {type(module).__name__}); "
            "pass --no-loo"
        )
    return module


class AnswerScorer:
    """log p(answer tokens) of one unpadded sequence, and of the same sequence with token ranges removed.

    `targets` are the positions of the scored tokens (the token at t is produced by row t-1);
    `logprob(ranges)` removes `[start, end)` ranges (all before the first target) and reuses the
    full forward's KV cache up to the first removed token.  `forwards` counts the forward passes.
    """

    def __init__(self, model, ids: Sequence[int] | Tensor, targets: Iterable[int]):
        self.module = hf_module(model)
        self.device = next(self.module.parameters()).device
        self.targets = sorted(int(t) for t in targets)
        if not self.targets or self.targets[0] < 1:
            raise BadArgumentError(f"targets {self.targets}: score at least one token after the first")
        ids = torch.as_tensor(ids, dtype=torch.long).flatten()
        if self.targets[-1] >= len(ids):
            raise BadArgumentError(f"target {self.targets[-1]} is past the sequence ({len(ids)} tokens)")
        self.ids = ids[: self.targets[-1] + 1].to(self.device)  # nothing after the last target matters
        params = inspect.signature(self.module.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.forwards = 0
        self.full, out = self._forward(self.ids, 0, self.targets, cache=None, keep_cache=True)
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        n = len(self.ids)
        layers = getattr(cache, "layers", None) or []
        # a sliding-window layer keeps only the last keys: no prefix to crop, fresh forwards instead
        self.reuse = bool(layers) and all(
            not getattr(layer, "is_sliding", False) and getattr(layer, "keys", None) is not None
            and layer.keys.shape[-2] == n
            for layer in layers
        )  # fmt: skip
        self._layers = [(layer.keys, layer.values) for layer in layers] if self.reuse else None

    @torch.no_grad()
    def _forward(self, ids: Tensor, start: int, targets: list[int], cache, keep_cache: bool = False) -> tuple[float, object]:
        """Σ log p(ids'[t] | ids'[:t]) over `targets` (positions in the shortened sequence), forwarding `ids`
        at positions start.. after `cache` (the first `start` tokens' keys and values)."""
        rows = torch.tensor([t - 1 - start for t in targets], device=self.device)  # rows of `ids` producing them
        kw = {} if cache is None else {self._cache_kw: cache}
        out = self.module(
            input_ids=ids[None],
            position_ids=torch.arange(start, start + len(ids), device=self.device)[None],
            use_cache=keep_cache or cache is not None,  # the full forward keeps its cache; a prefix one is read
            logits_to_keep=rows,
            **kw,
        )
        self.forwards += 1
        logp = out.logits[0].float().log_softmax(-1)  # [rows, vocab]
        token = ids[rows + 1]  # [rows]: the scored tokens
        return float(logp.gather(-1, token[:, None]).double().sum()), out

    def _prefix(self, s: int):
        from transformers import DynamicCache

        cache = DynamicCache()
        for layer, (k, v) in enumerate(self._layers):  # views: the new forward concatenates, never writes into them
            cache.update(k[..., :s, :], v[..., :s, :], layer)
        return cache

    def logprob(self, ranges: Iterable[tuple[int, int]]) -> float:
        """log p(answer) with the tokens of `ranges` removed (`self.full` when none is)."""
        ranges = sorted((int(s), int(e)) for s, e in ranges if e > s)
        if not ranges:
            return self.full
        if max(e for _, e in ranges) > self.targets[0] or ranges[0][0] < 0:
            raise BadArgumentError(f"removed ranges {ranges} must lie before the first scored token ({self.targets[0]})")
        n = len(self.ids)
        keep = torch.ones(n, dtype=torch.bool)
        for s, e in ranges:
            keep[s:e] = False
        kept = keep.nonzero()[:, 0]  # old positions, in order
        new_target = [int((kept < t).sum()) for t in self.targets]  # a target's position in the shortened sequence
        # forward from the first removed token, or from the row producing the first target if that is earlier
        s0 = min(ranges[0][0], new_target[0] - 1) if self.reuse else 0
        rest = self.ids[kept[kept >= s0].to(self.device)]
        logp, _ = self._forward(rest, s0, new_target, self._prefix(s0) if s0 > 0 else None)
        return logp


# --- one batch ---------------------------------------------------------------------------------
def score_batch(model, tr, batch, answers, attr_rows: list[dict], config: RunConfig) -> tuple[list[dict], list[dict], list[dict]]:
    """LOO for every example of a batch: ("loo" attribution rows, removal rows, cost per example).

    The LOO metrics of the attention methods' rows in `attr_rows` are filled in place
    (paragraph level: spearman_loo, drop@1, drop@2; sentence level: spearman_loo with
    `loo_sentences`, else left empty).
    """
    loo_rows, removal_rows, costs = [], [], []
    for b, (job, answer) in enumerate(zip(batch, answers)):
        rows_of = [r for r in attr_rows if r["index"] == job.example.index]
        one = score_example(model, tr, b, job, answer, rows_of, config)
        loo_rows += one[0]
        removal_rows += one[1]
        costs.append(one[2])
    return loo_rows, removal_rows, costs


def score_example(model, tr, b: int, job, answer, rows_of: list[dict], config: RunConfig):
    from attnflow.eval.batch import loo_row  # the row layout lives with the other attribution rows

    ex, prompt = job.example, job.prompt
    pad = tr.pad_offsets[b]
    ids = tr.input_ids[b, pad:].cpu()
    targets = [r + 1 for r in answer.rows if r + 1 < len(ids)]
    cost = {"loo_s": 0.0, "loo_forwards": 0, "pair_s": 0.0, "pair_forwards": 0, "loo_reason": None, "answer_logp": None}
    if not targets:  # the completion stopped at the budget without a token to score
        cost["loo_reason"] = "no answer token to score (empty completion)"
        return [], [], cost
    t0 = time.perf_counter()
    scorer = AnswerScorer(model, ids, targets)
    paragraphs = [(s.start, s.end) for s in prompt.paragraph_spans]
    drops = np.array([scorer.full - scorer.logprob([p]) for p in paragraphs])
    removal = {(k,): float(d) for k, d in enumerate(drops)}
    sentences = [(s.start, s.end) for s in prompt.sentence_spans] if config.loo_sentences else []
    sentence_drops = np.array([scorer.full - scorer.logprob([s]) for s in sentences]) if sentences else None
    cost["loo_s"], cost["loo_forwards"] = time.perf_counter() - t0, scorer.forwards
    t0, before = time.perf_counter(), scorer.forwards
    levels = {"paragraph": (paragraphs, drops, removal, config.pair_mode)}
    if sentence_drops is not None:  # sentences: always each method's top-2 (a paragraph's worth of sentences has many pairs)
        levels["sentence"] = (sentences, sentence_drops, {(k,): float(d) for k, d in enumerate(sentence_drops)}, "methods")
    sampled = {}
    for level, (spans, level_drops, level_removal, mode) in levels.items():
        scored = [r["scores"] for r in rows_of if r["level"] == level and r["method"] != "random"]
        sampled[level] = random_pairs(len(spans), ex.index, config.seed) if mode == "methods" else []
        for pair in sorted(wanted_pairs(len(spans), scored + [level_drops], mode) | set(sampled[level])):
            level_removal[pair] = scorer.full - scorer.logprob([spans[k] for k in pair])
    cost["pair_s"], cost["pair_forwards"] = time.perf_counter() - t0, scorer.forwards - before
    cost["answer_logp"] = scorer.full
    for r in rows_of:
        if r["level"] not in levels:
            continue
        _, level_drops, level_removal, _ = levels[r["level"]]
        if r["method"] == "random":
            r |= M.random_loo_expectation(level_drops, level_removal, sampled[r["level"]])
        else:
            r |= M.loo_metrics(np.asarray(r["scores"]), level_drops, level_removal)
    loo = [loo_row(job, level, d, M.loo_metrics(d, d, rem)) for level, (_, d, rem, _) in levels.items()]
    removal_rows = [{"index": ex.index, "id": ex.id, "removed": [], "logp": scorer.full, "drop": 0.0}]
    removal_rows += [
        {"index": ex.index, "id": ex.id, "removed": list(k), "logp": scorer.full - d, "drop": d} for k, d in sorted(removal.items())
    ]
    return loo, removal_rows, cost


def wanted_pairs(n: int, score_lists: list, mode: str) -> set[tuple[int, int]]:
    """The paragraph pairs to remove together: every pair ("all") or each scoring's top-2 ("methods").

    >>> sorted(wanted_pairs(3, [[0.1, 0.5, 0.4], [0.3, 0.2, 0.9], [0.5, 0.4, 0.0]], "methods"))
    [(0, 1), (0, 2), (1, 2)]
    >>> wanted_pairs(4, [], "all") == set(combinations(range(4), 2)), wanted_pairs(1, [[1.0]], "all")
    (True, set())
    """
    if n < 2:
        return set()
    if mode == "all":
        return set(combinations(range(n), 2))
    return {top for s in score_lists if (top := M.top_set(np.asarray(s, dtype=np.float64), 2)) is not None}


RANDOM_PAIRS = 2  # pairs drawn per example for random's drop@2 when not every pair is removed ("methods")


def random_pairs(n: int, index: int, seed: int | None = None, k: int = RANDOM_PAIRS) -> list[tuple[int, int]]:
    """`k` distinct paragraph pairs drawn uniformly (seeded by the example's index): the random baseline's drop@2
    is the mean of their drops, an unbiased estimate of its exact expectation over every pair.

    >>> random_pairs(10, index=3) == random_pairs(10, index=3), len(random_pairs(10, 3)), random_pairs(1, 0)
    (True, 2, [])
    >>> random_pairs(2, 0)                                             # only one pair exists
    [(0, 1)]
    """
    every = list(combinations(range(n), 2))
    if not every:
        return []
    rng = np.random.default_rng([index, 0 if seed is None else seed, 0x10A])
    picked = rng.choice(len(every), size=min(k, len(every)), replace=False)
    return [every[i] for i in sorted(picked)]


def removal_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=REMOVAL_SCHEMA)


def removal_drops(removals: pa.Table) -> dict[int, dict[tuple[int, ...], float]]:
    """{example index: {removed set: drop}} of a removals table."""
    out: dict[int, dict] = {}
    for r in removals.select(["index", "removed", "drop"]).to_pylist():
        out.setdefault(r["index"], {})[tuple(r["removed"])] = r["drop"]
    return out


def cost_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=COST_SCHEMA)


def cost_line(costs: pa.Table) -> str | None:
    """The printed cost per evaluated example: the attention trace and methods beside LOO's forwards and seconds."""
    ok = costs.to_pylist()
    mean = lambda k: float(np.mean([r[k] for r in ok if r[k] is not None])) if any(r[k] is not None for r in ok) else float("nan")  # noqa: E731
    if not ok or np.isnan(mean("trace_s")):
        return None
    line = f"cost per example (mean): attention trace {mean('trace_s'):.3f} s, all attention methods {mean('methods_s'):.3f} s"
    if mean("loo_forwards") > 0:
        line += (
            f"; loo {mean('loo_s'):.3f} s ({mean('loo_forwards'):.1f} forwards, 1 full + 1 per document, prefix KV reused)"
            f"; top-2 removals {mean('pair_s'):.3f} s ({mean('pair_forwards'):.1f} forwards)"
        )
    return line
