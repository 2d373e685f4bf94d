"""The errors a user can cause, importable without torch (the CLI starts without it).

str(e) of each is the one line to print.
"""
from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; str(e) is the one line to print."""


class DataMissing(FileNotFoundError):
    """A real data set is not where the config says; str(e) is the one line to print."""
