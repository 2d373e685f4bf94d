"""The engine's bottom layer: what a name may be, how a home is made, whether a process lives.

Every other engine module may import this one; it imports no engine module (tests/test_boundary.py
checks that the engine's imports have no cycle), so config, rundir and jobs no longer lean on each
other for these three helpers.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

DIR_MODE = 0o700      # folders gpctl creates: owner-only (README, "Security")
FILE_MODE = 0o600     # files likewise


def is_name(text: str) -> bool:
    """Preset, arm and run names become paths: letters, digits, '_', '.', '-'; no '..'; not empty."""
    return bool(re.fullmatch(r"[A-Za-z0-9_.-]{1,200}", text)) and ".." not in text and not text.startswith(".")


def make_home(root: Path) -> None:
    """The home, owner-only when gpctl creates it (its parents keep the usual modes)."""
    if not root.exists():
        root.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        root.chmod(DIR_MODE)


def pid_alive(pid: int | None) -> bool:
    """Whether process `pid` runs on this host (a zombie counts as gone)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True
