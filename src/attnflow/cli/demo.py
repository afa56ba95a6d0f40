"""`attnflow demo [--out DIR] [--examples N] [--two-hop] [--seed S] [--no-progress]`: the model organism end to end.

    $ attnflow demo --examples 32 --out attnflow-demo
    attnflow demo: 32 held-out single-hop questions (seed 1234), ...
    attnflow-demo/html/index.html
"""

from __future__ import annotations

from attnflow.errors import BadArgumentError


def add_parser(subparsers) -> None:
    d = subparsers.add_parser("demo", help="run the embedded model organism end to end (offline)")
    d.add_argument("--out", default="attnflow-demo", help="output directory (default: ./attnflow-demo)")
    d.add_argument("--examples", type=int, default=32, help="held-out task instances to answer (default: 32)")
    d.add_argument("--two-hop", action="store_true", help="ask two-hop questions (the answer needs two documents)")
    d.add_argument("--seed", type=int, default=1234, help="seed of the generated instances")
    d.add_argument("--no-progress", action="store_true", help="hide progress bars")
    d.set_defaults(func=run)


def run(args) -> int:
    """Run `attnflow.demo.run.run`, print its summary table, then the viewer's path."""
    from attnflow.demo.run import format_summary, run as run_demo

    if args.examples < 1:
        raise BadArgumentError(f"--examples {args.examples}; give at least 1")
    summary = run_demo(args.out, examples=args.examples, two_hop=args.two_hop, seed=args.seed,
                       progress=not args.no_progress)  # fmt: skip
    print(format_summary(summary))
    print(summary["viewer"])
    return 0
