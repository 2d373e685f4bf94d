"""What every gpctl command shares: consoles, the home folder, option aliases, error handling."""
from __future__ import annotations

import contextlib
import functools
import sqlite3
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from engine.config import ConfigError
from engine.control import ControlError
from engine.errors import CheckpointError, DataMissing
from engine.store.rundir import UnknownRun, home

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def print_json(data, default=None) -> None:
    """`--json` output: plain JSON on stdout, indented, never coloured (whatever a terminal library
    decided about colour earlier in the process) and ASCII-escaped, so that any name, even one with a
    lone surrogate, prints and any parser reads it."""
    import json
    import sys
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=True, default=default) + "\n")
    sys.stdout.flush()


def complete_run(ctx: typer.Context, incomplete: str) -> list[str]:
    """Shell completion of run ids, from the home the command line names (or $GPCTL_HOME)."""
    from engine.store.rundir import list_runs
    root = home(ctx.find_root().params.get("home_dir"))
    return [rd.id for rd in list_runs(root) if rd.id.startswith(incomplete)]


def complete_preset(incomplete: str) -> list[str]:
    """Shell completion of preset names (what `gpctl presets` lists)."""
    from engine.presets import preset_dirs
    names = sorted({p.stem for d in preset_dirs() for p in d.glob("*.toml")})
    return [n for n in names if n.startswith(incomplete)]


RunArg = Annotated[str, typer.Argument(help="Run id or a unique prefix of it.", autocompletion=complete_run)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", metavar="KEY=VALUE",
                                                     help="Override a config key: key=value (dotted for tables); repeatable.")]
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
        except BrokenPipeError:  # `gpctl ls | head`: the reader has what it wanted; no error, no traceback
            quiet_stdout()
            raise typer.Exit(0) from None
        except OSError as e:   # an unwritable home, a --home that is a file, a full disk: name the path
            where = f"{e.filename}: " if e.filename else ""
            err.print(f"error: {where}{e.strerror or e}", markup=False)
            raise typer.Exit(2) from None
        except RuntimeError as e:     # sbatch/squeue/scancel missing or refusing: one line
            from engine.launch.slurm import SlurmError
            if not isinstance(e, SlurmError):
                raise
            err.print(f"error: {e}", markup=False)
            raise typer.Exit(2) from None
        except sqlite3.Error as e:
            err.print(f"error: {State.home / 'jobs.db'}: {e}", markup=False)
            raise typer.Exit(2) from None
    return wrapper


def quiet_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null, so Python's flush at exit says nothing either
    (the recipe of Python's signal docs, "Note on SIGPIPE")."""
    import os
    import sys
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):   # a stdout with no file descriptor (tests)
        pass


def fmt(v, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def plain_table(headers: tuple[str, ...], rows: list[list[str]], left: int = 1) -> str:
    """Aligned columns that are never cut, whatever the terminal's width or a pipe (kubectl-style):
    the first `left` columns are left-aligned, the rest right-aligned."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells) -> str:
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([line(headers)] + [line(r) for r in rows])


class _Quiet:
    def update(self, *args, **kwargs) -> None:
        pass


@contextlib.contextmanager
def progress_status(text: str):
    """A spinner on stderr saying what long work is doing (`.update(text)` as it goes); nothing when
    stderr is not a terminal, so pipes and --json stay clean."""
    if not err.is_terminal:
        yield _Quiet()
        return
    with err.status(text) as status:
        yield status


# ---------------------------------------------------------------- arguments, checked before any work

FIGURE_SUFFIXES = (".png", ".svg", ".pdf")
MAX_PRIORITY = 10 ** 9


def check_figure(option: str, path: Path | None) -> None:
    """A figure's file: a suffix matplotlib writes and gpctl documents."""
    if path is not None and path.suffix.lower() not in FIGURE_SUFFIXES:
        raise ConfigError(f"{option} {str(path)!r}: a figure is written as {', '.join(FIGURE_SUFFIXES)} "
                          f"(got {path.suffix or 'no suffix'!r})")


def check_int(option: str, value: int | None, lo: int, hi: int) -> None:
    if value is not None and not lo <= value <= hi:
        raise ConfigError(f"{option} must be in [{lo}, {hi}], got {value if abs(value) < 10 ** 30 else 'a larger number'}")


def check_float(option: str, value: float | None, lo: float, hi: float = float("inf")) -> None:
    import math
    if value is not None and not (math.isfinite(value) and lo <= value <= hi):
        raise ConfigError(f"{option} must be a finite number in [{lo:g}, {hi:g}], got {value}")


def check_device(option: str, value: str) -> None:
    import re
    if not re.fullmatch(r"auto|cpu|cuda(:\d{1,3})?", value):
        raise ConfigError(f"{option} {value!r} is not one of auto, cpu, cuda, cuda:N")


def parse_steps(option: str, text: str | None) -> list[int] | None:
    """`--at-steps 100,200`: whole steps >= 0, comma-separated."""
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() and len(p) <= 12 for p in parts):
        raise ConfigError(f"{option} {text[:60]!r}: expected whole steps separated by commas, e.g. 100,200")
    return [int(p) for p in parts]


def parse_gpus(text: str | None) -> list[str] | None:
    """`--gpus 0,1`: GPU indices, comma-separated, each once."""
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() and len(p) <= 3 for p in parts) or len(set(parts)) != len(parts):
        raise ConfigError(f"--gpus {text[:60]!r}: expected GPU indices separated by commas, each once, e.g. 0,1")
    return parts
