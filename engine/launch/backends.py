"""Where jobs run, behind one small contract the CLI and the TUI both use:

    submit(store, rds, ...)   queue runs (local: jobs.db for workers; slurm: sbatch, one job or an array)
    cancel(store, run_id)     a queued job at once; a running one checkpoints and stops
    sync(store)               bring jobs.db's states up to date (slurm: squeue + run dirs; local: workers do it)
    logs(rd, offset)          the run's own output (both write the run's log.txt)

`backend_of(job)` picks by the job's `backend` column, so nothing else asks `if job.backend == ...`.
"""
from __future__ import annotations

from engine.store.jobs import JobStore
from engine.store.rundir import RunDir


class Local:
    name = "local"

    def submit(self, store: JobStore, rds: list[RunDir], resume: bool = False, after: list[str] = (),
               priority: int = 0, retries: int = 0, **_) -> list[str]:
        for rd in rds:
            cfg = rd.config()
            store.enqueue(rd.id, rd.path, gpus=cfg.gpus, resume=resume, priority=priority, group=cfg.group,
                          after=after, retries=retries)
        return [""] * len(rds)

    def cancel(self, store: JobStore, run_id: str) -> str:
        return store.request_cancel(run_id)

    def sync(self, store: JobStore) -> None:
        pass   # local workers keep their jobs' states current

    def logs(self, rd: RunDir, offset: int = 0) -> tuple[bytes, int]:
        return rd.read_log(offset)


class Slurm(Local):
    name = "slurm"

    def submit(self, store: JobStore, rds: list[RunDir], resume: bool = False, after: list[str] = (),
               priority: int = 0, retries: int = 0, opts=None, array: bool = False, home=None) -> list[str]:
        from engine.launch import slurm
        opts = opts or slurm.SlurmOptions()
        if array and len(rds) > 1:
            return slurm.submit_array(store, rds, opts, home or rds[0].home, resume, after, priority)
        return [slurm.submit(store, rd, opts, resume, after, priority) for rd in rds]

    def cancel(self, store: JobStore, run_id: str) -> str:
        from engine.launch import slurm
        return slurm.cancel(store, run_id)

    def sync(self, store: JobStore) -> None:
        from engine.launch import slurm
        slurm.sync(store)


BACKENDS = {"local": Local(), "slurm": Slurm()}


def backend_of(job) -> Local:
    return BACKENDS.get(getattr(job, "backend", "local"), BACKENDS["local"])


def cancel(store: JobStore, run_id: str) -> str:
    """Cancel a run's job wherever it runs; KeyError if it is not in the queue."""
    job = store.get(run_id)
    if job is None:
        raise KeyError(run_id)
    return backend_of(job).cancel(store, run_id)


def sync(store: JobStore) -> None:
    for b in BACKENDS.values():
        b.sync(store)
