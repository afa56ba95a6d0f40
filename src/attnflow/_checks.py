"""The argument checks every public function shares: one line `BadArgumentError`s naming the argument and its value.

Imports nothing heavy (no torch), so the command line and the configs can use them.

    >>> count("max_new_tokens", True)
    Traceback (most recent call last):
    attnflow.errors.BadArgumentError: max_new_tokens=True; use a non-negative integer
    >>> number("alpha", "x", 0, 1, hint="0.5 weighs attention and residual equally")
    Traceback (most recent call last):
    attnflow.errors.BadArgumentError: alpha='x'; use a number in [0, 1] (0.5 weighs attention and residual equally)
    >>> flag("overwrite", "yes")
    Traceback (most recent call last):
    attnflow.errors.BadArgumentError: overwrite='yes'; use True or False
"""

from __future__ import annotations

import math
import numbers
import os
import re
from pathlib import Path
from typing import Any, Sequence

from attnflow.errors import BadArgumentError

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")  # the dtype names attnflow takes (`attnflow._dtypes`)


def is_int(value: Any) -> bool:
    """A plain integer (Python or numpy), never a bool: `True` is not a row, a layer or a count."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and type(value).__name__ != "bool_"


def count(name: str, value: Any, minimum: int = 0) -> int:
    """An int (not a bool) of at least `minimum`, else BadArgumentError naming `name`.

        >>> count("batch_size", 0, minimum=1)
        Traceback (most recent call last):
        attnflow.errors.BadArgumentError: batch_size=0; use a positive integer
    """
    if not is_int(value) or value < minimum:
        what = "a non-negative integer" if minimum == 0 else "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise BadArgumentError(f"{name}={value!r}; use {what}")
    return int(value)


def optional_count(name: str, value: Any, minimum: int = 0) -> int | None:
    """None, or `count(name, value, minimum)`."""
    return None if value is None else count(name, value, minimum)


def integer(name: str, value: Any, low: int, high: int) -> int:
    """An int (not a bool) in `low .. high - 1`, else BadArgumentError.

        >>> integer("layer", 1.5, -4, 4)
        Traceback (most recent call last):
        attnflow.errors.BadArgumentError: layer=1.5; use an integer in -4..3
    """
    if not is_int(value) or not low <= value < high:
        raise BadArgumentError(f"{name}={value!r}; use an integer in {low}..{high - 1}")
    return int(value)


def number(name: str, value: Any, low: float | None = None, high: float | None = None, hint: str = "") -> float:
    """A finite real number (not a bool, not a string) in `[low, high]`, else BadArgumentError."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok and (low is None or value >= low) and (high is None or value <= high):
        return float(value)
    where = f" in [{low:g}, {high:g}]" if low is not None and high is not None else f" >= {low:g}" if low is not None else ""
    raise BadArgumentError(f"{name}={value!r}; use a number{where}" + (f" ({hint})" if hint else ""))


def flag(name: str, value: Any) -> bool:
    """True or False (numpy bools too), else BadArgumentError: `"no"` is not False."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return bool(value)
    raise BadArgumentError(f"{name}={value!r}; use True or False")


def choice(name: str, value: Any, options: Sequence[str]) -> str:
    """One of `options`, else BadArgumentError listing them.

        >>> choice("mode", "sample", ("generate", "teacher"))
        Traceback (most recent call last):
        attnflow.errors.BadArgumentError: mode='sample'; use one of generate, teacher
    """
    if not isinstance(value, str) or value not in options:
        raise BadArgumentError(f"{name}={value!r}; use one of {', '.join(options)}")
    return value


def path(name: str, value: Any) -> Path:
    """A str or os.PathLike as a Path, else BadArgumentError (None is not a folder).

        >>> path("path", None)
        Traceback (most recent call last):
        attnflow.errors.BadArgumentError: path=None; use a str or pathlib.Path naming a file or folder
    """
    if isinstance(value, (str, os.PathLike)) and not isinstance(value, bytes) and os.fspath(value):
        return Path(value)
    raise BadArgumentError(f"{name}={value!r}; use a str or pathlib.Path naming a file or folder")


def instance(name: str, value: Any, cls: type, what: str) -> Any:
    """`value` when it is a `cls`, else BadArgumentError saying what to pass."""
    if not isinstance(value, cls):
        raise BadArgumentError(f"{name} is a {type(value).__name__}; pass {what}")
    return value


_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def byte_count(name: str, value: Any) -> int | None:
    """None, a positive number of bytes, or a size like "512MiB", "1.5GB", "2g" -> bytes (powers of 1024).

        >>> byte_count("memory_budget", "512MiB"), byte_count("memory_budget", 4096)
        (536870912, 4096)
        >>> byte_count("memory_budget", "lots")
        Traceback (most recent call last):
        attnflow.errors.BadArgumentError: memory_budget='lots'; use a number of bytes or a size like '512MiB' or '2GiB'
    """
    if value is None:
        return None
    bad = BadArgumentError(f"{name}={value!r}; use a number of bytes or a size like '512MiB' or '2GiB'")
    if is_int(value):
        if value < 1:
            raise bad
        return int(value)
    if not isinstance(value, str):
        raise bad
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kmgt]?)(?:i?b)?\s*", value.lower())
    if m is None or float(m.group(1)) <= 0:
        raise bad
    return max(1, int(float(m.group(1)) * _UNITS[m.group(2)]))
