"""People's and tools' side of the control file: append a request (atomically, under a lock) and
wait for the run's answer in its events."""
from __future__ import annotations

import fcntl
import json
import os
import secrets
import time

from engine.control.request import ControlError
from engine.store.rundir import FILE_MODE, RunDir, read_jsonl
from engine.store.state import FINISHED, LIVE

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


def wait_for_ack(rd: RunDir, request_id: str, timeout: float = 60.0, poll: float = 0.1,
                 on_waiting=None) -> dict | None:
    """The control event that settles `request_id` (applied or rejected), or None after `timeout`
    seconds. A conditional request is first answered "waiting": `on_waiting(event)` is called then."""
    offset, deadline = 0, time.monotonic() + timeout

    def settled(events: list[dict]) -> dict | None:
        for ev in events:
            if ev.get("event") == "control" and ev.get("id") == request_id:
                if ev.get("status") != "waiting":
                    return ev
                if on_waiting:
                    on_waiting(ev)
        return None

    while True:
        events, offset = read_jsonl(rd.events_file, offset)
        if (ev := settled(events)) is not None:
            return ev
        if time.monotonic() >= deadline:
            return None
        if rd.status().get("state") not in LIVE:  # nothing will answer until it is resumed
            events, offset = read_jsonl(rd.events_file, offset)
            return settled(events)
        time.sleep(poll)

