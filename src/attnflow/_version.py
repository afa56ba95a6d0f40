"""The package version, in a module of its own so `attnflow --version` and pyproject read it without importing torch."""

__version__ = "0.1.0"
