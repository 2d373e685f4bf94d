"""The run directory: the one contract between the engine and everything that watches it.

    $GPCTL_HOME/runs/<run_id>/
        config.toml      the resolved config            (written once)
        status.json      state, pid, host, step, ...    (replaced atomically)
        metrics.jsonl    one object per step or eval     (append-only)
        events.jsonl     what happened and when          (append-only)
        control.jsonl    requests to the running job     (appended by people and tools)
        checkpoints/     step_XXXXXXX.safetensors + step_XXXXXXX.state.safetensors
        log.txt          the process's own output
        tv_cache.json    TV results with this run as A (gpctl tv), reused by later calls

This module owns reading and writing all of it; gpctl never parses these files itself.
Directories are created 0700 and files 0600: other users of a shared box cannot read or steer.
"""
from __future__ import annotations

import copy
import errno
import json
import math
import os
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.config import Config, ConfigError, build, dump_toml, load_toml, to_dict
from engine.fs import (DIR_MODE, FILE_MODE, NotRegular, is_name, make_home, open_regular,  # noqa: F401
                          SMALL_FILE, pid_alive, read_small)

_CONFIGS: dict[tuple, Config] = {}   # RunDir.config's cache, keyed by the file's identity and mtime


def home(path: str | os.PathLike | None = None) -> Path:
    return Path(path or os.environ.get("GPCTL_HOME") or "gpctl-runs").resolve()


class UnknownRun(LookupError):
    """No run (or more than one) matches what the user typed; str(e) is the line to print."""


def private_files() -> None:
    """Files and folders gpctl and its jobs create are owner-only (docs/steering.md, "Security")."""
    os.umask(0o077)


def write_atomic(path: Path, text: str, durable: bool = True) -> None:
    """Replace `path` with `text` (temp file + rename), keeping the file's mode; `durable` fsyncs the
    data before the rename (skipped for the trainer's frequent progress updates: a metadata round trip
    on a cluster's shared filesystem, every flush)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        mode = FILE_MODE
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)            # a write that failed (a full disk) leaves no temp file behind
        except OSError:
            pass
        raise


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in DISK_FULL


def free_bytes(path: Path) -> int | None:
    try:
        st = os.statvfs(path)
        return st.f_bavail * st.f_frsize
    except OSError:
        return None


def write_in_place(path: Path, text: str) -> None:
    """Overwrite a small existing file in place (no new file, so usually no new block): the last
    resort for status.json on a full disk, where the atomic temp-and-rename cannot get space."""
    data = text.encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, FILE_MODE)
    try:
        os.write(fd, data)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


def _append_lines(path: Path, lines: list[str]) -> None:
    if not lines:
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE)
    try:
        os.write(fd, "".join(lines).encode())  # one write: lines never interleave with other writers
    finally:
        os.close(fd)


_NUMBERS = ("loss", "eval_loss", "eval_error", "lr", "lr_time", "wall", "samples", "step", "batch_size",
            "unique_samples", "time")
_FINITE = ("lr_time", "wall", "samples", "step", "batch_size", "unique_samples", "time")   # clocks and counts
_INTEGERS = ("step", "samples", "batch_size", "unique_samples")
_NEEDS = {"metrics.jsonl": "step", "events.jsonl": "event"}   # the field every line of that file has
MAX_RECORD = 1 << 20   # bytes: a longer line of a JSONL file is skipped unread (the engine's are < 4 KiB)
_CHUNK = 1 << 24       # bytes read at a time: memory stays under what is kept + _CHUNK + MAX_RECORD


def record_problem(rec: object, file: str = "") -> str | None:
    """Why a metrics record, event or status cannot be used (None: it can): it must be an object whose
    known numeric fields are numbers (clocks and counts finite, steps and samples integers), whose
    `event` is text and whose `changed` maps names to [before, after] numbers (and `skipped` to words). In metrics.jsonl
    (`file`), a known field may not be null and every record has a step; in events.jsonl every line
    has an event. A record that fails is skipped and counted by every reader, never fatal to one."""
    if not isinstance(rec, dict):
        return "not a JSON object"
    if (need := _NEEDS.get(file)) and need not in rec:
        return f"no {need!r}"
    for key in _NUMBERS:
        v = rec.get(key)
        if v is None:
            if key in rec and file == "metrics.jsonl":
                return f"{key!r} is null"
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return f"{key!r} is not a number"
        if key in _FINITE and not math.isfinite(v):
            return f"{key!r} is not finite"
        if key in _INTEGERS and not isinstance(v, int):
            return f"{key!r} is not a whole number"
    if "event" in rec and not isinstance(rec["event"], str):
        return "'event' is not text"
    if (changed := rec.get("changed")) is not None:
        if not isinstance(changed, dict):
            return "'changed' is not an object"
        for k, v in changed.items():
            if k == "skipped" and isinstance(v, str):     # what a manual change left out, in words
                continue
            if not (isinstance(v, list) and len(v) == 2 and all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)):
                return f"'changed' of {k[:40]!r} is not [before, after] numbers"
    return None


def record_ok(rec: object) -> bool:
    return record_problem(rec) is None


def parse_line(line: bytes, file: str = "") -> tuple[dict | None, str | None]:
    """One JSONL line: (record, None) or (None, why it is unreadable)."""
    if len(line) > MAX_RECORD:
        return None, f"{len(line)} bytes, over the {MAX_RECORD}-byte limit"
    try:
        rec = json.loads(line)
    except UnicodeDecodeError:
        return None, "not UTF-8"
    except ValueError:
        return None, "not JSON"
    except RecursionError:
        return None, "nested too deep"
    why = record_problem(rec, file)
    return (None, why) if why else (rec, None)


@dataclass
class Unreadable:
    """Lines a reader skipped in one file: how many, and one's place and reason."""
    file: str
    count: int = 0
    first: str = ""

    def add(self, where: str, why: str) -> None:
        self.count += 1
        self.first = self.first or f"{where}: {why}"

    def whole(self, why: str) -> None:
        """The file itself cannot be read (not a regular file): none of its lines were."""
        self.count, self.first = max(self.count, 1), f"not read: {why}"

    def __str__(self) -> str:
        if self.first.startswith("not read: "):
            return f"{self.file}: {self.first[10:]}, not read"
        lines = "line" if self.count == 1 else "lines"
        return f"{self.file}: {self.count} unreadable {lines} skipped ({self.first})"


