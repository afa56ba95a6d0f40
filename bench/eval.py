"""Evaluation throughput on the demo task: examples per second at batch size 1 and 8.

    python bench/eval.py                    # the embedded demo model, 64 examples, generate mode
    python bench/eval.py --mode teacher --examples 128
    python bench/eval.py --threads 1        # on a shared, busy machine one thread is much faster

Times `attnflow.eval.runner.evaluate` end to end per batch (trace + generation,
six flow methods, span scores, metrics, Parquet part files), without the report
and without attention views; model loading and a warm-up batch are excluded.
Falls back to a random-weight model of the demo's shape when the trained
weights are missing (the timing is then indicative only).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def demo_model(model_dir: str | None):
    from attnflow.demo import MODEL_DIR
    from attnflow.tracers import load

    path = Path(model_dir) if model_dir else MODEL_DIR
    if (path / "model.safetensors").is_file():
        model = load(path)
        return model, model.tokenizer, str(path)
    from transformers import LlamaConfig, LlamaForCausalLM

    from attnflow.demo.tokenizer import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        max_position_embeddings=256, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval(), tok, "random weights (demo model missing)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=64)
    p.add_argument("--mode", choices=("generate", "teacher"), default="generate")
    p.add_argument("--model", default=None, help="model directory (default: the embedded demo model)")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from attnflow.eval.runner import RunConfig, evaluate, select_examples

    model, tok, name = demo_model(args.model)
    print(f"model: {name}; device: cpu; torch threads: {torch.get_num_threads()}; mode: {args.mode}")
    print(f"{'batch size':>10} {'examples':>9} {'seconds':>9} {'examples/s':>11}")
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        config = RunConfig(task="demo", seed=0, limit=args.examples + bs, mode=args.mode, batch_size=bs)
        examples, problems = select_examples(config)
        with tempfile.TemporaryDirectory() as tmp:
            kw = dict(progress=False, report=False, views=0)
            evaluate(examples[:bs], [], model, tok, Path(tmp) / "warm", config, **kw)  # first-call costs
            start = time.perf_counter()
            evaluate(examples[bs:], [], model, tok, Path(tmp) / "run", config, **kw)
            seconds = time.perf_counter() - start
        print(f"{bs:>10} {args.examples:>9} {seconds:>9.2f} {args.examples / seconds:>11.2f}")


if __name__ == "__main__":
    main()
