"""Runs that travel: a report folder's copy of runs, its checksum manifest, and import into a home.

`gpctl report … --out DIR` (gpctl/report.py) writes, besides its figures and tables:

    DIR/runs/<run_id>/      each run's own files, as the run directory holds them (RUN_FILES),
                            with checkpoints/ when asked for
    DIR/MANIFEST.sha256     "<sha256>  <path>" for every other file of DIR, sorted, in the format
                            `sha256sum -c MANIFEST.sha256` checks

`gpctl import DIR` (import_runs) brings DIR's runs into another home, read-only: it checks every
checksum first and refuses the whole folder on the first file that differs, is missing, is not in
the manifest or is not a regular file (nothing is copied), then copies each run into
HOME/runs/<run_id>/ through a temporary folder and a rename, and writes imported.json there (where
from, when, the manifest's sha256). An imported run takes no request and never resumes
(RunDir.imported); it can be shown, plotted, compared, snapped and, with its checkpoints, forked.
A run already imported from an identical copy is skipped; one whose id exists here otherwise is
refused by name, before anything is copied.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import time
from pathlib import Path

from engine.config import ConfigError
from engine.fs import DIR_MODE, FILE_MODE, NotRegular, is_name, make_home, open_regular

MANIFEST = "MANIFEST.sha256"
IMPORTED = "imported.json"
# a run directory's own files (engine/store/rundir.py, provenance.py): what a report carries
RUN_FILES = ("config.toml", "status.json", "metrics.jsonl", "events.jsonl", "control.jsonl",
             "provenance.json", "code.diff", "tv_cache.json", "log.txt")
_EMPTY = ("metrics.jsonl", "events.jsonl", "control.jsonl", "log.txt")   # a run directory always has them


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open_regular(path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def copy_run(src: Path, dest: Path, checkpoints: bool = False) -> int:
    """Copy the run directory `src`'s own files (and its complete checkpoints) into `dest`; bytes
    copied. A file that is a link or not a regular file is refused by name (never followed)."""
    dest.mkdir(parents=True, mode=DIR_MODE)
    total = 0
    names = [n for n in RUN_FILES if os.path.lexists(src / n)]
    if checkpoints and (src / "checkpoints").is_dir():
        (dest / "checkpoints").mkdir(mode=DIR_MODE)
        names += sorted(f"checkpoints/{p.name}" for p in (src / "checkpoints").iterdir()
                        if p.name.endswith(".safetensors") and not p.name.startswith("."))
    for name in names:
        total += _copy(src / name, dest / name)
    return total


def _copy(src: Path, dest: Path) -> int:
    with open_regular(src) as f, open(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE), "wb") as g:
        shutil.copyfileobj(f, g, 1 << 20)
        return g.tell()


def write_manifest(root: Path) -> Path:
    """MANIFEST.sha256 over every regular file under `root` (but itself), sorted by path."""
    lines = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if rel != MANIFEST:
                lines.append(f"{sha256_file(p)}  {rel}")
    path = root / MANIFEST
    path.write_text("\n".join(sorted(lines, key=lambda s: s[66:])) + "\n")
    return path


def verify(root: Path) -> dict[str, str]:
    """Check every file of the report folder `root` against its MANIFEST.sha256; {path: sha256}.
    ConfigError naming the first problem: no manifest, a malformed line, a path outside the folder,
    a missing or changed file, or a file that is not in the manifest (or not a regular file)."""
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise ConfigError(f"{root}: no {MANIFEST} (not a gpctl report folder, or an incomplete copy)")
    listed: dict[str, str] = {}
    for n, line in enumerate(mpath.read_text(errors="replace").splitlines(), 1):
        digest, sep, rel = line.partition("  ")
        if not line.strip():
            continue
        if not sep or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ConfigError(f"{mpath}:{n}: not '<sha256>  <path>': {line[:80]!r}")
        parts = rel.split("/")
        if rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise ConfigError(f"{mpath}:{n}: path {rel!r} leaves the report folder")
        listed[rel] = digest
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            mode = os.lstat(p).st_mode
            if stat.S_ISDIR(mode):
                continue
            if not stat.S_ISREG(mode):
                raise ConfigError(f"{p}: not a regular file (a link or a device); the report is refused")
            if rel != MANIFEST and rel not in listed:
                raise ConfigError(f"{p}: not in {MANIFEST}: the folder was added to after the report was written")
    for rel, digest in listed.items():
        p = root / rel
        if not p.exists():
            raise ConfigError(f"{p}: listed in {MANIFEST} but missing (an incomplete copy)")
        try:
            got = sha256_file(p)
        except NotRegular as e:
            raise ConfigError(f"{p}: {e.strerror}") from None
        if got != digest:
            raise ConfigError(f"{p}: its sha256 is not the one in {MANIFEST} (changed or damaged since the "
                              f"report was written); nothing imported")
    return listed


def _same_copy(here: Path, src: Path) -> bool:
    """`here` (a run of this home) is an import of the same files as `src` (a report's copy)."""
    if not (here / IMPORTED).is_file():
        return False
    for name in RUN_FILES:
        a, b = here / name, src / name
        if b.exists() != a.exists() or (b.exists() and sha256_file(a) != sha256_file(b)):
            return False
    return True


def import_runs(home: Path, root: Path) -> dict:
    """Import the runs of the report folder `root` into `home` (read-only there): {"imported": [ids],
    "skipped": [ids already here from the same copy]}. Checks everything before copying anything."""
    root = root.resolve()
    verify(root)
    runs_dir = root / "runs"
    ids = sorted(p.name for p in runs_dir.iterdir() if p.is_dir()) if runs_dir.is_dir() else []
    if not ids:
        raise ConfigError(f"{root}: the report holds no runs ({runs_dir} is empty or missing)")
    from engine.store.rundir import RunDir
    todo, skipped = [], []
    for rid in ids:
        src = runs_dir / rid
        if not is_name(rid):
            raise ConfigError(f"{src}: {rid!r} is not a run id (letters, digits, _ . -)")
        if not (src / "config.toml").is_file():
            raise ConfigError(f"{src}: no config.toml: not a run's copy")
        RunDir(src).config()                      # a config that does not parse is refused here, by name
        here = home / "runs" / rid
        if os.path.lexists(here):
            if _same_copy(here, src):
                skipped.append(rid)
                continue
            raise ConfigError(f"run {rid} already exists in {home / 'runs'} and is not an import of this copy; "
                              f"nothing imported (remove or rename one of them)")
        todo.append(rid)
    make_home(home)
    (home / "runs").mkdir(exist_ok=True, mode=DIR_MODE)
    manifest_sha = sha256_file(root / MANIFEST)
    done = []
    for rid in todo:
        src, here = runs_dir / rid, home / "runs" / rid
        tmp = home / "runs" / f".{rid}.importing.{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            copy_run(src, tmp, checkpoints=True)
            for name in _EMPTY:
                if not (tmp / name).exists():
                    os.close(os.open(tmp / name, os.O_WRONLY | os.O_CREAT, FILE_MODE))
            (tmp / "checkpoints").mkdir(exist_ok=True, mode=DIR_MODE)
            (tmp / IMPORTED).write_text(json.dumps({"from": str(root), "at": time.time(),
                                                    "manifest_sha256": manifest_sha}) + "\n")
            os.chmod(tmp / IMPORTED, FILE_MODE)
            os.rename(tmp, here)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        done.append(rid)
    return {"imported": done, "skipped": skipped, "home": str(home)}