def read_jsonl(path: Path, offset: int = 0, skipped: Unreadable | None = None) -> tuple[list[dict], int]:
    """Complete, well-formed records from byte `offset` on, and the offset after the last complete line.

    A trailing line without its newline (a writer mid-append) is left for the next call. A line that is
    not UTF-8, not JSON, over MAX_RECORD bytes or not a record (see record_problem) is skipped, never
    fatal to a reader, and counted in `skipped` when one is given; so is a file that is not a regular
    file (a FIFO, a device, a link), which is never opened for reading. Memory is bounded by what is
    returned plus one read, whatever the file holds (a sparse multi-GiB tail is passed over in chunks).
    """
    try:
        f = open_regular(path)
    except NotRegular as e:
        if skipped is not None:
            skipped.whole(e.strerror)
        return [], offset
    except OSError:
        return [], offset
    out: list[dict] = []
    end = offset           # just past the last whole line handled
    carry = b""            # the start of an unfinished line
    over = 0               # bytes of an over-long line passed over so far (its newline not yet seen)
    with f:
        f.seek(offset)
        while chunk := f.read(_CHUNK):
            data = carry + chunk
            nl = data.rfind(b"\n")
            if nl < 0:
                carry = data
                if len(carry) > MAX_RECORD:
                    over, carry = over + len(carry), b""
                continue
            lines, carry = data[:nl].split(b"\n"), data[nl + 1:]
            for i, line in enumerate(lines):
                if i == 0 and over:
                    size, over = over + len(line), 0
                    if skipped is not None:
                        skipped.add(f"byte {end}", f"{size} bytes, over the {MAX_RECORD}-byte limit")
                    end += size + 1
                    continue
                if line.strip():
                    rec, why = parse_line(line, path.name)
                    if rec is not None:
                        out.append(rec)
                    elif skipped is not None:
                        skipped.add(f"byte {end}", why)
                end += len(line) + 1
            if len(carry) > MAX_RECORD:
                over, carry = len(carry), b""
    if over:                # an over-long line that never ended: passed over, so no reader reads it again
        if skipped is not None:
            skipped.add(f"byte {end}", f"{over}+ bytes with no newline, over the {MAX_RECORD}-byte limit")
        end += over + len(carry)
    return out, end


