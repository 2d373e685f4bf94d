"""The run's side of the control file: a bounded, guarded reader (regular files only, at most
MAX_READ bytes a poll, decided on the open descriptor's fstat) and the trust rule."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

from engine.control.request import MAX_LINE, QUOTE
from engine.store.rundir import RunDir, open_regular

MAX_READ = 64 * 1024 * 1024  # bytes scanned per poll (in 1 MiB reads: memory stays under MAX_LINE + 1 MiB);
                              # the rest waits for the next poll: a multi-GiB tail costs ~30 ms a poll
REWRITE_SCAN = 64 * 1024 * 1024  # bytes of a rewritten control file whose lines are counted


def untrusted_reason(st: os.stat_result, dir_st: os.stat_result | None = None) -> str | None:
    """Why the control file's lines cannot be trusted to come from the run's user, or None.

    The boundary (docs/steering.md, "Security"): only the run's user may steer it. Lines are refused while the
    file or its run directory is writable by anyone else, and also when the file's mode or owner changed
    after its last write (ctime > mtime): a line may have been written while others could, and gpctl
    cannot tell when, so it refuses rather than guesses."""
    if st.st_uid != os.getuid():
        return f"control file is owned by uid {st.st_uid}, not this run's user ({os.getuid()})"
    if st.st_mode & 0o022:
        return f"control file is writable by others (mode {oct(st.st_mode & 0o777)})"
    if dir_st is not None:
        if dir_st.st_uid != os.getuid():
            return f"run directory is owned by uid {dir_st.st_uid}, not this run's user ({os.getuid()})"
        if dir_st.st_mode & 0o022:
            return f"run directory is writable by others (mode {oct(dir_st.st_mode & 0o777)})"
    if st.st_ctime_ns > st.st_mtime_ns:
        return ("control file's mode or owner changed after its last write: its lines may have been written "
                "while others could; send them again")
    return None


def run_dir_untrusted(path) -> str | None:
    """Why a run directory may not start, resume or take requests, or None: it (or its control file's
    folder) is writable by others, or a folder above it in the home (runs/, the home itself) is, so
    that another user could swap the run's folder for theirs in one rename (a sticky folder, where
    only a file's owner may rename it, is safe)."""
    try:
        st = os.stat(path)
    except OSError as e:
        return f"{path}: {e.strerror}"
    if st.st_uid != os.getuid():
        return f"{path} is owned by uid {st.st_uid}, not this user ({os.getuid()})"
    if st.st_mode & 0o022:
        return f"{path} is writable by others (mode {oct(st.st_mode & 0o777)}); chmod go-w it to run it"
    return parents_untrusted(path)


def parents_untrusted(path) -> str | None:
    """runs/ and the home above a run directory: writable by others (not sticky) is refused."""
    from pathlib import Path
    for above in (Path(path).parent, Path(path).parent.parent):
        try:
            st = os.stat(above)
        except OSError as e:
            return f"{above}: {e.strerror}"
        if st.st_mode & 0o022 and not st.st_mode & 0o1000:
            return (f"{above} is writable by others (mode {oct(st.st_mode & 0o777)}): another user could replace "
                    f"the run's folder; chmod go-w {above}")
    return None


# ------------------------------------------------------------------ the reader (engine side)

TAIL = 256                 # bytes before the offset whose digest notices a rewrite of what was consumed


@dataclass
class ControlState:
    offset: int = 0          # bytes consumed
    lines: int = 0           # complete lines consumed
    tail_len: int = 0        # the last min(TAIL, offset) consumed bytes ...
    tail_sha: str = ""       # ... and their sha256: bounded, whatever a line's length (checkpoint metadata)
    inode: int = 0
    skipping: int = 0        # bytes of an over-long line seen so far whose newline has not come yet
    waiting: list = field(default_factory=list)   # conditional requests read but not yet applied:
                                                   # [line number, request id, request], in order
    stat_key: list = field(default_factory=list)
    tainted: list = field(default_factory=list)   # [inode, reason]: a file once seen untrusted stays so


