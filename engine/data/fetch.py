"""Downloading a data set's public files: resumable, verified, one clear line when it cannot.

CIFAR-5m (Nakkiran, Neyshabur and Sedghi, "The Deep Bootstrap Framework", 2021) is six parts,
part0.npz … part5.npz, each about a million 32×32×3 uint8 images `X` and their labels `Y`, published
by its authors at CIFAR5M_URL (about 3 GB a part, ~18 GB in all). `get_cifar5m` downloads them into a
folder the config's `data.path` names:

- resumable: a part is written to `partK.npz.part` and continued with an HTTP range request after a
  cut connection (retried with backoff) or a later run of the command; a server that ignores ranges
  starts it again from the first byte;
- checked before it is kept: the byte count the server declared, then the file itself: a zip whose
  CRCs hold, with arrays X uint8 N×32×32×3 and Y, one integer label in [0, 10) per image; a part
  that fails is moved aside as `partK.npz.corrupt` and named;
- optionally converted to `partK.X.npy` / `partK.Y.npy`, which the CIFAR-5m loader memory-maps.

Standard library and numpy only (no torch): it runs wherever `gpctl data get` does.
"""
from __future__ import annotations

import http.client
import os
import re
import shutil
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

CIFAR5M_URL = "https://storage.googleapis.com/gresearch/cifar5m/part{k}.npz"   # the authors' release
CIFAR5M_PARTS = 6
CHUNK = 1 << 20


class FetchError(Exception):
    """A download or a check that failed; str(e) is the one line to print (it names the file)."""


Progress = Callable[[str, int, int | None], None]     # (name, bytes so far, total or None)


def _content_range(value: str | None) -> tuple[int, int | None]:
    """`bytes START-END/TOTAL` -> (START, TOTAL); TOTAL None when the server says `*`."""
    m = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", value or "")
    if not m:
        raise FetchError(f"the server answered a range request with Content-Range {value!r}")
    return int(m.group(1)), None if m.group(3) == "*" else int(m.group(3))


def download(url: str, dest: Path, progress: Progress | None = None, retries: int = 5, timeout: float = 60.0,
             backoff: float = 0.5) -> int:
    """Download `url` to `dest` through `dest`.part, resuming what an earlier try left; returns its
    size. Raises FetchError (naming the url and what is kept) when the server refuses or the
    connection fails `retries` times in a row."""
    part = dest.with_name(dest.name + ".part")
    total: int | None = None
    fails = 0
    while True:
        have = part.stat().st_size if part.exists() else 0
        req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                if r.status == 206:
                    start, size = _content_range(r.headers.get("Content-Range"))
                    if start != have:
                        raise FetchError(f"{url}: asked for bytes from {have}, the server sent from {start}")
                else:                                  # 200: the whole file (the server ignores ranges)
                    have, size = 0, int(r.headers["Content-Length"]) if r.headers.get("Content-Length") else None
                if total is not None and size is not None and size != total:
                    part.unlink(missing_ok=True)
                    raise FetchError(f"{url}: the server's size changed from {total} to {size} bytes during the "
                                     f"download; {part} removed, run again to start it anew")
                total = size if size is not None else total
                if total is not None:
                    free = shutil.disk_usage(dest.parent).free
                    if total - have > free:
                        raise FetchError(f"{dest.parent}: {total - have} more bytes needed for {dest.name}, "
                                         f"{free} free")
                with open(part, "ab" if have else "wb") as f:
                    while chunk := r.read(CHUNK):
                        f.write(chunk)
                        have += len(chunk)
                        fails = 0
                        if progress:
                            progress(dest.name, have, total)
        except urllib.error.HTTPError as e:
            if e.code == 416 and have and total is not None and have == total:
                break                                  # the range starts at its end: nothing left to send
            if e.code < 500:
                raise FetchError(f"{url}: HTTP {e.code} {e.reason}" + (f" ({have} bytes kept in {part})" if have else "")) from None
            reason = f"HTTP {e.code} {e.reason}"
        except FetchError:
            raise
        except (OSError, http.client.HTTPException) as e:   # a cut connection, a timeout, a refused connect
            reason = f"{type(e).__name__}: {e}".rstrip(": ")
        else:
            if total is None or have == total:
                break
            if have > total:
                part.unlink(missing_ok=True)
                raise FetchError(f"{url}: {have} bytes received, more than the {total} declared; {part} removed")
            reason = f"the connection closed at byte {have} of {total}"
        fails += 1
        if fails > retries:
            have = part.stat().st_size if part.exists() else 0
            raise FetchError(f"{url}: {reason}; {retries} retries in a row without progress; {have} of "
                             f"{total if total is not None else '?'} bytes kept in {part}: run the command again "
                             "to resume")
        time.sleep(min(backoff * 2 ** (fails - 1), 10.0))
    os.replace(part, dest)
    return dest.stat().st_size


