"""`attnflow eval hotpotqa|demo|merge`: evaluate attribution on document QA (`attnflow.eval`).

    attnflow eval demo --out runs/demo --limit 200
    attnflow eval hotpotqa --model M --data hotpot_dev_distractor_v1.json --out runs/hp --shard 0/4
    attnflow eval merge runs/hp-0 runs/hp-1 runs/hp-2 runs/hp-3 --out runs/hp

Examples are selected by `--limit N` (the first N rows of the file) then by
`--shard i/N` (rows with index % N == i, i from 0), so merged shards equal one
run over the same limit.  The out directory is described in `attnflow.eval.runner`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from attnflow.errors import BadArgumentError

MAX_PROBLEMS_SHOWN = 20
DEFAULT_VIEW_BYTES = 200 * 10**6  # = attnflow.eval.views.DEFAULT_VIEW_BYTES (not imported: keeps startup light)


def add_parser(subparsers) -> None:
    e = subparsers.add_parser("eval", help="evaluate attribution on document QA")
    esub = e.add_subparsers(dest="eval_command", metavar="TASK")
    for name, help_ in (("hotpotqa", "HotPotQA (distractor setting) from a local file"), ("demo", "the demo task")):
        ep = esub.add_parser(name, help=help_)
        if name == "hotpotqa":
            ep.add_argument("--model", required=True, help="local model directory, .gguf file or hub id")
            ep.add_argument("--data", required=True, help="hotpot_dev_distractor_v1.json, or a .parquet/.jsonl file")
            ep.add_argument("--prompt-template", default="default",
                            help="a named template (default, bare, words) or a file holding {documents} and {question}")
            ep.add_argument("--no-chat-template", action="store_true",
                            help="do not apply the tokenizer's chat template (applied by default when it has one)")
            ep.add_argument("--system", default=None, help="system prompt (chat template only)")
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
        ep.add_argument("--memory-budget", default=None, metavar="SIZE",
                        help="bound one layer's float32 recording transient, e.g. 512MB (default 256MiB); "
                        "a resumed run may change it")
        ep.add_argument("--calibrate", nargs="?", const="N/A", default=None, metavar="QUERY",
                        help="also record each prompt with the question replaced by QUERY (default 'N/A') and add "
                             "calibrated methods '<method>/cal': real minus content-free scores")
        ep.add_argument("--shuffle-check", type=int, default=0, metavar="K",
                        help="also record the first K examples with their documents shuffled and report how much "
                             "each method's ranking follows the documents (Spearman, top-1 kept)")
        ep.add_argument("--loo", action=argparse.BooleanOptionalAction, default=True,
                        help="leave-one-out reference: remove each document, measure the answer's log-prob drop "
                             "(1 forward per document; default on; needed by spearman_loo, drop@k and at2)")
        ep.add_argument("--loo-sentences", action="store_true",
                        help="also leave out each sentence (1 forward per sentence, plus one per distinct top-2 sentence pair "
                             "of the methods): sentence-level loo rows, spearman_loo and drop@k")
        ep.add_argument("--loo-pairs", choices=("methods", "all"), default=None,
                        help="paragraph pairs removed for drop@2: each method's top-2 pair, or all (exact random "
                             "baseline; default: all for demo, methods for hotpotqa)")
        ep.add_argument("--resume", action="store_true",
                        help="continue an interrupted run in --out, or extend it (a larger --limit: only the new examples)")
        ep.add_argument("--no-progress", action="store_true")
        ep.add_argument("--views", type=int, default=50, help="write attention views for the first N examples (default 50)")
        ep.add_argument("--views-bytes", type=float, default=DEFAULT_VIEW_BYTES,
                        help="byte budget for views/ (default 200e6); views past it are skipped and counted")
        ep.add_argument("--model-dtype", default="float32", help="dtype of the model weights: float32 | bfloat16 | float16")
        ep.add_argument("--dtype", default=None, help=argparse.SUPPRESS)  # gone: refused with a pointer to --model-dtype
        ep.add_argument("--device-map", default=None, help="passed to from_pretrained, e.g. auto or cuda")
        ep.set_defaults(func=run)
    m = esub.add_parser("merge", help="combine the outputs of --shard runs")
    m.add_argument("shards", nargs="+", help="output directories of the shard runs")
    m.add_argument("--out", required=True)
    m.set_defaults(func=run)


def run(args) -> int:
    return merge(args) if args.eval_command == "merge" else evaluate(args)


def config_from_args(args):
    """The RunConfig of `attnflow eval hotpotqa|demo` arguments; BadArgumentError naming the flag."""
    from attnflow.cli.trace import memory_budget
    from attnflow.eval.config import DEFAULT_DEMO_EXAMPLES, RunConfig, parse_shard

    task = args.eval_command
    if getattr(args, "dtype", None) is not None:
        raise BadArgumentError(
            f"eval --dtype {args.dtype!r}: the weights' dtype is --model-dtype now (--dtype is the storage dtype "
            "of `attnflow trace`); use --model-dtype"
        )
    if args.batch_size < 1:
        raise BadArgumentError(f"--batch-size {args.batch_size}; use a positive integer")
    for name in ("limit", "max_context_tokens", "max_new_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise BadArgumentError(f"--{name.replace('_', '-')} {value}; use a positive integer")
    parse_shard(args.shard)
    if args.shuffle_check < 0:
        raise BadArgumentError(f"--shuffle-check {args.shuffle_check}; use 0 (off) or a number of examples")
    if args.calibrate is not None and not args.calibrate.strip():
        raise BadArgumentError("--calibrate ''; give a content-free question such as 'N/A', or --calibrate alone")
    if args.views < 0 or args.views_bytes < 0:
        raise BadArgumentError(f"--views {args.views} --views-bytes {args.views_bytes:g}; use numbers >= 0")
    template = getattr(args, "prompt_template", "default")
    if task == "hotpotqa":
        from attnflow.eval.prompts import TEMPLATES, template_text

        template_text(template)  # BadArgumentError now, not after loading the model
        template = template if template in TEMPLATES else str(Path(template).resolve())
    data = str(Path(args.data).resolve()) if task == "hotpotqa" else None
    model = getattr(args, "model", None)
    return RunConfig(
        task=task,
        model=str(Path(model).resolve()) if model and Path(model).exists() else model,
        data=data,
        seed=getattr(args, "seed", None) if task == "demo" else None,
        two_hop=bool(getattr(args, "two_hop", False)),
        mode=args.mode,
        limit=args.limit if task == "hotpotqa" else (args.limit or DEFAULT_DEMO_EXAMPLES),
        shard=args.shard,
        max_context_tokens=args.max_context_tokens,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        memory_budget=memory_budget(args.memory_budget).get("memory_budget"),
        dtype=getattr(args, "model_dtype", "float32"),
        device_map=getattr(args, "device_map", None),
        prompt_template=template,
        chat_template=not getattr(args, "no_chat_template", False),
        system=getattr(args, "system", None),
        calibrate=args.calibrate,
        shuffle_check=args.shuffle_check,
        loo=args.loo,
        loo_sentences=args.loo_sentences and args.loo,
        loo_pairs=args.loo_pairs,
    )


def evaluate(args) -> int:
    """`attnflow eval hotpotqa|demo`: evaluate, write the report, print the summary table."""
    from attnflow.eval import runner
    from attnflow.eval.store import check_out

    config = config_from_args(args)
    out = Path(args.out)
    check_out(out, config, args.resume)  # before the slow part
    examples, problems = runner.select_examples(config)
    for pr in problems[:MAX_PROBLEMS_SHOWN]:
        print(f"attnflow: skipping malformed example {pr.id} (row {pr.index}): {pr.reason}", file=sys.stderr)
    if len(problems) > MAX_PROBLEMS_SHOWN:
        print(f"attnflow: ... and {len(problems) - MAX_PROBLEMS_SHOWN} more malformed examples", file=sys.stderr)
    model, tokenizer = runner.load_model(config)
    facts = runner.evaluate(
        examples, problems, model, tokenizer, out, config,
        resume=args.resume, progress=not args.no_progress, views=args.views, views_bytes=int(args.views_bytes),
    )  # fmt: skip
    print(facts["text"])
    return 0


def merge(args) -> int:
    """`attnflow eval merge SHARD_DIRS... --out DIR`: concatenate finished shard runs and report."""
    from attnflow.eval import store

    shards = store.read_shards([Path(d) for d in args.shards])
    if shards.missing:
        print(f"attnflow: warning: merging without shards {shards.missing} of {shards.n_shards}", file=sys.stderr)
    print(store.merge(shards, Path(args.out))["text"])
    return 0
