"""`attnflow serve [--model DIR_OR_GGUF ...] [--models-dir DIR] [--port N] [--no-browser]`.

    $ attnflow serve                        # the embedded demo model
    attnflow serve: http://127.0.0.1:40123/#token=...
"""

from __future__ import annotations


def add_parser(subparsers):
    """Register `serve` on an argparse subparsers object; returns its parser."""
    s = subparsers.add_parser("serve", help="the interactive flow explorer in the browser (local web page)")
    s.add_argument("--model", action="append", default=None, metavar="DIR_OR_GGUF",
                   help="a local model directory or .gguf file to offer (repeatable; default: the demo model)")
    s.add_argument("--models-dir", default=None, help="offer every model directory / .gguf file under DIR")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    s.add_argument("--allow-remote", action="store_true", help="allow a --host other than loopback (warns)")
    s.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    s.add_argument("--no-browser", action="store_true", help="print the URL, do not open a browser")
    s.add_argument("--max-tokens", type=int, default=2048, help="largest prompt + completion per run (default 2048)")
    s.add_argument("--max-new-tokens", type=int, default=64, help="largest completion a page may ask for (default 64)")
    s.add_argument("--max-queued", type=int, default=4, help="runs waiting or running at once (default 4)")
    s.add_argument("--cache-mib", type=int, default=2048, help="memory for finished runs, MiB (default 2048)")
    s.set_defaults(func=run)
    return s


def run(args) -> int:
    from attnflow.errors import BadArgumentError
    from attnflow.explorer import serve
    from attnflow.explorer.runs import Limits

    for flag in ("max_tokens", "max_new_tokens", "max_queued", "cache_mib"):
        if getattr(args, flag) < 1:
            raise BadArgumentError(f"--{flag.replace('_', '-')} {getattr(args, flag)}; give a positive number")
    if not 0 <= args.port < 65536:
        raise BadArgumentError(f"--port {args.port}; use 0 (a free port) or 1..65535")
    limits = Limits(max_tokens=args.max_tokens, max_new_tokens=args.max_new_tokens, max_queued=args.max_queued,
                    cache_bytes=args.cache_mib << 20)
    serve(args.model, models_dir=args.models_dir, host=args.host, port=args.port, allow_remote=args.allow_remote,
          open_browser=not args.no_browser, limits=limits)
    return 0
