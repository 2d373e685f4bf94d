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

One `Request` (below) is the protocol: it validates itself against a run's config, knows when a
conditional one (at_step / at_lr_time / when) may apply, applies itself to the trainer, and its
answer reads as a sentence (`describe`). The trainer, the CLI and the TUI all use it; the CLI and
the TUI check a request with it before they write. No content of the file can end a run: lines over
MAX_LINE bytes are rejected by size, undecodable or unparsable ones with a reason.

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
import hashlib
import json
import math
import os
import secrets
import time
from dataclasses import dataclass, field

from engine.rundir import FILE_MODE, RunDir, open_regular, read_jsonl

SET_KEYS = ("lr", "batch_size")
ACTIONS = ("checkpoint", "stop")
CONDITIONS = ("at_step", "at_lr_time", "when")
REQUEST_KEYS = ("id", "set", "ramp", "action", "time", "by", "queued_ok", "twin", "until", "attempt") + CONDITIONS
WHEN_KEYS = ("loss", "eval_loss")   # loss: EMA (0.8) of the train loss at the last flush; eval_loss: the last eval
LOSS_EMA = 0.8
FINISHED = ("done", "diverged", "cancelled")   # take no more requests (stopped/failed runs resume)
LIVE = ("created", "running")


MAX_LINE = 64 * 1024       # bytes: a longer line is rejected (naming its size), never parsed or stored
MAX_READ = 64 * 1024 * 1024  # bytes scanned per poll (in 1 MiB reads: memory stays under MAX_LINE + 1 MiB);
                              # the rest waits for the next poll: a multi-GiB tail costs ~30 ms a poll
REWRITE_SCAN = 64 * 1024 * 1024  # bytes of a rewritten control file whose lines are counted
QUOTE = 60                 # characters of a bad value quoted in an event or a log line


class ControlError(ValueError):
    """A request that cannot be sent (finished run, bad value); str(e) is the line to print."""


def _quote(value: object) -> str:
    """A bad value as JSON, cut to QUOTE characters: a 10 MB value never reaches events or logs."""
    try:
        text = json.dumps(value)
    except (ValueError, TypeError, RecursionError):
        text = type(value).__name__
    return _cut(text)


def _cut(text: str) -> str:
    return text if len(text) <= QUOTE else text[:QUOTE] + f"… ({len(text)} characters)"


def _num_text(value: object) -> str:
    try:
        return _cut(repr(value))
    except ValueError:    # an int too long to print
        return "an integer of more than 4300 digits"


