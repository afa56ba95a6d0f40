"""Output folders that never destroy a user's files (issue 17, item 1).

attnflow writes into a new folder (or an empty one).  An existing non-empty folder
is replaced only when attnflow wrote it, it holds the same kind of output (the
`kind` of its `manifest.json`), and the caller asked to overwrite.  A file is
never an output folder, and neither is a folder that is one of the inputs or
contains one.

    >>> check_out_dir("runs/tr", "trace")                      # new or empty: fine
    PosixPath('runs/tr')
    >>> check_out_dir("thesis", "trace")                       # holds thesis.tex
    Traceback (most recent call last):
    attnflow.errors.BadArgumentError: --out 'thesis' is a non-empty folder attnflow did not write; pick a new output folder
    >>> check_out_dir("models", "model", inputs=["models/smollm2.gguf"])
    Traceback (most recent call last):
    attnflow.errors.BadArgumentError: --out 'models' contains the input 'models/smollm2.gguf'; pick an output folder that holds no input

A folder's kind is the manifest's `"kind"`.  Traces saved before the marker existed
hold a manifest with `schema_version` and `attnflow_version` and no `kind`: they count
as kind "trace".
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from attnflow.errors import BadArgumentError

MANIFEST = "manifest.json"
KINDS = ("trace", "model")


def output_kind(folder: str | os.PathLike) -> str | None:
    """The kind of attnflow output in `folder` ("trace", "model", ...), or None when attnflow did not write it.

        >>> output_kind("runs/tr")                               # written by AttentionTrace.save
        'trace'
    """
    file = Path(folder) / MANIFEST
    try:
        man = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(man, dict) or "attnflow_version" not in man:
        return None
    kind = man.get("kind", "trace" if "schema_version" in man else None)
    return kind if isinstance(kind, str) else None


def write_marker(folder: str | os.PathLike, kind: str, **facts) -> None:
    """Write `folder/manifest.json` saying attnflow wrote a `kind` output there (for outputs without a manifest of their own)."""
    from attnflow import _io
    from attnflow._version import __version__

    _io.write_json(Path(folder) / MANIFEST, {"kind": kind, "attnflow_version": __version__, **facts})


def check_out_dir(
    out: str | os.PathLike,
    kind: str,
    *,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike | None] = (),
    flag: str = "--out",
    again: str | None = None,
) -> Path:
    """`out` if attnflow may write a `kind` output there; else BadArgumentError saying why and what to do.

    out        the output folder
    kind       what will be written ("trace", "model")
    overwrite  allow replacing an existing folder of the same kind that attnflow wrote
    inputs     paths the command reads (model, data files): out may be none of them, nor contain one
               (checked first, so even --overwrite cannot replace an input)
    flag       how the message names the output (the CLI flag, or an argument name)
    again      how the message says "overwrite" (default: --overwrite for a flag, overwrite=True otherwise)
    """
    path = Path(out).expanduser()
    shown = str(out)
    for src in inputs:
        if src is None or not os.path.exists(src):
            continue
        if _same_or_inside(Path(src), path):  # replacing `out` would delete the input
            rel = "is the input" if _resolve(src) == _resolve(path) else "contains the input"
            raise BadArgumentError(f"{flag} {shown!r} {rel} {str(src)!r}; pick an output folder that holds no input")
    if not path.exists() and not path.is_symlink():
        return path
    if not path.is_dir():
        raise BadArgumentError(f"{flag} {shown!r} is a file, not a folder; pick a new output folder")
    if not any(path.iterdir()):
        return path
    found = output_kind(path)
    if found is None:
        raise BadArgumentError(f"{flag} {shown!r} is a non-empty folder attnflow did not write; pick a new output folder")
    if found != kind:
        raise BadArgumentError(f"{flag} {shown!r} holds an attnflow {found}, not a {kind}; pick a new output folder")
    if not overwrite:
        again = again or ("--overwrite" if flag.startswith("--") else "overwrite=True")
        raise BadArgumentError(
            f"{flag} {shown!r} is not an empty folder: it holds an attnflow {kind}; pass {again} to replace it, "
            "or pick a new output folder"
        )
    return path


def _resolve(p: str | os.PathLike) -> Path:
    return Path(p).expanduser().resolve()


def _same_or_inside(inner: Path, outer: Path) -> bool:
    """Whether `inner` is `outer` or lies under it (after resolving links)."""
    a, b = _resolve(inner), _resolve(outer)
    return a == b or b in a.parents


__all__ = ["check_out_dir", "output_kind", "write_marker"]
