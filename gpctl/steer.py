"""Steering a running job: set / drop / raise / stop / checkpoint, and fork.

Each command appends one request to the run's control.jsonl (atomically, under a lock) and prints
its id; with --wait it prints where the run applied it, or why it refused it.
Paper defaults: drop = lr ÷ 10 or batch × 16; raise = the inverse, an lr rise ramped over 100
LR-normalized steps (App. A.3).
"""
from __future__ import annotations

import time
from typing import Annotated, Optional

import typer

from engine.config import ConfigError
from engine.control import RAISE_RAMP, ControlError, Request, append_request, describe, wait_for_ack
from engine.store.fork import fork as fork_run
from engine.store.jobs import JobStore
from engine.store.rundir import RunDir, resolve
from engine.store.state import FINISHED, LIVE
from gpctl.common import RunArg, SetOpt, State, TimeoutOpt, WaitOpt, check_float, check_int, err, friendly, out

LrFactor = Annotated[Optional[float], typer.Option("--lr-factor", help="K > 1: drop divides the lr by K, raise multiplies it.")]
BatchFactor = Annotated[Optional[int], typer.Option("--batch-factor", help="K > 1: drop multiplies the batch by K, raise divides it.")]
AtStep = Annotated[Optional[int], typer.Option("--at-step", help="Wait in the control file; apply at this step.")]
AtLrTime = Annotated[Optional[float], typer.Option("--at-lr-time", help="Wait; apply once lr_time reaches this.")]
When = Annotated[Optional[str], typer.Option("--when", help="Wait; apply once e.g. 'eval_loss<1.45', 'loss<2.1' or 'noise_scale>512' "
                                                              "holds (loss, grad_norm: EMA 0.8 at each flush; noise_scale: "
                                                              "B_simple from the EMAs of its two parts, with gradient accumulation).")]
Twin = Annotated[bool, typer.Option("--twin", help="Also fork an unsteered copy at the step where the change "
                                                    "applies, queued as its control (the paper's Fig. 4 pair).")]
QueuedOk = Annotated[bool, typer.Option("--queued-ok", help="Send it to a run that is not running yet (queued, stopped, failed): "
                                                            "it applies at the run's first step boundary and is recorded as such.")]


def run_state(rd: RunDir) -> str:
    """The run's state as `gpctl ls` shows it (engine/store/state.py)."""
    from engine.store import state
    from engine.store.jobs import JobStore
    store = JobStore.for_reading(rd.home)
    try:
        return state.of(rd, store)
    finally:
        store.close()


def refusal(rd: RunDir, action: bool, queued_ok: bool = False, state: str | None = None) -> str | None:
    """Why this run takes no request now (None: it does): an ended run takes none; a run that is not
    running takes an action (stop, checkpoint) but not a noise change unless queued_ok. The TUI asks
    this before it opens a dialog; check_request before anything is written (`state`: run_state(rd),
    when the caller has it)."""
    origin = rd.imported()
    if origin is not None:
        return (f"run {rd.id} was imported from {origin.get('from', 'a report')} and is read-only here: "
                f"steer it in the home it ran in")
    state = state or run_state(rd)
    if state in FINISHED:
        return f"run {rd.id} is {state}: it takes no more requests (fork it: gpctl fork {rd.id})"
    if state != "running" and not action and not queued_ok:
        hint = (f"give it at creation (--set) or fork it (gpctl fork {rd.id} --set …)" if state in ("created", "queued")
                else "it would apply when it resumes")
        return (f"run {rd.id} is {state}, not running: {hint}; --queued-ok sends it anyway, "
                f"to apply at its first step boundary")
    return None


def request_words(request: dict) -> str:
    """A request as words: 'batch_size 32 -> 512'-style sentences for toasts ('lr 0.001 over a
    100-step ramp', 'stop', 'checkpoint'), never a Python dict."""
    if "action" in request:
        return str(request["action"])
    parts = [f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in (request.get("set") or {}).items()]
    words = " and ".join(parts) or "nothing"
    if request.get("ramp"):
        words += f" over a {request['ramp']:g}-step ramp (LR-normalized)"
    for key, what in (("at_step", "at step"), ("at_lr_time", "at lr_time"), ("when", "when")):
        if key in request:
            words += f" {what} {request[key]}"
    return words


