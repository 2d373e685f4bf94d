"""What every gpctl command shares: consoles, the home folder, option aliases, error handling."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from engine.checkpoint import CheckpointError
from engine.config import ConfigError
from engine.control import ControlError
from engine.data.stream import DataMissing
from engine.rundir import UnknownRun, home

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

RunArg = Annotated[str, typer.Argument(help="Run id or a unique prefix of it.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override a config key: key=value (dotted for tables).")]
WaitOpt = Annotated[bool, typer.Option("--wait", help="Wait for the run's acknowledgement and print it.")]
TimeoutOpt = Annotated[float, typer.Option("--timeout", help="Seconds to wait with --wait.")]

USER_ERRORS = (ConfigError, UnknownRun, DataMissing, CheckpointError, ControlError)


class State:
    home: Path = home()


def friendly(fn):
    """One clear line and exit code 2 for errors the user can cause."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            err.print(f"error: {e}", markup=False)
            raise typer.Exit(2) from None
    return wrapper


def fmt(v, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"
