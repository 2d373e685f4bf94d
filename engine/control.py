"""The control file: requests to a running job, applied at step boundaries and answered in events.

    control.jsonl, one JSON object per line, appended by people and tools:
        {"id": "a1b2", "set": {"lr": 0.005}}
        {"set": {"batch_size": 512}}
        {"set": {"lr": 6e-4}, "ramp": 100}          reach it linearly over 100 LR-normalized steps
        {"action": "checkpoint"}                     checkpoint at the next boundary
        {"action": "stop"}                           checkpoint, then end cleanly (state "stopped")

The loop polls before every step. A poll is one stat(); the file is read only when its size, mtime
or inode changed, and only from the byte offset already consumed. Each complete line is applied
once, in order; a line without its newline yet is left for the next poll. Every line is answered
in events.jsonl with {"event": "control", "id", "line", "status": "applied" | "rejected", ...} and
the step, samples and lr_time where it took effect, or the reason it was rejected.

Combination with the preset's schedule: a manual lr replaces the scheduled lr from then on (the
schedule's shape and its planned lr changes no longer apply; the event says so). Manual and
planned batch-size changes both apply, in the order they come.

Trust: the file must be owned by the run's user and writable by nobody else. If its owner or mode
changes, the lines that arrive are rejected ("untrusted") and the run goes on.
Rewrites: if the file shrinks, gets a new inode, or the bytes already consumed change (an editor
saved over it), the event "control_rewritten" reports it and the lines then present are skipped —
never re-applied; new lines appended after that are read as usual.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import secrets
import time
from dataclasses import dataclass, field

from engine.rundir import FILE_MODE, RunDir, read_jsonl

SET_KEYS = ("lr", "batch_size")
ACTIONS = ("checkpoint", "stop")
REQUEST_KEYS = ("id", "set", "ramp", "action", "time", "by")
FINISHED = ("done", "diverged", "cancelled")   # take no more requests (stopped/failed runs resume)
LIVE = ("created", "running")


class ControlError(ValueError):
    """A request that cannot be sent (finished run, bad value); str(e) is the line to print."""


# ------------------------------------------------------------------ validation

def validate(req: object, *, base_lr: float, micro_batch: int, max_lr_factor: float,
             max_batch: int) -> str | None:
    """None if `req` is a valid request, else the reason it is not (one line)."""
    if not isinstance(req, dict):
        return f"a request must be a JSON object, got {type(req).__name__}"
    unknown = [k for k in req if k not in REQUEST_KEYS]
    if unknown:
        return f"unknown key '{unknown[0]}' (known: {', '.join(REQUEST_KEYS)})"
    if ("set" in req) == ("action" in req):
        return "a request needs exactly one of 'set' or 'action'"
    if "action" in req:
        if req["action"] not in ACTIONS:
            return f"unknown action {json.dumps(req['action'])} (known: {', '.join(ACTIONS)})"
        if "ramp" in req:
            return "'ramp' goes with 'set'"
        return None
    changes = req["set"]
    if not isinstance(changes, dict) or not changes:
        return "'set' must be a non-empty object, e.g. {\"lr\": 0.005}"
    bad = [k for k in changes if k not in SET_KEYS]
    if bad:
        return f"unknown key 'set.{bad[0]}' (known: {', '.join(SET_KEYS)})"
    if "lr" in changes:
        lr = changes["lr"]
        if isinstance(lr, bool) or not isinstance(lr, (int, float)):
            return f"'lr' must be a number, got {json.dumps(lr)}"
        if not math.isfinite(lr) or lr <= 0:
            return f"'lr' must be finite and > 0, got {lr}"
        if lr > max_lr_factor * base_lr:
            return f"'lr' = {lr} exceeds the sanity bound {max_lr_factor * base_lr:g} (control.max_lr_factor × lr)"
    if "batch_size" in changes:
        b = changes["batch_size"]
        if isinstance(b, bool) or not isinstance(b, int):
            return f"'batch_size' must be an integer, got {json.dumps(b)}"
        if b <= 0:
            return f"'batch_size' must be > 0, got {b}"
        if b > max_batch:
            return f"'batch_size' = {b} exceeds the sanity bound {max_batch} (control.max_batch_size)"
        if micro_batch and b > micro_batch and b % micro_batch:
            return f"'batch_size' = {b} is not a multiple of micro_batch_size = {micro_batch}"
    if "ramp" in req:
        r = req["ramp"]
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or r < 0:
            return f"'ramp' must be a number >= 0, got {json.dumps(r)}"
        if "lr" not in changes:
            return "'ramp' needs 'set.lr'"
    return None


def untrusted_reason(st: os.stat_result) -> str | None:
    if st.st_uid != os.getuid():
        return f"control file is owned by uid {st.st_uid}, not this run's user ({os.getuid()})"
    if st.st_mode & 0o022:
        return f"control file is writable by others (mode {oct(st.st_mode & 0o777)})"
    return None


# ------------------------------------------------------------------ the reader (engine side)

@dataclass
class ControlState:
    offset: int = 0          # bytes consumed
    lines: int = 0           # complete lines consumed
    tail: str = ""           # the last consumed line, to notice a rewrite of what was consumed
    inode: int = 0
    stat_key: list = field(default_factory=list)


@dataclass
class Line:
    number: int              # 1-based line number in control.jsonl
    end: int                 # byte offset just past its newline
    text: str
    request: dict | None     # parsed JSON (not yet validated), or None
    problem: str | None      # why it cannot be a request (invalid JSON, untrusted, blank)


class ControlReader:
    def __init__(self, rd: RunDir):
        self.rd, self.path = rd, rd.control_file
        self.state = ControlState()
        self._untrusted_reported = False

    def poll(self) -> list["Line"]:
        """New complete lines, in order. Call `consume(line)` as each is applied, so that a
        checkpoint taken in between records exactly the lines already applied."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return []
        key = [st.st_size, st.st_mtime_ns, st.st_ino]
        if key == self.state.stat_key:
            return []  # the cheap path: nothing changed
        self.state.stat_key = key
        s = self.state
        if s.inode and st.st_ino != s.inode or st.st_size < s.offset or not self._tail_intact():
            self._rewritten(st)
            return []
        s.inode = st.st_ino
        with open(self.path, "rb") as f:
            f.seek(s.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        if not end:
            return []  # a line without its newline yet: wait for it
        trust = untrusted_reason(st)
        out, pos, number = [], s.offset, s.lines
        for raw in data[:end].split(b"\n")[:-1]:
            pos += len(raw) + 1
            number += 1
            tail = raw.decode(errors="replace")
            if not raw.strip():
                out.append(Line(number, pos, tail, None, "blank"))
                continue
            if trust:
                out.append(Line(number, pos, tail, None, f"untrusted: {trust}"))
                continue
            try:
                req = json.loads(raw)
            except json.JSONDecodeError as e:
                out.append(Line(number, pos, tail, None, f"invalid JSON: {e.msg} at column {e.colno}"))
                continue
            out.append(Line(number, pos, tail, req, None))
        return out

    def consume(self, line: "Line") -> None:
        self.state.offset, self.state.lines, self.state.tail = line.end, line.number, line.text

    def _tail_intact(self) -> bool:
        s = self.state
        if not s.tail:
            return True
        n = len(s.tail.encode()) + 1
        with open(self.path, "rb") as f:
            f.seek(max(0, s.offset - n))
            return f.read(n) == s.tail.encode() + b"\n"

    def _rewritten(self, st: os.stat_result) -> None:
        with open(self.path, "rb") as f:
            data = f.read()
        end = data.rfind(b"\n") + 1
        skipped = data[:end].count(b"\n")
        s = self.state
        self.rd.append_event("control_rewritten", old_offset=s.offset, new_size=st.st_size,
                             skipped_lines=skipped,
                             detail="control.jsonl was truncated or rewritten; its present lines are "
                                    "not applied (append new requests instead)")
        tail = data[:end].splitlines()[-1].decode(errors="replace") if skipped else ""
        self.state = ControlState(offset=end, lines=s.lines + skipped, tail=tail, inode=st.st_ino,
                                  stat_key=[st.st_size, st.st_mtime_ns, st.st_ino])

    def state_dict(self) -> dict:
        d = dict(vars(self.state))
        d.pop("stat_key")
        return d

    def load_state_dict(self, d: dict) -> None:
        self.state = ControlState(**d)


# ------------------------------------------------------------------ the writer (people and tools)

def append_request(rd: RunDir, request: dict) -> str:
    """Append one request atomically, under a lock; returns its id."""
    state = rd.status().get("state", "unknown")
    if state in FINISHED:
        raise ControlError(f"run {rd.id} is {state}: it takes no more requests")
    if not rd.control_file.exists():
        raise ControlError(f"{rd.control_file}: no control file (is {rd.path} a run directory?)")
    req = {"id": request.get("id") or secrets.token_hex(4), **{k: v for k, v in request.items() if k != "id"},
           "time": time.time(), "by": os.environ.get("USER", str(os.getuid()))}
    line = (json.dumps(req) + "\n").encode()
    fd = os.open(rd.control_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # writers never interleave, whatever the line length
        os.write(fd, line)
    finally:
        os.close(fd)  # closing releases the lock
    return req["id"]


def wait_for_ack(rd: RunDir, request_id: str, timeout: float = 60.0, poll: float = 0.1) -> dict | None:
    """The control event answering `request_id`, or None after `timeout` seconds."""
    offset, deadline = 0, time.monotonic() + timeout
    while True:
        events, offset = read_jsonl(rd.events_file, offset)
        for ev in events:
            if ev.get("event") == "control" and ev.get("id") == request_id:
                return ev
        if time.monotonic() >= deadline:
            return None
        if rd.status().get("state") not in LIVE:  # nothing will answer until it is resumed
            events, offset = read_jsonl(rd.events_file, offset)
            return next((e for e in events if e.get("event") == "control" and e.get("id") == request_id), None)
        time.sleep(poll)