def check_request(rd: RunDir, request: dict, queued_ok: bool) -> dict:
    """Refuse, before anything is written, a request the run would reject or one that would silently
    change an experiment that is not running."""
    state = run_state(rd)
    why = refusal(rd, "action" in request, queued_ok, state)   # one read of the run's state
    if why:
        raise ControlError(why)
    reason = Request(request).check(rd.config())
    if reason:
        raise ControlError(f"run {rd.id} would reject it: {reason}")
    return dict(request, queued_ok=True) if state != "running" and queued_ok else request


def conditioned(request: dict, at_step: int | None, at_lr_time: float | None, when: str | None,
                twin: bool = False) -> dict:
    given = {k: v for k, v in (("at_step", at_step), ("at_lr_time", at_lr_time), ("when", when)) if v is not None}
    if len(given) > 1:
        raise ControlError("give one of --at-step, --at-lr-time or --when")
    return {**request, **given, **({"twin": True} if twin else {})}


def send(run: str, request: dict, wait: bool, timeout: float, queued_ok: bool = False) -> dict | None:
    """Append the request; with `wait`, print how it was answered and return the answer."""
    rd = resolve(State.home, run)
    rid = append_request(rd, check_request(rd, request, queued_ok))
    if not wait:
        out.print(rid)
        return
    out.print(f"{rid}: sent to {rd.id}; waiting up to {timeout:g}s for it to apply at the run's next step boundary",
              markup=False)
    try:
        ack = wait_for_ack(rd, rid, timeout, on_waiting=lambda ev: out.print(describe(ev, rd.id), markup=False))
    except KeyboardInterrupt:
        err.print(f"stopped waiting; request {rid} stays in {rd.id}'s control file and is answered there "
                  f"(gpctl show {rd.id})", markup=False)
        raise typer.Exit(130) from None
    if ack is None:
        state = rd.status().get("state")
        if state in ("stopped", "failed"):
            out.print(f"run {rd.id} is {state}: the request applies when it resumes (gpctl resume {rd.id})")
            return
        err.print(f"error: run {rd.id} did not acknowledge request {rid} within {timeout:g}s (state {state})")
        raise typer.Exit(1)
    if ack["status"] == "rejected":
        err.print(f"rejected: {ack['reason']}", markup=False)
        raise typer.Exit(1)
    out.print(describe(ack, rd.id), markup=False)
    if ack.get("twin"):
        queue_twin(rd, ack)
    return ack


def queue_twin(rd: RunDir, ack: dict) -> None:
    """The twin the acknowledgement names, forked and queued now (its launcher would, at its next
    poll; whichever comes first does it, once)."""
    from engine.launch.twins import fork_owed
    store = JobStore(State.home)
    try:
        done = fork_owed(store, rd, [ack]) or [ack["twin"]] * (store.get(ack["twin"]) is not None)
    finally:
        store.close()
    if done:
        out.print(f"{ack['twin']}: unsteered twin of {rd.id} from step {ack['step']}, queued", markup=False)


def wait_for_end(rd: RunDir, timeout: float) -> None:
    """After an applied stop: the run still checkpoints and ends; say how it ended (or that it has
    not yet), so "stopped" is printed only once the run recorded it."""
    deadline = time.monotonic() + timeout
    while (st := rd.status()).get("state") in LIVE and time.monotonic() < deadline:
        time.sleep(0.1)
    state = st.get("state")
    if state == "stopped":
        last = rd.list_checkpoints()[-1:]
        out.print(f"{rd.id}: stopped at step {st.get('step')}" + (f" ({last[0][1].name}; gpctl resume {rd.id} "
                  "continues it)" if last else ""), markup=False)
    elif state in LIVE:
        err.print(f"error: run {rd.id} took the stop but had not ended after {timeout:g}s (state {state})")
        raise typer.Exit(1)
    else:
        err.print(f"error: run {rd.id} ended {state} after the stop: {st.get('error') or 'see gpctl show ' + rd.id}")
        raise typer.Exit(1)