def new_run_id(preset: str, arm: str) -> str:
    return f"{preset}-{arm}-{secrets.token_hex(3)}"


def latest_runs(home: Path, preset: str) -> dict[str, "RunDir"]:
    """The newest run of each arm of `preset` in `home` (forks aside)."""
    found: dict[str, RunDir] = {}
    for rd in list_runs(home):  # sorted by creation: later ones win
        try:
            cfg = rd.config()
        except ConfigError:
            continue
        if cfg.preset == preset and not cfg.parent:
            found[cfg.name] = rd
    return found


def is_train(rec: dict) -> bool:
    """A training step's record in metrics.jsonl (the other kind is an eval's)."""
    return "loss" in rec


def is_eval(rec: dict) -> bool:
    """An eval's record in metrics.jsonl: held-out loss (and error) at a step."""
    return "eval_loss" in rec


@dataclass
class RunDir:
    path: Path

    @property
    def id(self) -> str:
        return self.path.name

    @property
    def home(self) -> Path:
        """The home this run belongs to (a run directory is HOME/runs/ID)."""
        return self.path.parent.parent

    config_file = property(lambda self: self.path / "config.toml")
    status_file = property(lambda self: self.path / "status.json")
    metrics_file = property(lambda self: self.path / "metrics.jsonl")
    events_file = property(lambda self: self.path / "events.jsonl")
    control_file = property(lambda self: self.path / "control.jsonl")
    checkpoints = property(lambda self: self.path / "checkpoints")
    log_file = property(lambda self: self.path / "log.txt")

    # ------------------------------------------------------------ creation
    @classmethod
    def create(cls, root: Path, cfg: Config, run_id: str | None = None) -> "RunDir":
        make_home(root)
        runs = root / "runs"
        runs.mkdir(exist_ok=True, mode=DIR_MODE)
        run_id = run_id or new_run_id(cfg.preset or "run", cfg.name or "main")
        rd = cls(runs / run_id)
        if not is_name(run_id) or rd.path.resolve().parent != runs.resolve():
            raise ConfigError(f"run id {run_id!r} is not a plain name (letters, digits, _ . -; no '..')")
        text = dump_toml(to_dict(cfg))
        rd.path.mkdir(mode=DIR_MODE)
        try:
            rd.checkpoints.mkdir(mode=DIR_MODE)
            write_atomic(rd.config_file, text)
            for f in (rd.metrics_file, rd.events_file, rd.control_file, rd.log_file):
                os.close(os.open(f, os.O_WRONLY | os.O_CREAT, FILE_MODE))
            rd.write_status(state="created", created=time.time())
            from engine.store import provenance
            provenance.write(rd.path)  # the code it will run (engine/store/provenance.py)
        except BaseException as e:     # all or nothing: no half-made run folder is left (a full disk)
            import shutil
            shutil.rmtree(rd.path, ignore_errors=True)
            if isinstance(e, OSError) and not e.filename:
                raise OSError(e.errno, e.strerror, str(rd.path)) from None
            raise
        if cfg.control.share_with_group:  # the group may read (and watch), never write or steer
            rd.path.chmod(0o750)
            for f in rd.path.iterdir():
                f.chmod(0o750 if f.is_dir() else 0o640)
        return rd

    # ------------------------------------------------------------ config and status
    def config(self) -> Config:
        """The run's config (config.toml is written once: parsed once per process while unchanged)."""
        try:
            st = self.config_file.stat()
            key = (str(self.config_file), st.st_mtime_ns, st.st_size, st.st_ino)
            if key not in _CONFIGS:
                if len(_CONFIGS) > 4096:
                    _CONFIGS.clear()
                _CONFIGS[key] = build(load_toml(self.config_file), str(self.config_file))
            return copy.deepcopy(_CONFIGS[key])      # callers may change their copy (fork, repro)
        except ConfigError:
            raise
        except OSError as e:
            raise ConfigError(f"{self.config_file}: {e.strerror}") from None

    def status(self) -> dict:
        return self._read_status()[0]

    def status_problem(self) -> str | None:
        """Why status.json cannot be read (None: it can)."""
        return self._read_status()[1]

    def _read_status(self) -> tuple[dict, str | None]:
        """status.json, read once: its contents ({"state": "unknown"} when unusable) and the problem."""
        try:
            raw = read_small(self.status_file)
        except FileNotFoundError:
            return {"state": "unknown"}, "status.json is missing"
        except OSError as e:
            return {"state": "unknown"}, f"status.json: {e.strerror}"
        rec, why = parse_line(raw, "status.json")
        if rec is not None and not isinstance(rec.get("state"), str):
            why = "no 'state'"
        try:
            st = json.loads(raw)
        except (ValueError, RecursionError):
            st = None
        ok = isinstance(st, dict) and isinstance(st.get("state", ""), str)
        return (st if ok else {"state": "unknown"}), (f"status.json: {why}" if why else None)

    def problems(self, full: bool = True) -> list[str]:
        """Everything about this run a reader could not read, one line each (empty: healthy).
        `full` reads the whole of metrics.jsonl; otherwise its last 128 KiB, as `ls` does."""
        found = []
        try:
            self.config()
        except ConfigError as e:
            found.append(str(e).splitlines()[0])
        if why := self.status_problem():
            found.append(why)
        for path, limit in ((self.metrics_file, None if full else _TAIL_LIMIT), (self.events_file, None)):
            skipped = Unreadable(path.name)
            if limit is None:
                read_jsonl(path, 0, skipped)
            else:
                _tail_records(path, limit, skipped=skipped)
            if skipped.count:
                found.append(str(skipped))
        return found

    def write_status(self, durable: bool = True, **fields: Any) -> dict:
        st = self.status() if self.status_file.exists() else {}
        st.update(fields, updated=time.time())
        text = json.dumps(st, sort_keys=True) + "\n"
        try:
            write_atomic(self.status_file, text, durable)
        except OSError as e:
            if not disk_full(e):
                raise
            write_in_place(self.status_file, text)      # a full disk: the old file's block takes it
        return st

    def mark_running(self, device: str) -> dict:
        slurm = {"slurm_job": os.environ["SLURM_JOB_ID"], "slurm_restarts": int(os.environ.get("SLURM_RESTART_COUNT") or 0)} \
            if os.environ.get("SLURM_JOB_ID") else {}
        before = self.status() if self.status_file.exists() else {}
        first = before.get("step") if isinstance(before.get("step"), int) else 0   # a resume starts from here
        return self.write_status(state="running", pid=os.getpid(), host=socket.gethostname(),
                                 device=device, started=time.time(), start_step=first, error=None, **slurm)

    # ------------------------------------------------------------ records
    def append_metrics(self, records: list[dict]) -> None:
        _append_lines(self.metrics_file, [json.dumps(r) + "\n" for r in records])

    def append_event(self, kind: str, **fields: Any) -> dict:
        ev = {"event": kind, "time": time.time(), **fields}
        _append_lines(self.events_file, [json.dumps(ev) + "\n"])
        return ev

    def metrics(self, offset: int = 0) -> tuple[list[dict], int]:
        return read_jsonl(self.metrics_file, offset)

    # metrics.jsonl holds two kinds of record: a training step's (it has `loss`) and an eval's (it
    # has `eval_loss`); these tell them apart in one place
    def train_records(self) -> list[dict]:
        return [r for r in self.metrics()[0] if is_train(r)]

    def eval_records(self) -> list[dict]:
        return [r for r in self.metrics()[0] if is_eval(r)]

    def events(self, offset: int = 0) -> tuple[list[dict], int]:
        return read_jsonl(self.events_file, offset)

    def change_key(self) -> tuple:
        """Changes whenever the run's state or events change (what a watcher polls; never raises)."""
        try:
            status = self.status_file.stat().st_mtime_ns
        except OSError:
            status = 0
        return self.id, status, _size(self.events_file)

    def metrics_size(self) -> int:
        try:
            return self.metrics_file.stat().st_size
        except FileNotFoundError:
            return 0

    def sweep_temp_files(self, older_than: float = 60.0) -> list[str]:
        """Remove the temp files of writes that never finished (`.status.json.PID.tmp`,
        `.step_N.safetensors.PID.tmp`: a process killed between write and rename) in the run and
        checkpoint folders, when their process is gone and they are older than `older_than` seconds
        (a writer on another host of a shared filesystem is never that slow). Returns their names."""
        import re
        gone, now = [], time.time()
        for folder in (self.path, self.checkpoints):
            try:
                entries = list(os.scandir(folder))
            except OSError:
                continue
            for e in entries:
                m = re.fullmatch(r"\..+\.(\d+)\.tmp", e.name)
                if not m or int(m.group(1)) == os.getpid() or pid_alive(int(m.group(1))):
                    continue
                try:
                    if now - e.stat(follow_symlinks=False).st_mtime > older_than and e.is_file(follow_symlinks=False):
                        os.unlink(e.path)
                        gone.append(e.name)
                except OSError:
                    continue
        return gone

    def truncate_metrics(self, size: int) -> int:
        """Drop records written after a checkpoint (on resume); returns bytes dropped."""
        cur = self.metrics_size()
        if cur > size:
            os.truncate(self.metrics_file, size)
        return max(0, cur - size)

    def read_log(self, offset: int = 0, limit: int = 1 << 26) -> tuple[bytes, int]:
        """log.txt from byte `offset` on (at most `limit` bytes: the rest comes with the next call), and
        the offset after it (nothing if it is missing, unreadable or not a regular file)."""
        try:
            with open_regular(self.log_file) as f:
                f.seek(offset)
                chunk = f.read(limit)
        except OSError:
            return b"", offset
        return chunk, offset + len(chunk)

    def log(self, line: str) -> None:
        _append_lines(self.log_file, [line.rstrip("\n") + "\n"])

    # ------------------------------------------------------------ TV cache
    def imported(self) -> dict | None:
        """Where this run was imported from (engine/store/bundle.py; None: it ran in this home). An
        imported run is read-only here: it takes no request and never resumes."""
        p = self.path / "imported.json"              # written by engine/store/bundle.py import_runs
        if not p.exists():
            return None
        try:
            rec = json.loads(read_small(p))
        except (OSError, ValueError):
            rec = {}                                 # unreadable: still imported (read-only), from somewhere
        return rec if isinstance(rec, dict) else {}

    tv_cache_file = property(lambda self: self.path / "tv_cache.json")

    def read_tv_cache(self) -> dict:
        """TV results computed with this run as A, keyed by checkpoints and eval size."""
        try:
            cache = json.loads(read_small(self.tv_cache_file, 64 * SMALL_FILE))
        except (OSError, ValueError, RecursionError):
            return {}
        return cache if isinstance(cache, dict) else {}

    def write_tv_cache(self, cache: dict) -> None:
        """Keep TV results for later calls; a home we cannot write (read-only) just keeps none."""
        try:
            write_atomic(self.tv_cache_file, json.dumps(cache, sort_keys=True))
        except OSError:
            pass

    # ------------------------------------------------------------ checkpoints
    def checkpoint_path(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:07d}.safetensors"

    def list_checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints (weights and resume state both present), by step."""
        out = []
        for p in self.checkpoints.glob("step_*.safetensors"):
            if p.name.endswith(".state.safetensors") or not p.name[5:12].isdigit():
                continue
            step = int(p.name[5:12])
            if p.with_name(p.name.replace(".safetensors", ".state.safetensors")).exists():
                out.append((step, p))
        return sorted(out)

    def summary(self) -> dict:
        """What `gpctl ls` shows: status plus the last train and eval records.

        `state` is `unreadable` when a file of the run could not be read (`problem` says which and
        why, from what `ls` reads: config, status, events and the end of metrics.jsonl); `run_state`
        is the state the run itself recorded (what steering goes by)."""
        st, status_problem = self._read_status()
        problems = [status_problem] if status_problem else []
        skipped = Unreadable(self.metrics_file.name)
        last, last_eval, losses = _tail_records(self.metrics_file, skipped=skipped)
        if skipped.count:
            problems.append(str(skipped))
        events_skipped = Unreadable(self.events_file.name)
        snap = "?"                                           # a long events file: not read here
        if _size(self.events_file) <= _TAIL_LIMIT:           # a long events file is checked by `show`
            snap = snap_cell(read_jsonl(self.events_file, 0, events_skipped)[0])
        if events_skipped.count:
            problems.append(str(events_skipped))
        smoothed = None
        for v in losses:
            smoothed = v if smoothed is None else EMA_COEF * smoothed + (1 - EMA_COEF) * v
        if not last_eval and st.get("eval_loss") is not None:  # far back in a long file: status has it
            last_eval = {"eval_loss": st["eval_loss"], "eval_error": st.get("eval_error")}
        try:
            cfg = self.config()
            preset, arm, steps, group = cfg.preset, cfg.name, cfg.steps, cfg.group or None
        except ConfigError as e:
            preset = arm = "?"
            steps, group = 0, None
            problems.insert(0, str(e).splitlines()[0])
        state = st.get("state", "unknown")
        if state == "running" and st.get("host") == socket.gethostname():
            if not pid_alive(st.get("pid") if isinstance(st.get("pid"), int) else None):
                state = "lost"   # its process is gone from this host: say so before a worker reconciles
        return {"id": self.id, "preset": preset, "arm": arm, "group": group,
                "state": "unreadable" if problems else state,
                "run_state": state, "problem": "; ".join(problems) or None,
                "device": st.get("device"), "step": last.get("step", 0), "samples": last.get("samples", 0),
                "lr_time": last.get("lr_time", 0.0), "lr": last.get("lr"), "batch_size": last.get("batch_size"),
                "loss": last.get("loss"), "loss_ema": smoothed, "eval_loss": last_eval.get("eval_loss"),
                "eval_error": last_eval.get("eval_error"), "error": st.get("error"),
                "created": st.get("created", 0.0), "steps": steps, "snap": snap}


def snap_cell(events: list[dict]) -> str:
    """The snap in one word, from the run's events: "-" no noise change took effect; "✓+150"
    snapped (the worker's `snap` event: its first held-out point on the reference, 150 steps after T0,
    on the snap's axis; "✓+150(4.0x-seed)" when the fit's residual is 4 times the seed spread);
    "changed" otherwise (not snapped when last fitted, or not fitted yet:
    `gpctl snap` / the TUI's S fit it now)."""
    t0 = None
    for e in events:
        kind = e.get("event")
        if kind == "snap":
            at, x = e.get("at"), e.get("x") if isinstance(e.get("x"), str) and e.get("x") else "step"
            change = next((c for c in events if is_change(c)), {})
            start = change.get(x, change.get("step"))
            seed = e.get("seed_ratio")        # the fit's residual over the seed spread: a poor match is said
            poor = f"({seed:.1f}x-seed)" if isinstance(seed, (int, float)) and seed > 1 else ""
            if isinstance(at, (int, float)) and isinstance(start, (int, float)):
                unit = "" if x == "step" else f"({x})"     # one word: `ls` is read by awk too
                return f"✓+{at - start:.0f}{unit}{poor}"
            return f"✓{poor}"
        if t0 is None and is_change(e):
            t0 = e
    return "-" if t0 is None else "changed"


def is_change(e: dict) -> bool:
    """A noise change that took effect: a planned change, an applied request or a fork that changed it."""
    kind = e.get("event")
    return kind == "schedule" or (kind == "fork" and bool(e.get("changed"))) or (
        kind == "control" and e.get("status") == "applied" and bool(e.get("changed")))


EMA_COEF, EMA_TAIL = 0.8, 64   # the summary's smoothed loss: EMA 0.8 over the last 64 step records
_TAIL_LIMIT = 1 << 17          # bytes of a file's end that `ls` reads


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _tail_records(path: Path, limit: int = _TAIL_LIMIT, chunk: int = 1 << 15,
                  skipped: Unreadable | None = None) -> tuple[dict, dict, list[float]]:
    """The last train record, the last eval record and up to EMA_TAIL last train losses (oldest
    first), reading backwards at most `limit` bytes (the trainer also keeps the last eval in
    status.json, for evals further back). Unreadable lines in what was read are counted in `skipped`."""
    last: dict | None = None
    last_eval: dict | None = None
    losses: list[float] = []
    try:
        with open_regular(path) as f:
            pos = size = f.seek(0, 2)
            carry = b""
            while pos > 0 and (len(losses) < EMA_TAIL or last_eval is None) and size - pos < limit:
                step = min(chunk, pos)
                pos -= step
                f.seek(pos)
                lines = (f.read(step) + carry).split(b"\n")
                carry = lines.pop(0) if pos > 0 else b""   # maybe a partial line: finish it next round
                at = pos + len(carry) + 1 if pos > 0 else 0  # the byte offset of lines[0]
                starts = []
                for line in lines:
                    starts.append(at)
                    at += len(line) + 1
                for line, where in zip(reversed(lines), reversed(starts)):
                    is_eval = b'"eval_loss"' in line
                    if not line.strip() or (len(losses) >= EMA_TAIL and not is_eval) or (last_eval is not None and is_eval):
                        continue
                    rec, why = parse_line(line, path.name)
                    if rec is None:
                        if skipped is not None:   # reading backwards: the earliest one found is named
                            skipped.first = ""
                            skipped.add(f"byte {where}", why)
                        continue
                    if "eval_loss" in rec:
                        last_eval = last_eval or rec
                    elif "loss" in rec:
                        last = last or rec
                        losses.append(rec["loss"])
    except NotRegular as e:
        if skipped is not None:
            skipped.whole(e.strerror)
    except OSError:
        pass
    return last or {}, last_eval or {}, losses[::-1]


def restart_blocker(rd: "RunDir") -> str | None:
    """Why a run with records but no checkpoint cannot start again from its beginning (None: it can,
    exactly as a fresh start: it was lost before its first checkpoint). It cannot when it did take
    checkpoints (they are gone: its records are the only trace of that work), or when the lost attempt
    took control requests (a restart would apply them at other steps)."""
    events = rd.events()[0]
    taken = sum(e.get("event") == "checkpoint" for e in events)
    if taken:
        return f"it took {taken} checkpoint(s) that are gone from {rd.checkpoints}"
    steered = sum(e.get("event") == "control" for e in events)
    if steered:
        return (f"the lost attempt took {steered} control request(s) that a restart from its beginning "
                f"would apply at other steps")
    return None


def list_runs(root: Path) -> list[RunDir]:
    runs = root / "runs"
    if not runs.is_dir():
        return []
    found = [RunDir(p) for p in runs.iterdir() if p.is_dir() and (p / "config.toml").exists()]
    return sorted(found, key=lambda r: (r.status().get("created", 0.0), r.id))


def run_dir(root: Path, run_id: str) -> RunDir:
    """The run `run_id` of the home `root` (an exact id, as the TUI and the job store hold them)."""
    if not is_name(run_id):
        raise UnknownRun(f"run id {run_id!r} is not a plain name")
    return RunDir(root / "runs" / run_id)


def resolve(root: Path, text: str) -> RunDir:
    """A run by its id, by its preset-arm name (`demo-bs512` where one run of that arm exists, though
    `demo-bs512_seed2-...` starts the same way), or by a unique prefix of its id."""
    if not text.strip():
        raise UnknownRun("a run id cannot be empty")
    runs = list_runs(root)
    exact = [r for r in runs if r.id == text]
    if exact:
        return exact[0]
    named = [r for r in runs if _without_suffix(r.id) == text]    # a whole preset-arm name: that arm's run
    if len(named) == 1:
        return named[0]
    if named:
        raise UnknownRun(f"run '{text}' is ambiguous: {len(named)} runs of that arm ("
                         f"{', '.join(r.id for r in named[:5])}{', ...' if len(named) > 5 else ''}); name one by its id")
    hits = [r for r in runs if r.id.startswith(text)]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise UnknownRun(f"unknown run '{text}' in {root / 'runs'}")
    raise UnknownRun(f"run '{text}' is ambiguous: {', '.join(r.id for r in hits[:5])}"
                     f"{f' and {len(hits) - 5} more' if len(hits) > 5 else ''}")


def _without_suffix(run_id: str) -> str:
    """`demo-bs512-44e6d9` -> `demo-bs512`: the id less the six hex digits new_run_id adds."""
    import re
    m = re.fullmatch(r"(.+)-[0-9a-f]{6}", run_id)
    return m.group(1) if m else run_id