@dataclass
class Line:
    number: int              # 1-based line number in control.jsonl
    end: int                 # byte offset just past its newline
    text: str
    request: dict | None     # parsed JSON (not yet validated), or None
    problem: str | None      # why it cannot be a request (invalid JSON, untrusted, blank, too long)
    then_skip: int = 0       # bytes of an unfinished over-long line after this one, passed over with it


class ControlReader:
    def __init__(self, rd: RunDir):
        self.rd, self.path = rd, rd.control_file
        self.state = ControlState()
        self._untrusted_reported = False
        self._unusable_reported: str | None = None

    def poll(self) -> list["Line"]:
        """New complete lines, in order. Call `consume(line)` as each is applied, so that a
        checkpoint taken in between records exactly the lines already applied.

        Never raises and never blocks for what the path holds: it is opened without following a link
        and without waiting (O_NOFOLLOW | O_NONBLOCK), and only a regular file is read, at most
        MAX_READ bytes a poll (the rest with the next ones); trust is decided on the open descriptor's
        fstat, so the file judged is the file read. A control file that is a folder, a FIFO, a device
        or a link is one `control_unreadable` event (once per reason) and the run goes on."""
        try:
            f = open_regular(self.path)
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as e:
            self._unusable(e.strerror or str(e))
            return []
        with f:
            try:
                return self._poll(f)
            except OSError as e:          # an I/O error mid-read: nothing consumed, try at the next poll
                self.state.stat_key = []
                self._unusable(e.strerror or str(e))
                return []

    def _unusable(self, why: str) -> None:
        if why != self._unusable_reported:
            self._unusable_reported = why
            self.rd.append_event("control_unreadable", detail=f"control.jsonl: {why}; no request is read "
                                 "from it until it is a regular file again (the run goes on)")

    def _poll(self, f) -> list["Line"]:
        st = os.fstat(f.fileno())
        self._unusable_reported = None
        key = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns, st.st_mode]   # a chmod is news too
        if key == self.state.stat_key:
            return []  # the cheap path: nothing changed
        self.state.stat_key = key
        s = self.state
        if s.inode and st.st_ino != s.inode or st.st_size < s.offset or not self._tail_intact(f):
            self._rewritten(f, st)
            return []
        s.inode = st.st_ino
        try:
            trust = untrusted_reason(st, os.stat(self.path.parent)) or parents_untrusted(self.path.parent)
        except OSError:
            trust = "run directory cannot be read"
        if trust and not (s.tainted and s.tainted[0] == st.st_ino):
            s.tainted = [st.st_ino, trust]        # this file stays untrusted, whatever its mode later
        elif not trust and s.tainted and s.tainted[0] == st.st_ino:
            trust = (f"this control file was untrusted earlier ({s.tainted[1][:120]}): a descriptor opened "
                     "then may still write to it; move it away and make a new one (mv control.jsonl control.old; "
                     "install -m 600 /dev/null control.jsonl)")
        out: list[Line] = []
        pos, number, skipping = s.offset - s.skipping, s.lines, s.skipping   # pos: where the unfinished line starts
        f.seek(s.offset)
        buf, budget = b"", MAX_READ
        while budget > 0 and (chunk := f.read(min(budget, 1 << 20))):   # memory under MAX_LINE + 1 MiB
            budget -= len(chunk)
            buf += chunk
            start = 0
            while (nl := buf.find(b"\n", start)) >= 0:
                raw, start = buf[start:nl], nl + 1
                size = skipping + len(raw)
                pos, number = pos + skipping + len(raw) + 1, number + 1
                if size > MAX_LINE:
                    out.append(Line(number, pos, "", None,
                                    f"line is {size} bytes, over the {MAX_LINE}-byte limit"))
                else:
                    out.append(self._parse(number, pos, raw, trust))
                skipping = 0
            buf = buf[start:]
            if skipping or len(buf) > MAX_LINE:   # an over-long line without its newline yet
                skipping += len(buf)
                buf = b""
        if budget <= 0:
            s.stat_key = []      # more is there: the next poll goes on from what this one consumed
        if skipping != s.skipping or (skipping and not out):
            # pass over the over-long line's bytes: with the last line returned, or now if there is none
            if out:
                out[-1].then_skip = skipping
            else:
                s.offset, s.skipping, s.tail_len, s.tail_sha = pos + skipping, skipping, 0, ""
        return out

    @staticmethod
    def _parse(number: int, pos: int, raw: bytes, trust: str | None) -> "Line":
        if not raw.strip():
            return Line(number, pos, "", None, "blank")
        if trust:
            return Line(number, pos, "", None, f"untrusted: {trust}")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return Line(number, pos, "", None, f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})")
        try:
            req = json.loads(text)
        except json.JSONDecodeError as e:
            return Line(number, pos, text, None, f"invalid JSON: {e.msg} at column {e.colno}")
        except RecursionError:
            return Line(number, pos, text, None, "invalid JSON: nested too deeply")
        except ValueError as e:   # e.g. an integer of more than 4300 digits
            return Line(number, pos, text, None, f"invalid JSON: {str(e).split(':')[0][:2 * QUOTE]}")
        return Line(number, pos, text, req, None)

    def consume(self, line: "Line") -> None:
        s = self.state
        s.offset, s.lines, s.skipping = line.end + line.then_skip, line.number, line.then_skip
        s.tail_len, s.tail_sha = self._digest(line.end) if not line.then_skip else (0, "")

    def _digest(self, end: int, f=None) -> tuple[int, str]:
        n = min(TAIL, end)
        try:
            if f is None:
                with open_regular(self.path) as g:
                    return self._digest(end, g)
            f.seek(end - n)
            return n, hashlib.sha256(f.read(n)).hexdigest()
        except OSError:
            return 0, ""

    def _tail_intact(self, f) -> bool:
        s = self.state
        if not s.tail_len:
            return True
        return self._digest(s.offset, f) == (s.tail_len, s.tail_sha)

    def _rewritten(self, f, st: os.stat_result) -> None:
        """The file was truncated or replaced: what it holds now is never applied. Its lines are
        counted in chunks, at most REWRITE_SCAN bytes (a bigger file is passed over whole)."""
        f.seek(0)
        skipped, end, read = 0, 0, 0
        while read < REWRITE_SCAN and (chunk := f.read(1 << 20)):
            skipped += chunk.count(b"\n")
            if (nl := chunk.rfind(b"\n")) >= 0:
                end = read + nl + 1
            read += len(chunk)
        whole = read >= st.st_size
        if not whole:
            end = st.st_size        # passed over: a line finished later reads as garbage, and is rejected
        s = self.state
        self.rd.append_event("control_rewritten", old_offset=s.offset, new_size=st.st_size,
                             skipped_lines=skipped if whole else None,
                             detail="control.jsonl was truncated or rewritten; its present lines are "
                                    "not applied (append new requests instead)"
                                    + ("" if whole else f"; it is over {REWRITE_SCAN} bytes, passed over unread"))
        self.state = ControlState(offset=end, lines=s.lines + skipped, inode=st.st_ino,
                                  stat_key=[st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns, st.st_mode])
        if s.tainted and s.tainted[0] == st.st_ino:      # truncated in place: still the file others had
            self.state.tainted = s.tainted
        self.state.tail_len, self.state.tail_sha = self._digest(end, f)

    def state_dict(self) -> dict:
        d = dict(vars(self.state))
        d.pop("stat_key")
        return d

    def load_state_dict(self, d: dict) -> None:
        d = dict(d)
        old_tail = d.pop("tail", None)   # checkpoints before the digest kept the last line itself
        self.state = ControlState(**{k: v for k, v in d.items() if k in ControlState.__dataclass_fields__})
        if old_tail is not None and self.state.offset:
            self.state.tail_len, self.state.tail_sha = self._digest(self.state.offset)


