"""A control request: its keys and bounds, its validation against a run's config, its condition,
how it applies at a step boundary, and its answer as a sentence. No file I/O (reader.py and
client.py do that)."""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Protocol

SET_KEYS = ("lr", "batch_size")
ACTIONS = ("checkpoint", "stop")
CONDITIONS = ("at_step", "at_lr_time", "when")
REQUEST_KEYS = ("id", "set", "ramp", "action", "time", "by", "queued_ok", "twin", "until", "attempt") + CONDITIONS
# loss: EMA (0.8) of the train loss at the last flush; eval_loss: the last eval; noise_scale: the
# gradient noise scale B_simple as the ratio of the EMAs (0.8) of its numerator and denominator over
# the flushed records that have them (McCandlish et al.: average before dividing; engine/train/noise.py);
# grad_norm: its EMA (0.8). (lr / batch follows from the schedule: at_step and at_lr_time condition on it.)
WHEN_KEYS = ("loss", "eval_loss", "noise_scale", "grad_norm")
LOSS_EMA = 0.8
# the paper's noise changes (App. A), what `drop`/`raise` (and the TUI's d/r) do when given no factor
LR_FACTOR = 10.0      # drop: lr ÷ 10 (C4's 6e-4 -> 6e-5); raise: lr × 10
BATCH_FACTOR = 16     # drop: batch × 16 (CIFAR-5m's 32 -> 512); raise: ÷ 16
RAISE_RAMP = 100.0    # a raised lr is reached linearly over this many LR-normalized steps (App. A.3)


MAX_LINE = 64 * 1024       # bytes: a longer line is rejected (naming its size), never parsed or stored
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


def condition_met(req: dict, step: int, lr_time: float, loss: float | None, eval_loss: float | None,
                  extra: dict | None = None) -> dict | None:
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
        now = {"loss": loss, "eval_loss": eval_loss, **(extra or {})}.get(key)   # extra: noise_scale, …
        return {"when": req["when"], key: now} if now is not None and _OPS[op](now, value) else None
    return {}


def changed_text(changed: object, digits: int = 4, arrow: str = " → ") -> str:
    """An event's `changed` ({name: [before, after]}) in words: "batch 32 → 512, lr 0.05 → 0.005";
    the one formatter of it (sentences, the TUI's markers and legend). Odd values are shown as they
    are, a `skipped` note is left out; "" when nothing changed."""
    parts = []
    for k, v in (changed.items() if isinstance(changed, dict) else ()):
        if k == "skipped":
            continue
        name = {"batch_size": "batch"}.get(k, k)
        if isinstance(v, list) and len(v) == 2:
            num = all(isinstance(u, (int, float)) and not isinstance(u, bool) for u in v)
            parts.append(f"{name} {v[0]:.{digits}g}{arrow}{v[1]:.{digits}g}" if num else f"{name} {v[0]}{arrow}{v[1]}")
        else:
            parts.append(name)
    return ", ".join(parts)


