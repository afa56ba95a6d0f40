"""What recording attention costs: attnflow.trace against a plain forward and eager output_attentions.

    python bench/capture.py            # seq 128, 512, 1024; batch 4; 5 timed repeats
    python bench/capture.py --quick    # 3 repeats (a few minutes on 2 CPU cores)

For a small random Llama (sdpa), prints the median wall time and the peak extra
memory of

    plain       model(ids, use_cache=False) under the default sdpa kernel
    eager       the same weights, eager attention, output_attentions=True (use_cache=False too)
    trace-all   attnflow.trace(model, ids, heads="all")              (float16 storage)
    mean-last   attnflow.trace(model, ids, heads="mean", rows="last")

(`model` wrapped in nnsight once, as `af.load` returns it).

each as a ratio to `plain`.  Memory: on CUDA, torch.cuda.max_memory_allocated
above what was allocated before the call.  On CPU, the peak of torch's CPU
allocator over the call, from the profiler's memory events ("Total Allocated"
of each [memory] event, minus its value before the first one): this counts
every tensor torch allocates, in every thread, and nothing else — RSS would mix
in the allocator's caching, and tracemalloc does not see torch's allocations.
Memory is measured in its own untimed run, because the profiler slows the call.

    python bench/capture.py --memory            # peak memory at real lengths, new code beside today's
    python bench/capture.py --memory --quick    # 512 and 1,024 tokens (a smoke test)

`--memory` builds a 30-layer x 9-head random Llama (3 kv heads, hidden 144) and
measures, each in a fresh process, the peak extra memory of

    plain       model(ids, use_cache=False)
    mean-all    attnflow.trace(model, ids, heads="mean")        every row, float16 (seq 4,096 and 8,192)
    all-all     attnflow.trace(model, ids, heads="all")         every row, float16 (seq 1,024)

under this checkout's `src` ("new") and under `--before REV`'s (default 14a45f5,
the tracers before issue 15: "before"), against `result + plain` (the stored
patterns plus a plain forward; goal <= 1.3x for mean-all) and against the result
alone (goal <= 1.5x for all-all).  A "before" run whose estimate exceeds the free
memory is skipped and says so.

    python bench/capture.py --stream            # 4,096 tokens, heads="all", every row: in memory vs out=DIR
    python bench/capture.py --stream --quick    # 1,024 tokens

`--stream` measures on the same 30-layer model, each in a fresh process,

    all-all     attnflow.trace(model, ids, heads="all")                     the trace held in memory
    stream-all  attnflow.trace(model, ids, heads="all", out=DIR)            each layer written as it is recorded
    stream-gen  stream-all with max_new_tokens=16: the prompt's rows written at prefill, in the one generation
    plain-gen   model.generate(ids, max_new_tokens=16, do_sample=False)    (stream-gen's plain reference)

with two peaks: torch's CPU allocator (as above) and the process's resident memory
(max RSS during the call minus RSS before it), which also counts what pyarrow allocates
while writing Parquet; both against one layer's result (9 heads x seq^2 float16).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import attnflow as af


def build(device: str, layers: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=layers, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=2048,
    )
    model = AutoModelForCausalLM.from_config(copy.deepcopy(cfg)).eval().to(device)
    eager = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="eager").eval().to(device)
    eager.load_state_dict(model.state_dict())
    return model, eager


def methods(model, eager, ids):
    import nnsight

    wrapped = nnsight.NNsight(model)  # wrapped once, as af.load's model is: wrapping costs ~10 ms per call
    def plain():
        with torch.no_grad():
            return model(input_ids=ids, use_cache=False).logits

    def eager_attn():
        with torch.no_grad():
            return eager(input_ids=ids, output_attentions=True, use_cache=False).attentions

    def trace_all():
        return af.trace(wrapped, ids, heads="all", progress=False, batch_size=len(ids))

    def mean_last():
        return af.trace(wrapped, ids, heads="mean", rows="last", progress=False, batch_size=len(ids))

    return {"plain": plain, "eager": eager_attn, "trace-all": trace_all, "mean-last": mean_last}


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def median_times(fns: dict, repeats: int, device: str) -> dict:
    """Median wall time of each function; methods take turns in every repeat, so drifting load hits all alike."""
    for fn in fns.values():
        fn()  # warm-up (first-call costs: nnsight source instrumentation, kernel selection)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            out = fn()
            sync(device)
            times[name].append(time.perf_counter() - t)
            del out
    return {name: statistics.median(ts) for name, ts in times.items()}


def peak_bytes(fn, device: str) -> int:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        sync(device)
        del out
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    del out
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = [e["args"] for e in json.load(open(f.name))["traceEvents"] if e.get("name") == "[memory]"]
    events = [e for e in events if e.get("Device Type", 0) == 0]
    if not events:
        return 0
    base = events[0]["Total Allocated"] - events[0]["Bytes"]
    return max(e["Total Allocated"] for e in events) - base


# --- peak memory at real lengths, one fresh process per measurement ---------------------------------
BEFORE = "14a45f5"  # the tracers before issue 15 (two passes, whole-layer float32 transient, part + trace copies)


def build_long(seq: int) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=1000, hidden_size=144, intermediate_size=384, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=max(seq + 64, 2048),  # room to generate
    )
    return AutoModelForCausalLM.from_config(cfg).eval()


def measure_child(method: str, seq: int) -> None:
    """Run in a fresh process: print {"peak": bytes, "result": bytes} of one method as JSON."""
    import nnsight

    model = build_long(seq)
    wrapped = nnsight.NNsight(model)
    ids = torch.randint(0, 1000, (1, seq), generator=torch.Generator().manual_seed(seq))
    heads = {"mean-all": "mean", "all-all": "all", "stream-all": "all", "stream-gen": "all"}.get(method)
    new = 16 if method.endswith("-gen") else None
    folder = tempfile.mkdtemp(prefix="attnflow-bench-") if method.startswith("stream") else None
    af.trace(wrapped, ids[:, :16], heads=heads or "mean", progress=False)  # warm-up: nnsight's source instrumentation
    if folder:
        af.trace(wrapped, ids[:, :16], heads=heads, progress=False, out=f"{folder}/warm", max_new_tokens=new)
    result = {}

    def run():
        if heads is None:
            with torch.no_grad():
                if new:
                    return model.generate(ids, max_new_tokens=new, do_sample=False, pad_token_id=0)
                return model(input_ids=ids, use_cache=False).logits
        if folder:
            saved = af.trace(wrapped, ids, heads=heads, progress=False, out=f"{folder}/trace", max_new_tokens=new)
            result["saved"] = saved
            result["disk"] = sum(f.stat().st_size for f in saved.path.rglob("*") if f.is_file())
            return saved
        tr = af.trace(wrapped, ids, heads=heads, progress=False)
        result["bytes"] = tr.patterns.numel() * tr.patterns.element_size()
        return tr

    rss0 = rss_bytes()
    t0 = time.perf_counter()
    peak = peak_bytes(run, "cpu")
    wall = time.perf_counter() - t0
    rss = max_rss_bytes() - rss0
    if folder:  # what the in-memory trace would hold: every row of prompt + completion (cut at EOS)
        n = len(result.pop("saved").load(layers=[0]).tokens[0])
        result["bytes"] = 30 * 9 * n * n * 2
        import shutil

        shutil.rmtree(folder)
    print(json.dumps({"peak": peak, "rss": rss, "wall": wall, "result": result.get("bytes", 0), "disk": result.get("disk", 0)}))


def rss_bytes() -> int:
    """This process's resident memory now (VmRSS)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def max_rss_bytes() -> int:
    """This process's resident-memory high-water mark so far (ru_maxrss, KiB on Linux)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def source_of(rev: str) -> str:
    """`src` of git revision `rev`, extracted once under the temp directory."""
    import os
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = os.path.join(tempfile.gettempdir(), f"attnflow-src-{rev}")
    if not os.path.isdir(out):
        os.makedirs(out + ".part", exist_ok=True)
        archive = subprocess.run(["git", "-C", root, "archive", rev, "src"], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", out + ".part"], input=archive, check=True)
        os.replace(out + ".part", out)
    return os.path.join(out, "src")


def run_child(method: str, seq: int, src: str) -> dict | None:
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=src, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", method, "--child-seq", str(seq)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        print(f"  ({method} at {seq} failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode})")
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def free_bytes() -> int:
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


def memory_table(args) -> int:
    import os

    new_src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    old_src = source_of(args.before)
    cases = [("mean-all", s) for s in ((512, 1024) if args.quick else (4096, 8192))]
    cases += [("all-all", 256 if args.quick else 1024)]
    print(
        f"Llama 30 layers, 9 heads (3 kv), hidden 144, sdpa; batch 1; float16 storage; CPU allocator peak "
        f"(profiler); before = {args.before}, new = this checkout"
    )
    header = f"{'seq':>5} {'method':<9} {'code':<7} {'peak MB':>9} {'result MB':>10} {'x result':>9} {'x result+plain':>15}"
    print(header)
    print("-" * len(header))
    for method, seq in cases:
        plain = run_child("plain", seq, new_src)
        for code, src in (("before", old_src), ("new", new_src)):
            result = 30 * (9 if method == "all-all" else 1) * seq * seq * 2
            if code == "before" and 2.2 * result + 9 * seq * seq * 4 > free_bytes():
                print(f"{seq:>5} {method:<9} {code:<7} skipped: needs ~{(2.2 * result + 36 * seq * seq) / 2**30:.1f} GiB")
                continue
            r = run_child(method, seq, src)
            if r is None or plain is None:
                continue
            print(
                f"{seq:>5} {method:<9} {code:<7} {r['peak'] / 2**20:>9.0f} {r['result'] / 2**20:>10.0f} "
                f"{r['peak'] / r['result']:>9.2f} {r['peak'] / (r['result'] + plain['peak']):>15.2f}"
            )
        if plain is not None:
            print(f"{seq:>5} {'plain':<9} {'':<7} {plain['peak'] / 2**20:>9.0f}")
    return 0


def stream_table(args) -> int:
    import os

    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    seq = 1024 if args.quick else 4096
    layer = 9 * seq * seq * 2
    print(
        f"Llama 30 layers, 9 heads (3 kv), hidden 144, sdpa; batch 1; seq {seq}; heads='all', every row, float16; "
        f"one layer's result = {layer / 2**20:.0f} MB; wall time under the memory profiler"
    )
    header = (f"{'method':<11} {'torch peak MB':>13} {'x layer':>8} {'RSS peak MB':>12} {'x layer':>8} "
              f"{'result MB':>10} {'disk MB':>8} {'wall s':>7}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for method in ("stream-all", "all-all", "plain", "stream-gen", "plain-gen"):
        if method == "all-all" and 1.3 * 30 * layer > free_bytes():
            print(f"{method:<11} skipped: needs ~{1.3 * 30 * layer / 2**30:.1f} GiB, {free_bytes() / 2**30:.1f} GiB free")
            continue
        r = run_child(method, seq, src)
        if r is None:
            continue
        print(
            f"{method:<11} {r['peak'] / 2**20:>13.0f} {r['peak'] / layer:>8.2f} {r['rss'] / 2**20:>12.0f} {r['rss'] / layer:>8.2f} "
            f"{r['result'] / 2**20:>10.0f} {r['disk'] / 2**20:>8.0f} {r['wall']:>7.1f}"
        )
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="3 timed repeats instead of 5 (--memory: short sequences)")
    p.add_argument("--memory", action="store_true", help="peak memory at 4,096 / 8,192 tokens, before and new")
    p.add_argument("--stream", action="store_true", help="heads='all' at 4,096 tokens: in memory vs trace(out=DIR)")
    p.add_argument("--before", default=BEFORE, help="git revision of today's code for --memory")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-seq", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--seqs", default="128,512,1024")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        measure_child(args.child, args.child_seq)
        return 0
    if args.memory:
        return memory_table(args)
    if args.stream:
        return stream_table(args)
    repeats = 3 if args.quick else 5
    model, eager = build(args.device, args.layers)
    cfg = model.config
    print(
        f"Llama {cfg.num_hidden_layers} layers, {cfg.num_attention_heads} heads ({cfg.num_key_value_heads} kv), "
        f"hidden {cfg.hidden_size}, {model.config._attn_implementation}; batch {args.batch}; device {args.device}; "
        f"{torch.get_num_threads()} threads; torch {torch.__version__}; median of {repeats}"
    )
    header = f"{'seq':>5} {'method':<10} {'time s':>9} {'x plain':>8} {'peak MB':>9} {'x plain':>8}"
    print(header)
    print("-" * len(header))
    for seq in [int(s) for s in args.seqs.split(",")]:
        ids = torch.randint(0, cfg.vocab_size, (args.batch, seq), generator=torch.Generator().manual_seed(seq))
        ids = ids.to(args.device)
        fns = methods(model, eager, ids)
        times = median_times(fns, repeats, args.device)
        rows = {name: (times[name], peak_bytes(fn, args.device)) for name, fn in fns.items()}
        t0, m0 = rows["plain"]
        for name, (t, m) in rows.items():
            print(f"{seq:>5} {name:<10} {t:>9.4f} {t / t0:>8.2f} {m / 2**20:>9.1f} {m / m0:>8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
