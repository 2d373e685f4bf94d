"""A run's state: one vocabulary and one rule, for every command, the TUI, steering and notify.

A run has two records of its state: status.json (the run's own: what its process last wrote) and
its job in jobs.db (the queue's: whether it waits, who runs it, how its attempt ended). `effective`
merges them: the queue knows better before a run starts and why it ended (queued, lost, cancelled,
failed); otherwise the run's own word stands. `shown` is what `ls` and the TUI print: `unreadable`
when a file of the run could not be read.
"""
from __future__ import annotations

RUN_STATES = ("created", "running", "done", "failed", "stopped", "diverged")    # status.json
TERMINAL = ("done", "failed", "diverged", "stopped", "cancelled")               # a job's ends
JOB_STATES = ("queued", "running", "lost") + TERMINAL                            # jobs.db
SHOWN = tuple(dict.fromkeys(RUN_STATES + JOB_STATES + ("unreadable",)))         # what ls --state takes

LIVE = ("created", "running")                  # the run's process may still write
ENDED = TERMINAL + ("lost",)                   # a job's ends, and a run whose process died
FINISHED = ("done", "diverged", "cancelled")   # take no more requests (stopped and failed runs resume)
OK = ("done", "stopped")                       # ends that `--wait` and `resume --wait` count as success


def effective(run_state: str, job_state: str | None) -> str:
    """A run's state from status.json's and its job's (None: not in the queue)."""
    if job_state and (job_state in ("queued", "lost", "cancelled", "failed") or run_state == "created"):
        return job_state
    return run_state


def shown(summary: dict, job_state: str | None) -> str:
    """The state `ls` and the TUI print for a run's summary (RunDir.summary) and its job's state."""
    return "unreadable" if summary.get("problem") else effective(summary["run_state"], job_state)


def of(rd, store) -> str:
    """The effective state of the run in `rd` (an engine.store.rundir.RunDir), from its files and its
    job in `store` (its home's engine.store.jobs.JobStore)."""
    job = store.get(rd.id)
    return effective(rd.summary()["run_state"], job and job.state)
