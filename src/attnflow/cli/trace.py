"""`attnflow trace MODEL --prompt TEXT ...`: load, record, print the completion and where it came from; save with --out.

    $ attnflow trace runs/tiny-llama --prompt "the cat sat" --heads mean --rows last --out trace/
    recorded 1 prompt(s), 2 layers, heads=mean, rows=last: patterns (1, 2, 1, 1, 3) float16 -> trace/

    $ attnflow trace SmolLM2-135M-Instruct.Q4_1.gguf --chat --documents docs.json \\
          --prompt "Where does Alice live?" --max-new-tokens 8
    recorded 1 prompt(s), 30 layers, heads=all, rows=all: patterns (1, 30, 9, 104, 104) float16 (not saved; --out DIR keeps it)
    [0] completion (8 tokens): 'Alice lives in Paris.'
        rollout shares over the completion:
          1. paris     0.231   top tokens: ' Paris' 0.012, ...
          2. london    0.118   top tokens: ...
             other     0.651   (question, chat template, completion)

MODEL is a model folder, a `.gguf` file or a hub id.  `--documents FILE` places
named documents before the question (format: `attnflow.prompting`) and records
them as spans of kind "document"; `--chat` renders the prompt through the
tokenizer's chat template.  `--dtype` is the storage dtype of the patterns,
`--model-dtype` the weights'.  `--memory-budget SIZE` bounds the float32
transient of one layer's recording (`TraceOptions.memory_budget`).  `--json` prints the same as one JSON object.
The shares are printed when the trace can be composed by `--flow` (every row and
layer recorded, or `--flow raw`).
"""

from __future__ import annotations

import json
import os

from attnflow.errors import BadArgumentError

DEVICES = ("auto", "cpu", "cuda")


def add_parser(subparsers) -> None:
    t = subparsers.add_parser("trace", help="record attention of a model on prompts; print the completion and its sources")
    t.add_argument("model", help="local model directory, .gguf file or hub id")
    t.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch)")
    t.add_argument("--prompt-file", default=None, help="one prompt per line, or JSONL of chats ([{role, content}] or {messages})")
    t.add_argument("--chat", action="store_true", help="render each text prompt through the tokenizer's chat template")
    t.add_argument("--system", default=None, help="system message of a --chat prompt")
    t.add_argument("--documents", default=None, help='JSON {name: text} or JSONL of {"name", "text"}: placed before the question')
    t.add_argument("--max-new-tokens", type=int, default=None, help="generate this many tokens greedily first")
    t.add_argument("--heads", default="all",
                   help="all | mean | max | norm (value-norm weighted) | FILE.safetensors of [layer, head] weights, "
                        "e.g. the at2_heads.safetensors of an `attnflow eval` run (default: all)")
    t.add_argument("--norms", action="store_true",
                   help="also record value, attention-output and residual norms (saved in a norms table)")
    t.add_argument("--rows", default=None, help="last | completion | comma-separated positions (default: all)")
    t.add_argument("--layers", default=None, help="comma-separated layer indices (default: all)")
    t.add_argument("--dtype", default="float16", help="storage dtype of the patterns: float16 | float32 | bfloat16")
    t.add_argument("--model-dtype", default="float32", help="dtype of the model weights: float32 | bfloat16 | float16")
    t.add_argument("--device", default="auto", help="where the model runs: auto (cuda if present) | cpu | cuda | cuda:N")
    t.add_argument("--flow", default=None, metavar="METHOD",
                   help="how the shares are composed: rollout (default) | flow | flow_normalized | sum | raw")
    t.add_argument("--exclude-keys", default=None, metavar="POSITIONS",
                   help="comma-separated key positions left out of the shares, e.g. 0 (the attention sink)")
    t.add_argument("--top", type=int, default=3, help="source tokens listed per document (default 3)")
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--memory-budget", default=None, metavar="SIZE",
                   help="bytes, or a size like 512MB or 2GiB (powers of 1024), that one layer's float32 transient "
                        "may take: rows are computed in query chunks that fit (default 256MiB)")
    t.add_argument("--remote", action="store_true", help="run on NDIF (needs NDIF_API_KEY)")
    t.add_argument("--out", default=None, help="folder to save the trace to (default: not saved)")
    t.add_argument("--overwrite", action="store_true", help="replace --out if it holds a trace attnflow wrote")
    t.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    t.add_argument("--no-progress", action="store_true", help="hide progress bars")
    t.set_defaults(func=run)