def current(rd: RunDir) -> tuple[float, int]:
    """The lr and batch size in effect now (last flushed record, or the config before the first)."""
    s = rd.summary()
    cfg = rd.config()
    return (s["lr"] or cfg.lr), (s["batch_size"] or cfg.batch_size)


def noise_request(rd: RunDir, lr_factor: float | None, batch_factor: int | None, lower: bool, ramp: float) -> dict:
    """`drop`/`raise` on a run: the noise in effect now, changed by engine.control's Request.noise."""
    lr, batch = current(rd)
    return Request.noise(lr, batch, lr_factor, batch_factor, lower, ramp).body


@friendly
def set_(run: RunArg,
         values: Annotated[list[str], typer.Argument(help="lr=… and/or batch_size=…")],
         ramp: Annotated[float, typer.Option("--ramp", help="Reach the new lr over N LR-normalized steps.")] = 0.0,
         wait: WaitOpt = False, timeout: TimeoutOpt = 60.0, queued_ok: QueuedOk = False,
         at_step: AtStep = None, at_lr_time: AtLrTime = None, when: When = None, twin: Twin = False) -> None:
    """Set the lr and/or batch size of a running job (absolute values)."""
    req = Request.from_words(values, ramp).body
    send(run, conditioned(req, at_step, at_lr_time, when, twin), wait, timeout, queued_ok)


@friendly
def drop(run: RunArg, lr_factor: LrFactor = None, batch_factor: BatchFactor = None,
         wait: WaitOpt = False, timeout: TimeoutOpt = 60.0, queued_ok: QueuedOk = False,
         at_step: AtStep = None, at_lr_time: AtLrTime = None, when: When = None, twin: Twin = False) -> None:
    """Lower the noise: lr ÷ K (default K = 10) or batch × K (the paper: 16), now or when a condition holds."""
    rd = resolve(State.home, run)
    req = conditioned(noise_request(rd, lr_factor, batch_factor, lower=True, ramp=0.0), at_step, at_lr_time, when, twin)
    send(rd.id, req, wait, timeout, queued_ok)


@friendly
def raise_(run: RunArg, lr_factor: LrFactor = None, batch_factor: BatchFactor = None,
           ramp: Annotated[float, typer.Option("--ramp", help="LR-normalized steps to reach a raised lr (App. A.3: 100).")] = RAISE_RAMP,
           wait: WaitOpt = False, timeout: TimeoutOpt = 60.0, queued_ok: QueuedOk = False,
           at_step: AtStep = None, at_lr_time: AtLrTime = None, when: When = None, twin: Twin = False) -> None:
    """Raise the noise: lr × K (default K = 10, ramped) or batch ÷ K, now or when a condition holds."""
    rd = resolve(State.home, run)
    req = conditioned(noise_request(rd, lr_factor, batch_factor, lower=False, ramp=ramp), at_step, at_lr_time, when, twin)
    send(rd.id, req, wait, timeout, queued_ok)


@friendly
def stop(run: RunArg, wait: WaitOpt = False, timeout: TimeoutOpt = 60.0,
         at_step: AtStep = None, at_lr_time: AtLrTime = None, when: When = None) -> None:
    """Checkpoint, then end the run cleanly (state "stopped"; `gpctl resume` continues it)."""
    started = time.monotonic()
    ack = send(run, conditioned({"action": "stop"}, at_step, at_lr_time, when), wait, timeout)
    if ack is not None and ack.get("status") == "applied":
        wait_for_end(resolve(State.home, run), max(5.0, timeout - (time.monotonic() - started)))


@friendly
def checkpoint(run: RunArg, wait: WaitOpt = False, timeout: TimeoutOpt = 60.0,
               at_step: AtStep = None, at_lr_time: AtLrTime = None, when: When = None) -> None:
    """Checkpoint the run at its next step boundary (or when a condition holds)."""
    send(run, conditioned({"action": "checkpoint"}, at_step, at_lr_time, when), wait, timeout)