def describe(ack: dict, run_id: str = "") -> str:
    """An acknowledgement as a sentence: "RUN: lr 0.05 → 0.005 at step 152 (lr_time 151.0, samples 77 824)"."""
    who = f"{run_id}: " if run_id else ""
    samples = f"{ack.get('samples') or 0:,}".replace(",", " ")
    where = f"at step {ack.get('step')} (lr_time {ack.get('lr_time') or 0:.1f}, samples {samples})"
    if ack.get("status") == "rejected":
        return f"{who}rejected {where}: {ack.get('reason')}"
    if ack.get("status") == "waiting":
        return f"{who}waiting since step {ack.get('step')} until {_condition_text(ack)}"
    what = changed_text(ack.get("changed"))
    what = what or {"stop": "stopped", "checkpoint": "checkpoint saved"}.get(ack.get("action"), "applied")
    met = ack.get("met") or {}
    cond = ""
    if "when" in met:
        key = next(k for k in met if k != "when")
        cond = f", as {met['when']} held ({key} {_fmt_num(met[key])})"
    elif "at_lr_time" in met:
        cond = f", once lr_time reached {_fmt_num(met['at_lr_time'])}"
    twin = f"; unsteered twin {ack['twin']} (from {ack.get('twin_checkpoint', 'this checkpoint')}, queued by " \
        "the launcher)" if ack.get("twin") else ""
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
    if kind == "snap":
        return str(e.get("sentence") or "snapped onto its reference")
    if kind == "code_changed":
        from engine.store.provenance import code_text
        return f"the code changed since the run was created: {code_text(e.get('created'))} → {code_text(e.get('now'))}"
    if kind == "twin_failed":
        return f"twin {e.get('twin')} could not be forked: {e.get('reason')}"
    if kind == "schedule":
        what = changed_text(e.get("changed"))
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

    @classmethod
    def noise(cls, lr: float, batch: int, lr_factor: float | None = None, batch_factor: int | None = None,
              lower: bool = True, ramp: float = 0.0) -> "Request":
        """A drop (`lower`) or a raise of the noise from the lr and batch in effect: lr ÷ or × a factor
        (LR_FACTOR by default; a raised lr reached over `ramp` LR-normalized steps), or batch × or ÷
        a factor. What `gpctl drop/raise` and the TUI's d/r send; ControlError on a bad factor."""
        what = "drop" if lower else "raise"
        if lr_factor is not None and batch_factor is not None:
            raise ControlError("give one of --lr-factor or --batch-factor")
        if batch_factor is not None:
            if batch_factor <= 1:
                raise ControlError(f"--batch-factor must be > 1, got {batch_factor} "
                                   f"({what} {'multiplies' if lower else 'divides'} the batch by it)")
            if lower:
                return cls({"set": {"batch_size": batch * batch_factor}})
            if batch % batch_factor:
                raise ControlError(f"batch {batch} is not divisible by --batch-factor {batch_factor}")
            return cls({"set": {"batch_size": batch // batch_factor}})
        k = LR_FACTOR if lr_factor is None else lr_factor
        if not k > 1 or k == float("inf"):
            raise ControlError(f"--lr-factor must be a number > 1, got {k:g} "
                               f"({'drop divides' if lower else 'raise multiplies'} the lr by it)")
        body = {"set": {"lr": lr / k if lower else lr * k}}
        if not lower and ramp > 0:
            body["ramp"] = ramp
        return cls(body)

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

    def met(self, step: int, lr_time: float, loss: float | None, eval_loss: float | None,
            extra: dict | None = None) -> dict | None:
        return condition_met(self.body, step, lr_time, loss, eval_loss, extra)

    def apply(self, run: "Steerable", met: dict) -> None:
        """Apply to `run` at this step boundary and answer in its events."""
        req, where = self.body, run.where()
        answer = {"id": self.id, "line": self.line}
        extra = {"met": met} if met else {}
        if req.get("queued_ok") is True:   # sent before the run was running, on purpose
            extra["queued_ok"] = True
        if "set" in req:
            new = req["set"]
            if req.get("twin") is True:
                try:   # the checkpoint the launcher forks the twin from (engine.launch.twins)
                    extra["twin"], extra["twin_checkpoint"] = run.twin_checkpoint()
                except Exception as e:  # noqa: BLE001 - no twin, no change: the pair is the experiment
                    run.record("control", **answer, status="rejected",
                               reason=f"could not checkpoint for the twin: {type(e).__name__}: {str(e)[:200]}",
                               **where)
                    return
            changed = run.set_noise(lr=new.get("lr", 0.0), batch_size=new.get("batch_size", 0),
                                    ramp=req.get("ramp", 0.0))
            if "lr" in new:
                extra["overrides_schedule"] = True
            run.record("control", **answer, status="applied", changed=changed, ramp=req.get("ramp", 0.0),
                       **extra, **where)
        elif req["action"] == "checkpoint":
            run.checkpoint_now()
            run.record("control", **answer, status="applied", action="checkpoint", **extra, **where)
        else:  # stop: the run checkpoints at the end of its loop and ends cleanly
            run.stop()
            run.record("control", **answer, status="applied", action="stop", **extra, **where)


class Steerable(Protocol):
    """What a request needs of the run it applies to (engine.train.loop.Trainer is one): the whole
    interface between the control layer and the training loop."""

    def where(self) -> dict:
        """The clocks at this step boundary: {"step", "samples", "lr_time"}."""

    def record(self, kind: str, **fields) -> None:
        """Append an event to the run's events.jsonl."""

    def set_noise(self, lr: float, batch_size: int, ramp: float) -> dict:
        """Set the lr (0: unchanged) and batch size (0: unchanged) as a manual change from this
        boundary, the lr reached over `ramp` LR-normalized steps; returns {name: [before, after]}."""

    def checkpoint_now(self) -> None:
        """Evaluate (unless this step was evaluated) and checkpoint at this boundary."""

    def stop(self) -> None:
        """Checkpoint and end cleanly at the end of this step."""

    def twin_checkpoint(self) -> tuple[str, str]:
        """Checkpoint this boundary for an unsteered twin; (the twin's run id, the checkpoint's file
        name), which the launcher forks and queues from the acknowledgement."""


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


