"""Where a run's code came from: recorded when the run is created, checked when each attempt starts.

provenance.json in the run's folder holds what `gpctl show` says about the code:

    version   gpctl's version (the installed distribution's, or the checkout's pyproject)
    git       when gpctl runs from a git checkout: the commit, whether the tracked files differ from
              it (`dirty`), the size and sha256 of `git diff HEAD` (kept whole in code.diff up to
              MAX_DIFF bytes), and the untracked files' names (up to 20, and how many)
    python, platform, host, torch (the installed distribution's version, read without importing it)

When an attempt starts, the engine computes the code identity again (`same_code`); where it differs
(a commit, an edit, an upgrade between enqueue and start: task-spooler's users lose experiments to
exactly this) the attempt records a `code_changed` event and its log says so. No torch here: the
loop adds torch's CUDA version and the device's name to its start event itself.
"""
from __future__ import annotations

import hashlib
import json
import platform
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]     # the checkout (or site-packages) engine/ lives in
MAX_DIFF = 1 << 20                             # code.diff is kept whole up to this; past it, size and sha256
_TTL = 1.0                                     # one command creating 300 runs asks git once a second
_cache: tuple[float, Path, dict] | None = None


def _git(root: Path, *args: str) -> bytes | None:
    try:
        p = subprocess.run(["git", "-C", str(root), *args], capture_output=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None                            # no git on this machine (a GPU box), or it hung
    return p.stdout if p.returncode == 0 else None


def _version(root: Path) -> str | None:
    try:
        return metadata.version("gpctl")
    except metadata.PackageNotFoundError:
        pass
    try:
        import tomllib
        return tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"]
    except (OSError, ValueError, KeyError):
        return None


def code_identity(root: Path | None = None, fresh: bool = False) -> dict:
    """The code gpctl runs: its version and, in a git checkout, commit, dirtiness and diff (with the
    diff's text under "_diff", which write() keeps in code.diff and never in provenance.json)."""
    global _cache
    root = Path(root or ROOT)
    now = time.monotonic()
    if not fresh and _cache and _cache[1] == root and now - _cache[0] < _TTL:
        return _cache[2]
    out: dict = {"version": _version(root), "root": str(root), "git": None}
    top = _git(root, "rev-parse", "--show-toplevel")
    if top is not None and Path(top.decode().strip()).resolve() == root.resolve():   # this checkout, not a parent's
        commit = (_git(root, "rev-parse", "HEAD") or b"").decode().strip() or None
        diff = _git(root, "diff", "HEAD", "--no-color", "--no-ext-diff") or b""
        untracked = [n for n in (_git(root, "ls-files", "--others", "--exclude-standard") or b"").decode(
            errors="replace").splitlines() if n]
        out["git"] = {"commit": commit, "dirty": bool(diff), "diff_bytes": len(diff),
                      "diff_sha256": hashlib.sha256(diff).hexdigest() if diff else None,
                      "untracked": untracked[:20], "untracked_count": len(untracked)}
        out["_diff"] = diff
    _cache = (now, root, out)
    return out


def environment() -> dict:
    try:
        torch = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch = None
    return {"python": platform.python_version(), "platform": platform.platform(terse=True),
            "host": socket.gethostname(), "torch": torch, "executable": sys.executable}


def write(folder: Path) -> dict:
    """provenance.json (and code.diff) in a new run's folder; returns what was written."""
    from engine.store.rundir import write_atomic
    try:
        code = dict(code_identity())
    except Exception as e:  # noqa: BLE001 - what the code is never stops a run from being made
        code = {"version": _version(ROOT), "root": str(ROOT), "git": None, "error": f"{type(e).__name__}: {e}"[:300]}
    diff = code.pop("_diff", b"")
    if diff and len(diff) <= MAX_DIFF:
        (folder / "code.diff").write_bytes(diff)
    rec = {"created": time.time(), "code": code, "environment": environment()}
    write_atomic(folder / "provenance.json", json.dumps(rec, indent=1) + "\n")
    return rec


def read(folder: Path) -> dict | None:
    """The run's provenance.json, or None (a run made before it existed, or a damaged file)."""
    from engine.fs import read_small
    try:
        data = json.loads(read_small(folder / "provenance.json"))
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("code"), dict) else None


def fingerprint(code: dict | None) -> tuple:
    """What makes two code identities the same code: version, commit, the diff's sha256."""
    if not isinstance(code, dict):
        return (None, None, None)
    git = code.get("git") if isinstance(code.get("git"), dict) else {}
    return (code.get("version"), git.get("commit"), git.get("diff_sha256"))


def same_code(a: dict | None, b: dict | None) -> bool:
    return fingerprint(a) == fingerprint(b)


def code_text(code: dict | None) -> str:
    """"gpctl 0.1.0, git 24a1c48 + uncommitted changes (2.1 kB diff, sha256 1f2e3d4c)"."""
    if not isinstance(code, dict):
        return "not recorded"
    parts = [f"gpctl {code.get('version') or '?'}"]
    git = code.get("git")
    if isinstance(git, dict):
        commit = (git.get("commit") or "?")[:10]
        if git.get("dirty"):
            commit += (f" + uncommitted changes ({git.get('diff_bytes', 0) / 1000:.1f} kB diff, "
                       f"sha256 {(git.get('diff_sha256') or '?')[:8]})")
        if git.get("untracked_count"):
            commit += f", {git['untracked_count']} untracked file{'s' if git['untracked_count'] != 1 else ''}"
        parts.append(f"git {commit}")
    else:
        parts.append("not from a git checkout")
    return ", ".join(parts)