def parse_rows(text: str | None):
    """--rows: None, "last", "completion", or comma-separated integers.

    >>> parse_rows("last"), parse_rows("0,-1")
    ('last', [0, -1])
    """
    if text is None or text in ("last", "completion"):
        return text
    return _ints(text, "--rows", "last | completion | comma-separated positions like 0,-1")


def parse_heads(text: str):
    """--heads: a head mode, or the path of a safetensors file of [layer, head] weights (`eval.at2.load_head_weights`).

    >>> parse_heads("mean")
    'mean'
    >>> parse_heads("weights.safetensors")
    Traceback (most recent call last):
    attnflow.errors.DataError: no head-weight file at weights.safetensors; pass the at2_heads.safetensors of an `attnflow eval` run
    >>> parse_heads("median")
    Traceback (most recent call last):
    attnflow.errors.BadArgumentError: --heads 'median'; use all | mean | max | norm, or a .safetensors file of [layer, head] weights
    """
    from attnflow.tracers.inputs import HEAD_MODES

    if text in HEAD_MODES:
        return text
    if text.endswith(".safetensors") or os.path.isfile(text):
        from attnflow.eval.at2 import load_head_weights

        return load_head_weights(text)
    raise BadArgumentError(
        f"--heads {text!r}; use {' | '.join(HEAD_MODES)}, or a .safetensors file of [layer, head] weights"
    )


def parse_layers(text: str | None):
    """--layers: None or comma-separated integers.

    >>> parse_layers("0,-1"), parse_layers(None)
    ([0, -1], None)
    """
    return None if text is None else _ints(text, "--layers", "comma-separated layer indices like 0,-1")


