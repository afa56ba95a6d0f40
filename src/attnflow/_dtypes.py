"""The storage dtypes of attention patterns: one table, shared by the tracers and the trace files.

    >>> storage_dtype("bfloat16"), storage_dtype(torch.float32)
    (torch.bfloat16, torch.float32)
    >>> dtype_name(torch.float16)
    'float16'

Imports only torch and `attnflow.errors`, so the data model can use it without
importing the tracers.
"""

from __future__ import annotations

import torch

from attnflow.errors import BadArgumentError

DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}


def storage_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A name in DTYPES or one of its torch dtypes -> the torch dtype; anything else: BadArgumentError.

        >>> storage_dtype("int8")
        Traceback (most recent call last):
        attnflow.errors.BadArgumentError: dtype='int8'; use one of float16, bfloat16, float32, float64
    """
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    raise BadArgumentError(f"dtype={dtype!r}; use one of {', '.join(DTYPES)}")


def dtype_name(dtype: torch.dtype) -> str:
    """The DTYPES key of a torch dtype ('float16' for torch.float16), as stored in settings and manifests."""
    return str(dtype).removeprefix("torch.")
