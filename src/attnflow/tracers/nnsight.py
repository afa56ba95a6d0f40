"""The old name of `attnflow.tracers.hf`, kept while `tracers/command.py` imports `storage_dtype` from here."""

from attnflow._dtypes import storage_dtype

__all__ = ["storage_dtype"]
