"""`attnflow` command line: demo, trace, render, eval.

Every command takes --help; bad input exits with code 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import sys

from attnflow.errors import AttnflowError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attnflow", description="Record, compose and view attention flow.")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser("demo", help="run the embedded model organism end to end (offline)")
    d.add_argument("--out", default="attnflow-demo", help="output directory (default: ./attnflow-demo)")
    d.add_argument("--examples", type=int, default=32, help="held-out task instances to answer (default: 32)")
    d.add_argument("--two-hop", action="store_true", help="ask two-hop questions (the answer needs two documents)")
    d.add_argument("--seed", type=int, default=1234, help="seed of the generated instances")
    d.add_argument("--no-progress", action="store_true", help="hide progress bars")
    d.set_defaults(func=_run_demo)

    t = sub.add_parser("trace", help="record attention patterns of a model on a prompt into a saved trace")
    t.add_argument("model", help="local model directory or hub id")
    t.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    t.add_argument("--max-new-tokens", type=int, default=None, help="generate this many tokens greedily first")
    t.add_argument("--heads", default="all", help="all | mean | max (default: all)")
    t.add_argument("--rows", default=None, help="last | completion | comma-separated positions (default: all)")
    t.add_argument("--layers", default=None, help="comma-separated layer indices (default: all)")
    t.add_argument("--dtype", default="float16", help="storage dtype: float16 | float32 | bfloat16")
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--remote", action="store_true", help="run on NDIF (needs NDIF_API_KEY)")
    t.add_argument("--out", required=True, help="directory to write the trace to")
    t.add_argument("--no-progress", action="store_true", help="hide progress bars")
    t.set_defaults(func=_run_trace)

    r = sub.add_parser("render", help="turn a saved trace into an offline HTML viewer")
    r.add_argument("trace_dir", help="directory written by `attnflow trace` or AttentionTrace.save")
    r.add_argument("--out", required=True, help="directory for index.html and its shards")
    r.add_argument("--shard-bytes", type=int, default=8 * 2**20, help="largest shard file, in bytes")
    r.set_defaults(func=_run_render)

    e = sub.add_parser("eval", help="evaluate attribution on document QA")
    esub = e.add_subparsers(dest="eval_command", metavar="TASK")
    for name, help_ in (("hotpotqa", "HotPotQA (distractor setting) from a local file"), ("demo", "the demo task")):
        ep = esub.add_parser(name, help=help_)
        if name == "hotpotqa":
            ep.add_argument("--model", required=True, help="local model directory or hub id")
            ep.add_argument("--data", required=True, help="hotpot_dev_distractor_v1.json, or a .parquet/.jsonl file")
        else:
            ep.add_argument("--model", default=None, help="model directory (default: the embedded demo model)")
            ep.add_argument("--two-hop", action="store_true", help="ask two-hop questions (two supporting documents)")
            ep.add_argument("--seed", type=int, default=2024, help="seed of the generated examples (default 2024)")
        ep.add_argument("--out", required=True, help="output directory (parts, tables, summary, plot, explorer.html)")
        ep.add_argument("--limit", type=int, default=None, help="evaluate the first N examples (demo default: 200)")
        ep.add_argument("--shard", default=None, help="i/N: evaluate rows with index %% N == i (i from 0); combine with `eval merge`")
        ep.add_argument("--mode", choices=("generate", "teacher"), default="generate",
                        help="generate: greedy answer, scored by EM/F1; teacher: the gold answer forced in")
        ep.add_argument("--max-context-tokens", type=int, default=None,
                        help="skip (and count) longer prompts (default: the model's maximum positions)")
        ep.add_argument("--max-new-tokens", type=int, default=None, help="answer length budget (demo 3, hotpotqa 16)")
        ep.add_argument("--batch-size", type=int, default=1, help="examples per forward pass (default 1)")
        ep.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
        ep.add_argument("--no-progress", action="store_true")
        ep.add_argument("--views", type=int, default=50, help="write attention views for the first N examples (default 50)")
        ep.add_argument("--dtype", default="float32", help="model weights dtype: float32 | bfloat16 | float16")
        ep.add_argument("--device-map", default=None, help="passed to from_pretrained, e.g. auto or cuda")
        ep.set_defaults(func=_run_eval)
    m = esub.add_parser("merge", help="combine the outputs of --shard runs")
    m.add_argument("shards", nargs="+", help="output directories of the shard runs")
    m.add_argument("--out", required=True)
    m.set_defaults(func=_run_eval_merge)
    return p


def _run_demo(args) -> int:
    from attnflow.demo.run import run_demo

    return run_demo(args)


def _run_trace(args) -> int:
    from attnflow.tracers.command import run_trace_command

    return run_trace_command(args)


def _run_render(args) -> int:
    from attnflow.exporters.html import render_command

    return render_command(args)


def _run_eval(args) -> int:
    from attnflow.eval.runner import run_eval_command

    return run_eval_command(args)


def _run_eval_merge(args) -> int:
    from attnflow.eval.runner import merge_command

    return merge_command(args)


def _quiet_transformers() -> None:
    """attnflow shows its own progress bars; transformers' weight-loading bar and advisories are noise here."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.version:
        from attnflow import __version__

        print(__version__)
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        _quiet_transformers()
        return int(args.func(args) or 0)
    except AttnflowError as err:
        print(f"attnflow: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("attnflow: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