def _number(value: object) -> float | None:
    """value as a finite float, or None (bools, strings, huge integers that overflow a float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        f = float(value)
    except OverflowError:
        return None
    return f if math.isfinite(f) else None


# ------------------------------------------------------------------ validation

def validate(req: object, *, base_lr: float, micro_batch: int, max_lr_factor: float,
             max_batch: int) -> str | None:
    """None if `req` is a valid request, else the reason it is not (one line)."""
    if not isinstance(req, dict):
        return f"a request must be a JSON object, got {type(req).__name__}"
    unknown = [k for k in req if k not in REQUEST_KEYS]
    if unknown:
        return f"unknown key '{_cut(unknown[0])}' (known: {', '.join(REQUEST_KEYS)})"
    if "id" in req and not (isinstance(req["id"], str) and req["id"].isprintable()):
        return f"'id' must be printable text (one line), got {_quote(req['id'])}"   # a long one names no event
    if "by" in req and not (isinstance(req["by"], str) and 0 < len(req["by"]) <= 64 and req["by"].isprintable()):
        return f"'by' must be printable text of 1 to 64 characters, got {_quote(req['by'])}"
    if "time" in req and _number(req["time"]) is None:
        return f"'time' must be a number (seconds since the epoch), got {_quote(req['time'])}"
    if "until" in req and _number(req["until"]) is None:
        return f"'until' must be a number (seconds since the epoch), got {_quote(req['until'])}"
    if "attempt" in req and _number(req["attempt"]) is None:
        return f"'attempt' must be a number (the `started` of the attempt it is for), got {_quote(req['attempt'])}"
    if "queued_ok" in req and not isinstance(req["queued_ok"], bool):
        return f"'queued_ok' must be true or false, got {_quote(req['queued_ok'])}"
    if ("set" in req) == ("action" in req):
        return "a request needs exactly one of 'set' or 'action'"
    if "twin" in req and (req["twin"] is not True or "set" not in req):
        return "'twin' must be true, on a 'set' request (an unsteered copy forked where the change applies)"
    given = [k for k in CONDITIONS if k in req]
    if len(given) > 1:
        return f"give at most one condition, got {', '.join(given)}"
    if given:
        problem = _condition_problem(given[0], req[given[0]])
        if problem:
            return problem
    if "action" in req:
        if req["action"] not in ACTIONS:
            return f"unknown action {_quote(req['action'])} (known: {', '.join(ACTIONS)})"
        if "ramp" in req:
            return "'ramp' goes with 'set'"
        return None
    changes = req["set"]
    if not isinstance(changes, dict) or not changes:
        return "'set' must be a non-empty object, e.g. {\"lr\": 0.005}"
    bad = [k for k in changes if k not in SET_KEYS]
    if bad:
        return f"unknown key 'set.{_cut(bad[0])}' (known: {', '.join(SET_KEYS)})"
    if "lr" in changes:
        v = changes["lr"]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return f"'lr' must be a number, got {_quote(v)}"
        lr = _number(v)
        if lr is None or lr <= 0:
            return f"'lr' must be finite and > 0, got {_num_text(v)}"
        if lr > max_lr_factor * base_lr:
            return f"'lr' = {_num_text(v)} exceeds the sanity bound {max_lr_factor * base_lr:g} (control.max_lr_factor × lr)"
    if "batch_size" in changes:
        b = changes["batch_size"]
        if isinstance(b, bool) or not isinstance(b, int):
            return f"'batch_size' must be an integer, got {_quote(b)}"
        if b <= 0:
            return f"'batch_size' must be > 0, got {_num_text(b)}"
        if b > max_batch:
            return f"'batch_size' = {_num_text(b)} exceeds the sanity bound {max_batch} (control.max_batch_size)"
        if micro_batch and b % micro_batch:
            return f"'batch_size' = {b} is not a multiple of micro_batch_size = {micro_batch}"
    if "ramp" in req:
        r = _number(req["ramp"])
        if r is None or r < 0:
            return f"'ramp' must be a number >= 0, got {_quote(req['ramp'])}"
        if "lr" not in changes:
            return "'ramp' needs 'set.lr'"
    return None


def _condition_problem(key: str, value: object) -> str | None:
    if key == "at_step":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return f"'at_step' must be an integer >= 0, got {_quote(value)}"
    elif key == "at_lr_time":
        v = _number(value)
        if v is None or v < 0:
            return f"'at_lr_time' must be a number >= 0, got {_quote(value)}"
    elif parse_when(value) is None:
        return (f"'when' must compare {' or '.join(WHEN_KEYS)} with a number, e.g. \"eval_loss<1.45\", "
                f"got {_quote(value)}")
    return None


_OPS = {"<=": lambda a, b: a <= b, ">=": lambda a, b: a >= b, "<": lambda a, b: a < b, ">": lambda a, b: a > b}


def parse_when(text: object) -> tuple[str, str, float] | None:
    """"eval_loss<1.45" -> ("eval_loss", "<", 1.45); None if it is not such a comparison."""
    if not isinstance(text, str) or len(text) > 100:
        return None
    for op in ("<=", ">=", "<", ">"):
        key, sep, num = text.partition(op)
        if sep:
            key = key.strip()
            try:
                value = float(num)
            except ValueError:
                return None
            return (key, op, value) if key in WHEN_KEYS and math.isfinite(value) else None
    return None


def condition_met(req: dict, step: int, lr_time: float, loss: float | None, eval_loss: float | None) -> dict | None:
    """The values that meet the request's condition at this step boundary (an unconditional request:
    {}), or None while it is not met. Conditions on lr_time forgive float rounding, as schedules do."""
    from engine.schedule import reached

    if "at_step" in req:
        return {"at_step": req["at_step"], "step": step} if step >= req["at_step"] else None
    if "at_lr_time" in req:
        return ({"at_lr_time": req["at_lr_time"], "lr_time": lr_time}
                if reached(lr_time, float(req["at_lr_time"])) else None)
    if "when" in req:
        key, op, value = parse_when(req["when"])
        now = loss if key == "loss" else eval_loss
        return {"when": req["when"], key: now} if now is not None and _OPS[op](now, value) else None
    return {}


def describe(ack: dict, run_id: str = "") -> str:
    """An acknowledgement as a sentence: "RUN: lr 0.05 → 0.005 at step 152 (lr_time 151.0, samples 77 824)"."""
    who = f"{run_id}: " if run_id else ""
    samples = f"{ack.get('samples') or 0:,}".replace(",", " ")
    where = f"at step {ack.get('step')} (lr_time {ack.get('lr_time') or 0:.1f}, samples {samples})"
    if ack.get("status") == "rejected":
        return f"{who}rejected {where}: {ack.get('reason')}"
    if ack.get("status") == "waiting":
        return f"{who}waiting since step {ack.get('step')} until {_condition_text(ack)}"
    what = ", ".join(f"{ {'batch_size': 'batch'}.get(k, k)} {v[0]:.4g} → {v[1]:.4g}"
                     for k, v in ack.get("changed", {}).items() if isinstance(v, list))
    what = what or {"stop": "stopped", "checkpoint": "checkpoint saved"}.get(ack.get("action"), "applied")
    met = ack.get("met") or {}
    cond = ""
    if "when" in met:
        key = next(k for k in met if k != "when")
        cond = f", as {met['when']} held ({key} {_fmt_num(met[key])})"
    elif "at_lr_time" in met:
        cond = f", once lr_time reached {_fmt_num(met['at_lr_time'])}"
    twin = f"; unsteered twin {ack['twin']} queued" if ack.get("twin") else ""
    return f"{who}{what} {where}{cond}{twin}"


def event_text(e: dict) -> str:
    """One event of events.jsonl as a short sentence (the TUI's events pane and `gpctl show`)."""
    kind = e.get("event")
    at = f" at step {e['step']}" if isinstance(e.get("step"), int) else ""
    if kind == "control":
        return describe(e)
    if kind == "start":
        extra = ", ".join(x for x in (e.get("precision"), f"{e['params']:,} parameters" if isinstance(e.get("params"), int)
                                      else None) if x)
        return f"started{at} on {e.get('device', '?')}" + (f" ({extra})" if extra else "")
    if kind == "resume":
        if e.get("restarted"):
            return f"restarted{at}: {e['restarted']}"
        skipped = e.get("skipped")
        past = (f", past {len(skipped)} unreadable newer checkpoint(s): {'; '.join(map(str, skipped[:2]))[:200]}"
                if isinstance(skipped, list) and skipped else "")
        return f"resumed{at} from {e.get('checkpoint') or 'the start (no checkpoint yet)'}{past}"
    if kind == "fork":
        return f"forked from {e.get('parent')}{at} ({e.get('checkpoint')})"
    if kind == "forked":
        return f"fork {e.get('child')} made{at} with {' '.join(e.get('overrides') or []) or 'no overrides'}"
    if kind == "twin_of":
        return f"unsteered twin of {e.get('run')}{at}"
    if kind == "schedule":
        what = ", ".join(f"{ {'batch_size': 'batch'}.get(k, k)} {v[0]:.4g} → {v[1]:.4g}" for k, v in (e.get("changed") or {}).items()
                         if isinstance(v, list) and len(v) == 2)
        return f"planned change: {what or 'applied'}{at}"
    if kind == "checkpoint":
        return f"checkpoint{at}"
    if kind == "end":
        return f"ended {e.get('state', '')}{at}"
    if kind in ("error", "diverged"):
        return f"{kind}{at}: {e.get('error')}"
    if kind == "lost":
        return f"lost{at}: {e.get('reason')}" + ("; queued again to resume" if e.get("requeued") else "")
    if kind == "retry":
        return f"attempt {e.get('attempt')} failed ({e.get('error')}); retrying from the last checkpoint"
    if kind in ("control_unreadable", "control_rewritten") and isinstance(e.get("detail"), str):
        return e["detail"][:300]
    if kind == "slurm_submit":
        return f"submitted to Slurm as job {e.get('slurm_id')}"
    detail = {k: v for k, v in e.items() if k not in ("event", "time", "host", "python", "torch")}
    return f"{kind} {json.dumps(detail)}"


def _condition_text(req: dict) -> str:
    if "at_step" in req:
        return f"step {req['at_step']}"
    if "at_lr_time" in req:
        return f"lr_time {_fmt_num(req['at_lr_time'])}"
    return str(req.get("when", ""))


def _fmt_num(v: object) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def parse_words(words: list[str], ramp: float = 0.0) -> dict:
    """A request from `k=v` words (`lr=0.005 batch_size=512 ramp=100`), the CLI's and the TUI's one
    parser. Values are TOML values; what they mean is checked by `validate`, like any line."""
    from engine.config import ConfigError, parse_value

    changes: dict = {}
    for item in words:
        key, _, text = item.partition("=")
        try:
            value = parse_value(text) if text else None
        except ConfigError as e:
            raise ControlError(f"{key[:40]}: {e}") from None
        if key == "ramp" and text:
            ramp = value
        elif key in SET_KEYS and text:
            changes[key] = value
        else:
            raise ControlError(f"expected lr=VALUE, batch_size=VALUE or ramp=N, got {_quote(item)}")
    return {"set": changes, **({"ramp": ramp} if ramp else {})}


@dataclass
class Request:
    """One request, whatever brought it (a control line, CLI words, a TUI dialog). It validates itself
    against a run's config, knows when it may apply, applies itself to a trainer at a step boundary,
    and its answer reads as one sentence (`describe`). A new request key is added here, and only here.
    """
    body: dict
    line: int = 0
    id: str = ""

    @classmethod
    def from_words(cls, words: list[str], ramp: float = 0.0) -> "Request":
        return cls(parse_words(words, ramp))

    def check(self, cfg) -> str | None:
        """None if the run whose config is `cfg` would take it, else why not. Never raises."""
        cc = cfg.control
        try:
            return validate(self.body, base_lr=cfg.lr, micro_batch=cfg.micro_batch_size,
                            max_lr_factor=cc.max_lr_factor, max_batch=cc.max_batch_size)
        except Exception as e:  # noqa: BLE001 - nothing a request contains may end a run
            return f"could not be read as a request ({type(e).__name__})"

    @property
    def condition(self) -> dict:
        return {k: self.body[k] for k in CONDITIONS if k in self.body}

    def met(self, step: int, lr_time: float, loss: float | None, eval_loss: float | None) -> dict | None:
        return condition_met(self.body, step, lr_time, loss, eval_loss)

    def apply(self, run, met: dict) -> None:
        """Apply to `run` (an engine.train.Trainer) at this step boundary and answer in its events."""
        req, where = self.body, run.where()
        answer = {"id": self.id, "line": self.line}
        extra = {"met": met} if met else {}
        if req.get("queued_ok") is True:   # sent before the run was running, on purpose
            extra["queued_ok"] = True
        if "set" in req:
            new = req["set"]
            if req.get("twin") is True:
                try:
                    extra["twin"] = run.fork_twin(self.id)
                except Exception as e:  # noqa: BLE001 - no twin, no change: the pair is the experiment
                    run.rd.append_event("control", **answer, status="rejected",
                                        reason=f"could not fork the twin: {type(e).__name__}: {str(e)[:200]}",
                                        **where)
                    return
            changed = run.schedule.set(run.step, run.lr_time, lr=new.get("lr", 0.0),
                                       batch_size=new.get("batch_size", 0), ramp=req.get("ramp", 0.0),
                                       manual=True)
            if "lr" in new:
                extra["overrides_schedule"] = True
            run.rd.append_event("control", **answer, status="applied", changed=changed,
                                ramp=req.get("ramp", 0.0), **extra, **where)
        elif req["action"] == "checkpoint":
            if run.last_eval.get("step") != run.step:
                run.evaluate()
            run.save_checkpoint()
            run.rd.append_event("control", **answer, status="applied", action="checkpoint", **extra, **where)
        else:  # stop: the trainer checkpoints at the end of run() and ends cleanly
            run.stop_requested = True
            run.rd.append_event("control", **answer, status="applied", action="stop", **extra, **where)


def expired(req: dict, now: float | None = None) -> str | None:
    """Why a request with `until` may no longer apply (it was not taken in time), or None. `fork
    --now` sends its checkpoint request with one: a run that stops first never takes it later."""
    until = req.get("until")
    now = time.time() if now is None else now
    if until is None or now <= until:
        return None
    return (f"expired: not taken before its 'until' ({time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(until))}, "
            f"{now - until:.0f} s ago)")


def request_id(req: object) -> str | None:
    """The request's own id when it is short printable text (a long one, or one with a newline or an
    undecodable character, is not copied into events: the request is then named by its line)."""
    rid = req.get("id") if isinstance(req, dict) else None
    return rid if isinstance(rid, str) and 0 < len(rid) <= 64 and rid.isprintable() else None


MAX_WAITING = 64     # requests waiting for their condition at once; they are kept in every checkpoint


def kept(req: dict) -> dict:
    """What a waiting request keeps (in checkpoints): what it does and when, not who sent it when
    (nor its id, which is kept beside it, cut to request_id's bound)."""
    return {k: v for k, v in req.items() if k not in ("by", "time", "id")}


def untrusted_reason(st: os.stat_result, dir_st: os.stat_result | None = None) -> str | None:
    """Why the control file's lines cannot be trusted to come from the run's user, or None.

    The boundary (README, "Security"): only the run's user may steer it. Lines are refused while the
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

