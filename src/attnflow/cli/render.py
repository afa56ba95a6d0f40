"""`attnflow render TRACE_DIR --out DIR [--shard-bytes N]`: a saved trace (with its flow and attributions
tables when present) to an offline HTML viewer.

    $ attnflow render trace/ --out view/
    wrote view/index.html (9 files, 0.1 MiB)
"""

from __future__ import annotations

from pathlib import Path


def add_parser(subparsers) -> None:
    r = subparsers.add_parser("render", help="turn a saved trace into an offline HTML viewer")
    r.add_argument("trace_dir", help="directory written by `attnflow trace` or AttentionTrace.save")
    r.add_argument("--out", required=True, help="directory for index.html and its shards")
    r.add_argument("--shard-bytes", type=int, default=8 * 2**20, help="largest shard file, in bytes")
    r.set_defaults(func=run)


def run(args) -> int:
    from attnflow.attention_trace import AttentionTrace
    from attnflow.exporters import flow_tensor, read_attributions, read_flow, to_html

    src = Path(args.trace_dir)
    tr = AttentionTrace.load(src)
    flow = None
    if (src / "flow").is_dir():
        tab = read_flow(src)
        flow = {m: flow_tensor(tab, tr, m) for m in sorted(set(tab["method"].to_pylist()))}
    attributions = read_attributions(src) if (src / "attributions").is_dir() else None
    out = to_html(tr, args.out, shard_bytes=args.shard_bytes, flow=flow, attributions=attributions, progress=True)
    files = list(out.rglob("*"))
    size = sum(f.stat().st_size for f in files if f.is_file())
    print(f"wrote {out / 'index.html'} ({len(files)} files, {size / 2**20:.1f} MiB)")
    return 0
