"""The engine's bottom layer: what a name may be, how a home is made, whether a process lives, and
how any file gpctl did not write itself is opened (regular files only, bounded reads).

Every other engine module may import this one; it imports no engine module (tests/test_boundary.py
checks that the engine's imports have no cycle), so config, rundir and jobs no longer lean on each
other for these three helpers.
"""
from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path
from typing import BinaryIO

DIR_MODE = 0o700      # folders gpctl creates: owner-only (docs/steering.md, "Security")
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


# ------------------------------------------------------------------ one reading discipline

SMALL_FILE = 1 << 20   # bytes: status.json, config.toml, settings, presets, caches: bigger is refused


class NotRegular(OSError):
    """The path is not a regular file (a FIFO, a device, a folder, a socket or, for run files, a
    symbolic link): nothing is read from it. `strerror` says what it is."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: str | os.PathLike, follow: bool = False) -> BinaryIO:
    """Open `path` for reading only if it is a regular file, deciding on the open descriptor (so a
    file swapped for a FIFO between a check and the open can never block the reader).

    `follow=False` (files inside a run directory, which gpctl writes itself) also refuses a symbolic
    link, so a link to a device or to a file outside the home is never read; `follow=True` is for
    files a user names (presets, settings), which may be links to regular files."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.ELOOP and not follow:
            raise NotRegular(errno.ELOOP, "a symbolic link (run files are never followed)", str(path)) from None
        if e.errno == errno.ENXIO:   # a FIFO or socket with no writer, opened non-blocking
            raise NotRegular(errno.ENXIO, "not a regular file", str(path)) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegular(errno.EINVAL, f"{_kind(st.st_mode)}, not a regular file", str(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_small(path: str | os.PathLike, limit: int = SMALL_FILE, follow: bool = False) -> bytes:
    """The whole of a small regular file; a bigger one raises NotRegular naming its size and the limit."""
    with open_regular(path, follow) as f:
        size = os.fstat(f.fileno()).st_size
        data = f.read(limit + 1) if size <= limit else b""
    if size > limit or len(data) > limit:
        raise NotRegular(errno.EFBIG, f"{max(size, len(data))} bytes, over the {limit}-byte limit for this file",
                         str(path))
    return data
