"""Output-folder checks for commands: `attnflow._io.check_output`, with the flag named and a BadArgumentError.

The rules are `_io`'s (issue 17): attnflow writes into a new or empty folder, replaces
only a folder it wrote itself, of the same kind, and only when asked to overwrite;
never a file, never a folder that is or holds an input.

    >>> check_out_dir("runs/tr", "trace")                      # new or empty: fine
    PosixPath('runs/tr')
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from attnflow import _io
from attnflow.errors import BadArgumentError, DataError


def output_kind(folder: str | os.PathLike) -> str | None:
    """The kind of attnflow output in `folder` ("trace", "model", ...), or None when attnflow did not write it."""
    return _io.folder_kind(folder)


def write_marker(folder: str | os.PathLike, kind: str, **facts) -> None:
    """Write `folder/manifest.json` saying attnflow wrote a `kind` output there (outputs without a manifest of their own)."""
    from attnflow._version import __version__

    _io.write_json(Path(folder) / "manifest.json", {"kind": kind, "attnflow_version": __version__, **facts})


def check_out_dir(
    out: str | os.PathLike, kind: str, *, overwrite: bool = False, inputs: Iterable[str | os.PathLike | None] = (),
    flag: str = "--out",
) -> Path:
    """`out` if attnflow may write a `kind` output there; else BadArgumentError naming `flag` and saying why."""
    path = Path(out).expanduser()
    try:
        _io.check_output(path, kind, overwrite, [i for i in inputs if i is not None and os.path.exists(i)])
    except DataError as err:
        raise BadArgumentError(f"{flag}: {err}") from None
    return path


__all__ = ["check_out_dir", "output_kind", "write_marker"]
