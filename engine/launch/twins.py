"""Twins are forked by the launcher, never by the training loop.

A steering request with `"twin": true` asks for an unsteered copy of the run forked where the change
applies (the paper's Fig. 4 pair without retraining the prefix). The loop does only what a job may do
in its own run directory: at that boundary it checkpoints, applies the change, and names the twin in
its acknowledgement (`twin`: the twin's run id, chosen there; `twin_checkpoint`: the file it forks
from). Whoever launched the job then owes the twin: the local worker (every poll, reading the job's
new events, and once more when it ends), `slurm.sync` for Slurm jobs (on the login node: compute nodes
write only their run directories, DESIGN's rule), and `gpctl drop --twin --wait` itself.

`fork_owed` is idempotent and safe when several launchers race: the twin's id comes from the
acknowledgement and its folder is made with one mkdir, so exactly one of them forks it; a twin whose
folder exists with no job (a launcher killed between the two) is queued by the next pass.
"""
from __future__ import annotations

import time

from engine.config import ConfigError
from engine.store.fork import fork, twin_name
from engine.store.jobs import JobStore
from engine.store.rundir import RunDir


def owed(events: list[dict]) -> list[dict]:
    """The applied acknowledgements in `events` that name a twin."""
    return [e for e in events if e.get("event") == "control" and e.get("status") == "applied"
            and isinstance(e.get("twin"), str) and isinstance(e.get("step"), int)]


def fork_owed(store: JobStore, rd: RunDir, acks: list[dict] | None = None) -> list[str]:
    """Fork and queue every twin `rd`'s acknowledgements name that is not forked yet, on the parent's
    own backend; returns the ids queued by this call. `acks`: the acknowledgements to look at (a
    caller that tails the events passes only the new ones); None reads all of the run's events."""
    acks = owed(rd.events()[0] if acks is None else acks)
    made = []
    for ack in acks:
        twin_id = ack["twin"]
        home = rd.home
        child = RunDir(home / "runs" / twin_id)
        if store.get(twin_id) is not None:
            continue                      # forked and queued before (by this launcher or another)
        if not child.path.exists():
            try:
                child = fork(home, rd, step=ack["step"], name=twin_name(rd.config().name, ack["step"]),
                             run_id=twin_id)
            except FileExistsError:
                continue                  # another launcher is forking it right now: it queues it
            except ConfigError as e:      # its checkpoint is gone (deleted by hand): say so once
                rd.append_event("twin_failed", twin=twin_id, request=ack.get("id"), reason=str(e))
                continue
            child.append_event("twin_of", run=rd.id, request=ack.get("id"), step=ack["step"],
                               lr_time=ack.get("lr_time"))
        elif time.time() - _created(child) < 60:
            continue                      # made moments ago by another launcher, which queues it
        if _queue(store, rd, child):
            made.append(twin_id)
    return made


def _created(rd: RunDir) -> float:
    try:
        return rd.status_file.stat().st_mtime
    except OSError:
        return 0.0


def _queue(store: JobStore, parent: RunDir, child: RunDir) -> bool:
    """Queue the twin where its parent runs: a local job, or a Slurm job with the parent's options."""
    job = store.get(parent.id)
    try:
        if job is not None and job.backend == "slurm":
            from engine.launch import slurm
            slurm.submit(store, child, slurm.options_of(parent))
        else:
            store.enqueue(child.id, child.path, gpus=child.config().gpus, group=child.config().group)
    except ValueError:                    # "already queued": a racing launcher queued it first
        return False
    return True
