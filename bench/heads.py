"""What the evaluation's head reduction costs: one head at a time (`reduce.head_sum`) against a reduction over the head dim.

    python bench/heads.py              # N = 1,024 and 1,536 (SmolLM2 HotPotQA prompts), median of 5
    python bench/heads.py --quick      # N = 256, 1 repeat

The evaluation records every head in float16, `[batch, layer, head, query, key]` =
[1, 30, 9, N, N] here (SmolLM2-135M's shape; random row-stochastic patterns), and reduces
the heads once per method family.  Columns, median wall time of each, side by side:

    mean, dim   torch.mean(patterns, dim=head, dtype=float32) over the whole trace (the code before)
    mean, loop  eval.methods.reduce_heads(trace, "mean"): per layer, `head_sum` adds the heads one
                at a time into a float32 layer, upcasting as it reads
    norm, dim   per layer: float32 copy of the heads, times each key's value norm, summed over the
                head dim by einsum (`norm_weighted` before), rows renormalised
    norm, loop  eval.methods.reduce_heads(trace, "norm"): `norm_weighted` summing with `head_sum`

`x dim` is the reduction over the head dim's time over the loop's (higher: the loop is
faster); `max |diff|` compares the two results.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from attnflow.attention_trace import AttentionTrace
from attnflow.eval.methods import reduce_heads

L, H = 30, 9


def make_trace(n: int, g: torch.Generator) -> AttentionTrace:
    A = torch.rand(1, L, H, n, n, generator=g).tril_()
    A /= A.sum(-1, keepdim=True)
    ids = torch.arange(n)[None]
    norms = {"value": torch.rand(1, L, H, n, generator=g) + 0.5, "attn": torch.ones(1, L, n), "residual": torch.ones(1, L, n)}
    return AttentionTrace(
        patterns=A.half(), input_ids=ids, attention_mask=torch.ones_like(ids), query_positions=ids.clone(),
        layers=list(range(L)), heads="all", tokens=[[str(i) for i in range(n)]], prompt_lengths=[n], norms=norms,
    )


def mean_dim(tr):
    return torch.mean(tr.patterns, dim=2, keepdim=True, dtype=torch.float32)


def norm_dim(tr):
    A, V = tr.patterns, tr.norms["value"]
    out = torch.empty((1, L, 1, *A.shape[3:]))
    for l in range(L):
        W = torch.einsum("bhqk,bhk->bqk", A[:, l].float(), V[:, l])
        total = W.sum(-1, keepdim=True)
        out[:, l, 0] = W / torch.where(total != 0, total, torch.ones_like(total))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--sizes", default=None, help="comma-separated N (default 1024,1536)")
    p.add_argument("--repeats", type=int, default=None)
    args = p.parse_args(argv)
    sizes = [int(s) for s in (args.sizes or ("256" if args.quick else "1024,1536")).split(",")]
    repeats = args.repeats or (1 if args.quick else 5)
    g = torch.Generator().manual_seed(0)
    print(f"float16 trace [1, {L}, {H}, N, N], CPU, {torch.get_num_threads()} threads, median of {repeats}")
    header = f"{'N':>5} {'reduction':<6} {'dim s':>8} {'loop s':>8} {'x dim':>7} {'max |diff|':>11}"
    print(header)
    print("-" * len(header))
    for n in sizes:
        tr = make_trace(n, g)
        pairs = {"mean": (lambda: mean_dim(tr), lambda: reduce_heads(tr, "mean").patterns),
                 "norm": (lambda: norm_dim(tr), lambda: reduce_heads(tr, "norm").patterns)}
        for name, (dim, loop) in pairs.items():
            diff = (dim() - loop()).abs().max().item()  # also the warm-up
            times = {"dim": [], "loop": []}
            for _ in range(repeats):
                for key, fn in (("dim", dim), ("loop", loop)):  # taking turns, so drifting load hits both alike
                    t = time.perf_counter()
                    fn()
                    times[key].append(time.perf_counter() - t)
            d, lp = statistics.median(times["dim"]), statistics.median(times["loop"])
            print(f"{n:>5} {name:<6} {d:>8.3f} {lp:>8.3f} {d / lp:>7.2f} {diff:>11.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