@friendly
def fork(run: RunArg,
         step: Annotated[Optional[int], typer.Option("--step", help="Fork at the checkpoint of this step.")] = None,
         lr_time: Annotated[Optional[float], typer.Option("--lr-time", help="Fork at the checkpoint nearest this lr_time.")] = None,
         latest: Annotated[bool, typer.Option("--latest", help="Fork at the latest checkpoint (the default).")] = False,
         now: Annotated[bool, typer.Option("--now", help="Ask the running job for a checkpoint at its next step boundary, "
                                                         "wait for it, and fork there.")] = False,
         overrides: SetOpt = None,
         name: Annotated[Optional[str], typer.Option("--name", help="Arm name of the new run.")] = None,
         start: Annotated[bool, typer.Option("--start/--no-start", help="--no-start: only create the run directory.")] = True,
         foreground: Annotated[bool, typer.Option("--foreground", help="Train it here, now, instead of queueing it.")] = False,
         enqueue: Annotated[bool, typer.Option("--queue", help="Queue it for a worker (the default).", hidden=True)] = False,
         timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for the checkpoint --now asks for.")] = 120.0) -> None:
    """A new run from RUN's checkpoint, with overrides from its first step; it shares RUN's past.
    Queued for a worker like `gpctl run` (`--foreground` trains it here)."""
    if sum(x is not None and x is not False for x in (step, lr_time, latest or None, now or None)) > 1:
        raise ConfigError("give one of --step, --lr-time, --latest, --now")
    check_int("--step", step, 0, 10 ** 12)
    check_float("--lr-time", lr_time, 0.0)
    check_float("--timeout", timeout, 0.0, 7 * 86400)
    parent = resolve(State.home, run)
    if now:
        step = checkpoint_now(parent, timeout)
    child = fork_run(State.home, parent, step=step, lr_time=lr_time, overrides=overrides or [], name=name)
    out.print(child.id)
    if not start:
        return
    if foreground:
        from gpctl.progress import train_in_foreground
        state = train_in_foreground([child], out)[0]
        if state not in ("done", "stopped"):
            raise typer.Exit(1)
        return
    from gpctl import queue
    queue.enqueue([child])
    if queue.ensure_worker():
        out.print(f"started a worker (log: {State.home / 'worker.log'})")


def checkpoint_now(rd: RunDir, timeout: float) -> int:
    """The step of a checkpoint the running job takes at its next boundary, on request."""
    if run_state(rd) != "running":
        raise ControlError(f"run {rd.id} is {run_state(rd)}, not running: --now needs a running job "
                           f"(fork a checkpoint it has with --step or --latest)")
    st = rd.status()
    step_then = st.get("step") or 0
    # for this attempt only, and until the wait ends: a run that stops (or is killed) before it
    # takes it never takes it later, on a resume, when no one waits for it
    req = {"action": "checkpoint", "until": time.time() + timeout}
    if isinstance(st.get("started"), (int, float)):
        req["attempt"] = st["started"]
    rid = append_request(rd, req)
    ack = wait_for_ack(rd, rid, timeout)
    if ack is not None and ack.get("status") == "applied":
        return int(ack["step"])
    if ack is not None:
        raise ControlError(f"run {rd.id} did not checkpoint: {ack.get('reason')}")
    state = rd.status().get("state")
    last = rd.list_checkpoints()[-1:]
    if state == "stopped" and last and last[0][0] >= step_then:   # a stop came first: its checkpoint is as new
        out.print(f"run {rd.id} stopped before it took the checkpoint request: forking its stop checkpoint "
                  f"(step {last[0][0]}); the request expires unused", markup=False)
        return last[0][0]
    if state in ("running", "created"):
        raise ControlError(f"run {rd.id} did not checkpoint: no answer within {timeout:g}s (the request "
                           f"expires unused; fork --latest forks its newest checkpoint)")
    raise ControlError(f"run {rd.id} ended {state} before it took the checkpoint request (the request expires "
                       f"unused; fork --latest forks its newest checkpoint)")


def register(app: typer.Typer) -> None:
    app.command("set")(set_)
    app.command()(drop)
    app.command("raise")(raise_)
    app.command()(stop)
    app.command()(checkpoint)
    app.command()(fork)