def npy_header(zf: zipfile.ZipFile, member: str) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype of an array in an .npz without reading it."""
    with zf.open(member) as f:
        version = np.lib.format.read_magic(f)
        read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read is None:
            raise ValueError(f"{member}: .npy format version {version}")
        shape, _, dtype = read(f)
    return tuple(shape), dtype


def check_cifar5m_part(path: Path) -> int:
    """The number of images in a CIFAR-5m part, or FetchError naming the file and what is wrong."""
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()                          # every member's CRC
            if bad is not None:
                raise FetchError(f"{path}: not a CIFAR-5m part: member {bad} fails its CRC")
            names = set(zf.namelist())
            if not {"X.npy", "Y.npy"} <= names:
                raise FetchError(f"{path}: not a CIFAR-5m part: no X and Y arrays (it holds {', '.join(sorted(names))[:80]})")
            xs, xd = npy_header(zf, "X.npy")
            ys, yd = npy_header(zf, "Y.npy")
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise FetchError(f"{path}: not a CIFAR-5m part: {e}") from None
    if xd != np.uint8 or len(xs) != 4 or xs[1:] != (32, 32, 3):
        raise FetchError(f"{path}: X must be uint8 N×32×32×3, got {xd} {xs}")
    if len(ys) != 1 or ys[0] != xs[0] or yd.kind not in "iu":
        raise FetchError(f"{path}: Y must be one integer label per image ({xs[0]}), got {yd} {ys}")
    with np.load(path, allow_pickle=False) as z:
        y = z["Y"]
    if len(y) and (y.min() < 0 or y.max() > 9):
        raise FetchError(f"{path}: labels must be 0..9, found {y.min()}..{y.max()}")
    return xs[0]


def to_npy(path: Path) -> tuple[Path, Path]:
    """partK.npz -> partK.X.npy and partK.Y.npy (written beside it, then renamed into place), which
    the CIFAR-5m loader memory-maps. The .npz is kept."""
    stem = path.name[: -len(".npz")]
    out = (path.with_name(f"{stem}.X.npy"), path.with_name(f"{stem}.Y.npy"))
    with np.load(path, allow_pickle=False) as z:
        for key, dest in zip(("X", "Y"), out):
            tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
            try:
                with open(tmp, "wb") as f:
                    np.lib.format.write_array(f, z[key], allow_pickle=False)
                os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)
    return out


def get_cifar5m(out: Path, url: str = CIFAR5M_URL, parts: list[int] | None = None, npy: bool = False,
                progress: Progress | None = None, say: Callable[[str], None] = lambda line: None,
                retries: int = 5, backoff: float = 0.5) -> dict[str, int]:
    """Download and check CIFAR-5m's parts into `out`; returns {part file: images}. A part already
    there and sound is kept; a corrupt one is moved aside and named (FetchError after the others)."""
    if "{k}" not in url:
        raise FetchError(f"--url {url!r} must contain {{k}}, the part number (like {CIFAR5M_URL})")
    out.mkdir(parents=True, exist_ok=True)
    done, bad = {}, []
    for k in parts if parts is not None else range(CIFAR5M_PARTS):
        dest = out / f"part{k}.npz"
        if dest.exists():
            try:
                done[dest.name] = check_cifar5m_part(dest)
                say(f"{dest}: already there ({done[dest.name]} images)")
            except FetchError:
                dest.replace(dest.with_name(dest.name + ".corrupt"))
                say(f"{dest}: fails its check; moved to {dest.name}.corrupt, downloading it again")
        if dest.name not in done:
            size = download(url.format(k=k), dest, progress, retries=retries, backoff=backoff)
            try:
                done[dest.name] = check_cifar5m_part(dest)
            except FetchError as e:
                dest.replace(dest.with_name(dest.name + ".corrupt"))
                bad.append(f"{e} (moved to {dest.name}.corrupt)")
                continue
            say(f"{dest}: {size} bytes, {done[dest.name]} images")
        if npy:
            xp, yp = to_npy(dest)
            say(f"{xp.name}, {yp.name}: written (memory-mapped by the loader)")
    if bad:
        raise FetchError(bad[0] + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))
    return done
