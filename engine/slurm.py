"""The Slurm backend: each run is one `sbatch` job that runs `python -m engine train RUN_DIR`.

The run directory on the shared filesystem stays the meeting point: the job writes its records,
status and checkpoints there; control files, `gpctl ls/show/tv` and the TUI work as for local
jobs. jobs.db keeps the Slurm job id; `sync()` maps squeue (and sacct, when accounting is on)
back to gpctl's states. scancel sends SIGTERM first, so a cancelled run checkpoints and stops.
"""
from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from engine.jobs import JobStore
from engine.rundir import RunDir

SLURM_ACTIVE = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING")


class SlurmError(RuntimeError):
    """sbatch/squeue/scancel missing or refusing; str(e) is the line to print."""


@dataclass
class SlurmOptions:
    partition: str = ""
    gres: str = ""          # e.g. gpu:1
    time: str = ""          # e.g. 04:00:00
    extra: tuple[str, ...] = ()


def _run(cmd: list[str]) -> str:
    if shutil.which(cmd[0]) is None:
        raise SlurmError(f"{cmd[0]} not found: is Slurm installed and on PATH?")
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SlurmError(f"{' '.join(cmd[:2])} failed: {(res.stderr or res.stdout).strip().splitlines()[-1:]}")
    return res.stdout


def script(rd: RunDir, opts: SlurmOptions, resume: bool) -> str:
    lines = ["#!/bin/bash", f"#SBATCH --job-name=gpctl-{rd.id}", f"#SBATCH --output={rd.log_file}",
             "#SBATCH --open-mode=append", f"#SBATCH --chdir={rd.path}"]
    if opts.partition:
        lines.append(f"#SBATCH --partition={opts.partition}")
    if opts.gres:
        lines.append(f"#SBATCH --gres={opts.gres}")
    if opts.time:
        lines.append(f"#SBATCH --time={opts.time}")
    lines += [f"#SBATCH {x}" for x in opts.extra]
    cmd = [sys.executable, "-m", "engine", "train", str(rd.path)] + (["--resume"] if resume else [])
    lines += ["export PYTHONUNBUFFERED=1", "exec " + " ".join(shlex.quote(c) for c in cmd)]
    return "\n".join(lines) + "\n"


def submit(store: JobStore, rd: RunDir, opts: SlurmOptions, resume: bool = False) -> str:
    path = rd.path / "slurm.sh"
    path.write_text(script(rd, opts, resume))
    path.chmod(0o700)
    slurm_id = _run(["sbatch", "--parsable", str(path)]).strip().split(";")[0]
    job_id = store.enqueue(rd.id, rd.path, gpus=rd.config().gpus, resume=resume, backend="slurm")
    store.update(job_id, slurm_id=slurm_id, state="queued", started=None)
    rd.append_event("slurm_submit", slurm_id=slurm_id, script=str(path))
    return slurm_id


def squeue_states(ids: list[str]) -> dict[str, str]:
    if not ids:
        return {}
    text = _run(["squeue", "-h", "-j", ",".join(ids), "-o", "%i %T"]) if ids else ""
    return dict(line.split()[:2] for line in text.splitlines() if line.strip())


def sync(store: JobStore) -> None:
    """Bring the states of Slurm jobs up to date (squeue for live ones; the run dir for ended ones)."""
    jobs = [j for j in store.jobs() if j.backend == "slurm" and j.state in ("queued", "running") and j.slurm_id]
    if not jobs:
        return
    try:
        live = squeue_states([j.slurm_id for j in jobs])
    except SlurmError:
        live = {}  # e.g. squeue answers "Invalid job id" once every job has left the queue
    for j in jobs:
        s = live.get(j.slurm_id)
        if s in SLURM_ACTIVE:
            if s == "RUNNING" and j.state != "running":
                store.update(j.id, state="running", started=time.time())
            continue
        st = RunDir(Path(j.run_dir)).status()
        state = st.get("state")
        if state in ("done", "diverged"):
            store.finish(j.id, state, None, st.get("error"))
        elif state == "stopped":
            store.finish(j.id, "cancelled" if j.cancel else "stopped", None)
        elif j.cancel:
            store.finish(j.id, "cancelled", None, "scancel")
        else:
            store.finish(j.id, "failed", None, st.get("error") or f"slurm job {j.slurm_id} ended ({s or 'gone'})")


def cancel(store: JobStore, run_id: str) -> str:
    job = store.get(run_id)
    if job is None or job.backend != "slurm":
        raise KeyError(run_id)
    if job.state not in ("queued", "running"):
        return job.state
    store.update(job.id, cancel=1)
    _run(["scancel", "--signal=TERM", "--full", job.slurm_id] if job.state == "running" else ["scancel", job.slurm_id])
    return "cancelling"