def _ints(text: str, flag: str, expected: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BadArgumentError(f"{flag} {text!r} is not valid; use {expected}") from None


def options_from_args(args):
    """The TraceOptions of `attnflow trace` (validated before any model loads, so a typo fails fast)."""
    from attnflow.tracers import TraceOptions, inputs

    inputs.require_completion(parse_rows(args.rows), has_completion=bool(args.max_new_tokens))
    return TraceOptions(
        max_new_tokens=args.max_new_tokens,
        heads=parse_heads(args.heads),
        rows=parse_rows(args.rows),
        layers=parse_layers(args.layers),
        dtype=args.dtype,
        batch_size=args.batch_size,
        remote=bool(args.remote),
        progress=not args.no_progress,
        norms=bool(args.norms),
        **memory_budget(args.memory_budget),
    )


def memory_budget(text: str | None) -> dict:
    """--memory-budget: {} (TraceOptions' default) or {"memory_budget": bytes}.

    >>> memory_budget("512MB"), memory_budget(None)
    ({'memory_budget': 536870912}, {})
    >>> memory_budget("lots")
    Traceback (most recent call last):
    attnflow.errors.BadArgumentError: --memory-budget 'lots'; use a number of bytes or a size like 512MB or 2GiB
    """
    from attnflow.tracers.inputs import byte_count

    if text is None:
        return {}
    try:
        return {"memory_budget": byte_count("--memory-budget", text)}
    except BadArgumentError:
        raise BadArgumentError(f"--memory-budget {text!r}; use a number of bytes or a size like 512MB or 2GiB") from None


def flow_method(args) -> str | None:
    """The `--flow` method, or None when the shares cannot be computed from what is recorded (and none was asked for)."""
    from attnflow.flow import METHODS

    method = args.flow or "rollout"
    if method not in METHODS:
        raise BadArgumentError(f"--flow {method!r}; use one of {', '.join(METHODS)}")
    rows = parse_rows(args.rows)
    if method == "raw":
        ok = rows is None or rows == ("completion" if args.max_new_tokens else "last")
    else:
        ok = rows is None and args.layers is None
    if ok:
        return method
    if args.flow:
        need = "record every row and layer (drop --rows/--layers)" if method != "raw" else "record the rows it explains"
        raise BadArgumentError(f"--flow {method} needs {need}, or use --flow raw")
    return None


def device_map(device: str, remote: bool):
    """--device -> the `device_map` of `af.load` (None = CPU)."""
    if remote:
        return None
    if device not in DEVICES and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise BadArgumentError(f"--device {device!r}; use auto, cpu, cuda or cuda:N")
    import torch

    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return None
    if not torch.cuda.is_available():
        raise BadArgumentError(f"--device {device} but no CUDA device is visible; use --device cpu (or auto)")
    return "cuda" if device == "auto" else device


def read_inputs(args) -> tuple[list, list]:
    """(prompts, documents) from --prompt, --prompt-file and --documents."""
    from attnflow.prompting import read_documents, read_prompts

    prompts = list(args.prompt) + (read_prompts(args.prompt_file) if args.prompt_file else [])
    if not prompts:
        raise BadArgumentError("no prompt; give --prompt TEXT or --prompt-file FILE")
    if args.system is not None and not args.chat:
        raise BadArgumentError("--system needs --chat (the system message goes into the chat template)")
    documents = read_documents(args.documents) if args.documents else []
    return prompts, documents


def run(args) -> int:
    import attnflow as af
    from attnflow.outdirs import check_out_dir
    from attnflow.prompting import build_prompt
    from attnflow.sources import completion_text, summarize

    options = options_from_args(args)
    method = flow_method(args)
    if args.top < 0:
        raise BadArgumentError(f"--top {args.top}; use 0 or more")
    exclude = tuple(_ints(args.exclude_keys, "--exclude-keys", "comma-separated key positions like 0") if args.exclude_keys else ())
    where = device_map(args.device, args.remote)
    prompts, documents = read_inputs(args)
    if args.out is not None:
        check_out_dir(args.out, "trace", overwrite=args.overwrite, inputs=[args.model, args.prompt_file, args.documents])
    if args.no_progress:  # also transformers' "Loading weights" bar
        from transformers.utils import logging

        logging.disable_progress_bar()
    if args.remote:  # NDIF holds the weights: open only the config and tokenizer here
        from attnflow.tracers.remote import load as load_remote

        model = load_remote(args.model)
    else:
        model = af.load(args.model, dtype=args.model_dtype, device_map=where)
    built = [build_prompt(p, model.tokenizer, documents=documents, chat=args.chat, system=args.system) for p in prompts]
    tr = af.trace(model, [b.prompt for b in built], spans=[b.spans for b in built], options=options)
    out = tr.save(args.out, overwrite=args.overwrite) if args.out is not None else None
    summary = summarize(tr, method, top=args.top, exclude_keys=exclude) if method else None
    dtype = str(tr.patterns.dtype).removeprefix("torch.")
    if args.json:
        print(json.dumps(_json(args, model, tr, out, dtype, method, summary, completion_text), ensure_ascii=False))
        return 0
    where_saved = f"-> {out}" if out is not None else "(not saved; --out DIR keeps it)"
    print(
        f"recorded {tr.batch_size} prompt(s), {len(tr.layers)} layers, heads={tr.heads}, rows={args.rows or 'all'}: "
        f"patterns {tuple(tr.patterns.shape)} {dtype} {where_saved}"
    )
    for ex in summary or []:
        print(_text(ex))
    return 0


def _json(args, model, tr, out, dtype, method, summary, completion_text) -> dict:
    examples = summary or [
        {"example": b, "completion": completion_text(tr, b), "completion_tokens": tr.lengths[b] - tr.prompt_lengths[b]}
        for b in range(tr.batch_size)
    ]
    return {
        "model": os.fspath(args.model),
        "model_dtype": None if args.remote else str(model._module.dtype).removeprefix("torch."),
        "device": "remote" if args.remote else str(model._module.device),
        "method": method,
        "saved": None if out is None else str(out),
        "patterns": {"shape": list(tr.patterns.shape), "dtype": dtype, "heads": tr.heads, "layers": list(tr.layers)},
        "prompt_tokens": list(tr.prompt_lengths),
        "examples": examples,
    }


def _text(ex: dict) -> str:
    """One example's completion and sources, as indented lines."""
    over = "the completion" if ex["targets"] == "completion" else "the next token"
    lines = [f"[{ex['example']}] completion ({ex['completion_tokens']} tokens): {ex['completion']!r}",
             f"    {ex['method']} shares over {over}:"]  # fmt: skip
    if ex["documents"]:
        width = max(len(d["name"]) for d in ex["documents"])
        for d in ex["documents"]:
            lines.append(f"      {d['rank']:>2}. {d['name']:<{width}}  {d['share']:.3f}   top tokens: {_tokens(d['top_tokens'])}")
        lines.append(f"          {'other':<{width}}  {ex['other_share']:.3f}   (question, template, completion)")
    else:
        lines.append(f"      top tokens: {_tokens(ex['top_tokens'])}")
    return "\n".join(lines)


def _tokens(tokens: list[dict]) -> str:
    return ", ".join(f"{t['text']!r} {t['share']:.3f}" for t in tokens) or "-"
