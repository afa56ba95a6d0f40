"""`attnflow` command line: demo, trace, convert, render, eval, serve.

Every command takes --help; bad input exits with code 2 and one line on stderr
(argparse's own complaints too: an unknown flag, a value that is no integer), Ctrl-C with 130.  Each command is a module with `add_parser(subparsers)` and
`run(args) -> int` that turns the arguments into library calls; the modules
import torch only inside `run`, so `attnflow --help` and `--version` stay fast.

    >>> main(["demo", "--examples", "0"])     # stderr: attnflow: error: --examples 0; give at least 1
    2
    >>> main(["demo", "--examples", "x"])     # stderr: attnflow: error: argument --examples: invalid int value: 'x' ...
    2
"""

from __future__ import annotations

import argparse
import sys

from attnflow._version import __version__
from attnflow.cli import convert, demo, eval, render, serve, trace  # noqa: A004  (the command, not the builtin)
from attnflow.errors import AttnflowError, BadArgumentError

COMMANDS = (demo, trace, convert, render, eval, serve)


class Parser(argparse.ArgumentParser):
    """argparse with its usage errors as one BadArgumentError line (its own print is usage + message, two lines or more).

    Subcommand parsers are of the same class (argparse makes them with `type(parent)`).
    """

    def error(self, message: str):
        raise BadArgumentError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="attnflow", description="Record, compose and view attention flow.")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return p


def _quiet_transformers() -> None:
    """attnflow shows its own progress bars; transformers' weight-loading bar and advisories are noise here."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except BadArgumentError as err:
        print(f"attnflow: error: {err}", file=sys.stderr)
        return 2
    if args.version:
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
    except OSError as err:
        if err.errno is None:
            raise
        from attnflow._io import storage_error  # a refusal no reader turned into a StorageError: still one line

        print(f"attnflow: error: {storage_error(err, err.filename or 'a file', 'use')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("attnflow: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
