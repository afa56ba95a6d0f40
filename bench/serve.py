"""`attnflow serve` on the demo model: time from Run to first graph, /graph size, server peak memory.

    python bench/serve.py                    # 5 runs on the demo model
    python bench/serve.py --model DIR --prompt-tokens 2000   # a long prompt on a local model (e.g. SmolLM2-135M)

The server runs in a child process (as `attnflow serve --no-browser` would), driven over
HTTP on 127.0.0.1 with urllib.  "run -> first graph" is POST /api/runs, reading the
event stream until `recorded`, then GET /graph at tau 0.01: what the page waits for
after Run.  The first run includes loading the model.  With --model, a standalone
`af.trace(heads="mean", dtype=float32)` of the same tokens in this process is the
reference (the issue's goal: run -> first graph <= 1.15x that + 10 s).  Peak memory
is the child's maximum resident set size (getrusage RUSAGE_CHILDREN after it exits).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import urllib.request

TOKEN = "bench-token-0123456789abcdef"
DOCS = [{"name": "doc1", "text": "bob owns a cat ."}, {"name": "doc2", "text": "alice lives in paris ."}]
PROMPT = "question : what is the city of alice ?\nanswer :"


def child(model: str | None, max_tokens: int) -> None:
    from attnflow.explorer import serve
    from attnflow.explorer.runs import Limits

    serve(model, open_browser=False, token=TOKEN, limits=Limits(max_tokens=max_tokens))


def call(base: str, path: str, body: dict | None = None) -> bytes:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, headers={"X-Attnflow-Token": TOKEN,
                                                                  "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return r.read()


def run_to_graph(base: str, body: dict) -> tuple[float, int, int]:
    """(seconds from POST to the first /graph answer, /graph bytes, edges)."""
    t0 = time.perf_counter()
    rid = json.loads(call(base, "/api/runs", body))["id"]
    req = urllib.request.Request(f"{base}/api/runs/{rid}/events", headers={"X-Attnflow-Token": TOKEN})
    with urllib.request.urlopen(req, timeout=600) as stream:
        for line in stream:
            if line.startswith(b"event: recorded"):
                break
            if line.startswith(b"event: error"):
                raise SystemExit(f"run failed: {stream.readline().decode()}")
    g = call(base, f"/api/runs/{rid}/graph?tau=0.01")
    return time.perf_counter() - t0, len(g), sum(json.loads(g)["edge_counts"])


def long_prompt(model_dir: str, n: int) -> str:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    words = ("the river runs past the old mill where alice keeps her boat and bob counts the fish . " * n).split()
    lo, hi = 1, len(words)
    while lo < hi:  # the longest prefix with at most n tokens
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if len(tok(" ".join(words[:mid]))["input_ids"]) <= n else (lo, mid - 1)
    return " ".join(words[:lo])


def standalone(model_dir: str, prompt: str, new: int) -> float:
    import torch

    import attnflow as af

    model = af.load(model_dir)
    t0 = time.perf_counter()
    af.trace(model, prompt, max_new_tokens=new, heads="mean", dtype=torch.float32, progress=False)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a local model directory (default: the demo model)")
    ap.add_argument("--prompt-tokens", type=int, default=None, help="with --model: a prompt of about this many tokens")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=3)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.model, max(4096, (args.prompt_tokens or 0) + 64))

    cmd = [sys.executable, __file__, "--child"] + (["--model", args.model] if args.model else [])
    cmd += ["--prompt-tokens", str(args.prompt_tokens)] if args.prompt_tokens else []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    line = proc.stdout.readline()
    base = line.split("serve: ")[1].split("/#")[0]
    if args.model and args.prompt_tokens:
        body = {"prompt": long_prompt(args.model, args.prompt_tokens), "max_new_tokens": args.max_new_tokens}
    else:
        body = {"prompt": PROMPT, "documents": DOCS, "max_new_tokens": args.max_new_tokens}
    try:
        results = [run_to_graph(base, body) for _ in range(args.runs + 1)]  # the first one loads the model
    finally:
        proc.terminate()
        proc.wait(30)
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    cold, warm = results[0], results[1:]
    med = statistics.median(t for t, _, _ in warm)
    rows = [
        ("model", args.model or "demo (embedded)"),
        ("prompt tokens", str(args.prompt_tokens or "~26")),
        ("run -> first graph, first run (loads model)", f"{cold[0]:.3f} s"),
        (f"run -> first graph, median of {len(warm)}", f"{med:.3f} s" + ("  (goal <= 2 s)" if not args.model else "")),
        ("/graph response at tau 0.01", f"{warm[-1][1]} B, {warm[-1][2]} edges"),
        ("server peak RSS", f"{peak_mib:.0f} MiB"),
    ]
    if args.model and args.prompt_tokens:
        ref = standalone(args.model, body["prompt"], args.max_new_tokens)
        rows.append(("standalone af.trace(heads='mean')", f"{ref:.3f} s  (goal: run <= {1.15 * ref + 10:.1f} s)"))
    width = max(len(k) for k, _ in rows)
    print(f"{'measure':<{width}}  value")
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
