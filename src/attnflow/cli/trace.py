"""`attnflow trace MODEL --prompt TEXT ... --out DIR`: load, record, save, print a one-line summary.

    $ attnflow trace runs/tiny-llama --prompt "the cat sat" --heads mean --rows last --out trace/
    recorded 1 prompt(s), 2 layers, heads=mean, rows=last: patterns (1, 2, 1, 1, 3) float16 -> trace/
"""

from __future__ import annotations

from attnflow.errors import BadArgumentError


def add_parser(subparsers) -> None:
    t = subparsers.add_parser("trace", help="record attention patterns of a model on a prompt into a saved trace")
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
    t.set_defaults(func=run)


def parse_rows(text: str | None):
    """--rows: None, "last", "completion", or comma-separated integers.

    >>> parse_rows("last"), parse_rows("0,-1")
    ('last', [0, -1])
    """
    if text is None or text in ("last", "completion"):
        return text
    return _ints(text, "--rows", "last | completion | comma-separated positions like 0,-1")


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
        heads=args.heads,
        rows=parse_rows(args.rows),
        layers=parse_layers(args.layers),
        dtype=args.dtype,
        batch_size=args.batch_size,
        remote=bool(args.remote),
        progress=not args.no_progress,
    )


def run(args) -> int:
    import attnflow as af

    options = options_from_args(args)
    if args.no_progress:  # also transformers' "Loading weights" bar
        from transformers.utils import logging

        logging.disable_progress_bar()
    if args.remote:  # NDIF holds the weights: open only the config and tokenizer here
        from attnflow.tracers.remote import load as load_remote

        model = load_remote(args.model)
    else:
        model = af.load(args.model)
    tr = af.trace(model, list(args.prompt), options=options)
    out = tr.save(args.out)
    dtype = str(tr.patterns.dtype).removeprefix("torch.")
    print(
        f"recorded {tr.batch_size} prompt(s), {len(tr.layers)} layers, heads={tr.heads}, rows={args.rows or 'all'}: "
        f"patterns {tuple(tr.patterns.shape)} {dtype} -> {out}"
    )
    return 0
