"""The Slurm backend: each run is one `sbatch` job that runs `python -m engine train RUN_DIR`.

The run directory on the shared filesystem stays the meeting point: the job writes its records,
status and checkpoints there; control files, `gpctl ls/show/tv` and the TUI work as for local
jobs. jobs.db keeps the Slurm job id; `sync()` maps squeue (and sacct, when accounting is on)
back to gpctl's states. scancel sends SIGTERM first, so a cancelled run checkpoints and stops.
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from engine.config import ConfigError
from engine.store.jobs import JobStore
from engine.store.rundir import RunDir, write_atomic

SLURM_ACTIVE = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING",
                "REQUEUE_FED", "REQUEUE_HOLD", "SIGNALING", "STAGE_OUT", "STOPPED")   # a requeue passes through some


class SlurmError(RuntimeError):
    """sbatch/squeue/scancel missing or refusing; str(e) is the line to print."""


@dataclass
class SlurmOptions:
    partition: str = ""
    gres: str = ""          # e.g. gpu:1
    time: str = ""          # e.g. 04:00:00
    extra: tuple[str, ...] = ()
    warn: int = 120         # seconds before the time limit: USR1 -> checkpoint, stop, requeue (0: off)
    array_limit: int = 0    # --array: at most this many tasks at once (0: no cap)

    def __post_init__(self):
        """Every value goes into a `#SBATCH` line of a script bash runs: checked here, before any run
        is created, so a newline can never add a line (or a command) to it."""
        for option, value, pattern in (("--partition", self.partition, r"[A-Za-z0-9_.,-]*"),
                                       ("--gres", self.gres, r"[A-Za-z0-9_:.,=/-]*"),
                                       ("--time", self.time, r"[A-Za-z0-9:-]*")):
            if not re.fullmatch(pattern, value):
                raise ConfigError(f"slurm {option} {value[:60]!r}: only letters, digits and {_marks(pattern)} may "
                                  "go in an #SBATCH line")
        for x in self.extra:
            if _control_char(x):
                raise ConfigError(f"slurm option {x[:60]!r}: a control character (a newline) cannot go in an #SBATCH line")
        if not (isinstance(self.warn, int) and 0 <= self.warn <= 86400):
            raise ConfigError(f"slurm --signal-before must be seconds in [0, 86400], got {self.warn}")


def _marks(pattern: str) -> str:
    return " ".join(pattern[pattern.index("9") + 1:pattern.index("]")].replace("\\", ""))


def _control_char(text: str) -> bool:
    return any(ord(c) < 32 or ord(c) == 127 for c in text)


def directive_path(path: Path) -> str:
    """A folder for `#SBATCH --chdir=`: refused with a control character, quoted with a space
    (sbatch reads quoted directive values)."""
    text = str(path)
    if _control_char(text) or '"' in text:
        raise ConfigError(f"{text[:80]!r}: a home path with a newline, control character or '\"' cannot be "
                          "given to Slurm (#SBATCH --chdir); use another folder")
    return f'"{text}"' if any(c.isspace() for c in text) else text


def _run(cmd: list[str]) -> str:
    if shutil.which(cmd[0]) is None:
        raise SlurmError(f"{cmd[0]} not found: is Slurm installed and on PATH?")
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SlurmError(f"{' '.join(cmd[:2])} failed: {(res.stderr or res.stdout).strip().splitlines()[-1:]}")
    return res.stdout


# The job's body. Before the time limit (or on preemption's SIGTERM) the run checkpoints and stops;
# on the warning signal the script then requeues the job, which resumes from that checkpoint (the
# job keeps its id; SLURM_RESTART_COUNT counts the restarts). A run that ended done is not requeued.
# Slurm starts a requeued job once its credential lifetime has passed (slurm.conf AuthInfo
# cred_expire, default 120 s).
BODY = """requeue=0
trap 'requeue=1; echo "[gpctl] slurm job $SLURM_JOB_ID: time limit near, checkpointing"; kill -TERM "$child" 2>/dev/null' USR1
export PYTHONUNBUFFERED=1
RUN_DIR={run_dir}
exec >> "$RUN_DIR/log.txt" 2>&1
cd "$RUN_DIR"
RESUME={resume}
if [ "${{SLURM_RESTART_COUNT:-0}}" -gt 0 ]; then RESUME=--resume; fi
{prelude}{launch} "$RUN_DIR" $RESUME &
child=$!
while :; do wait "$child"; code=$?; kill -0 "$child" 2>/dev/null || break; done
if [ "$requeue" = 1 ] && ! grep -q '"state": "done"' "$RUN_DIR/status.json"; then
  echo "[gpctl] slurm job $SLURM_JOB_ID: requeued to resume from its checkpoint (restart $(( ${{SLURM_RESTART_COUNT:-0}} + 1 )))"
  scontrol requeue "$SLURM_JOB_ID"
fi
exit $code
"""


def _header(name: str, opts: SlurmOptions, chdir: Path, nodes: int = 1) -> list[str]:
    lines = ["#!/bin/bash", f"#SBATCH --job-name={name}", "#SBATCH --output=/dev/null", f"#SBATCH --chdir={directive_path(chdir)}"]
    if nodes > 1:        # one launcher (torchrun) per node; it starts that node's `gpus` ranks
        lines += [f"#SBATCH --nodes={nodes}", "#SBATCH --ntasks-per-node=1"]
    if opts.partition:
        lines.append(f"#SBATCH --partition={opts.partition}")
    if opts.gres:
        lines.append(f"#SBATCH --gres={opts.gres}")
    if opts.time:
        lines.append(f"#SBATCH --time={opts.time}")
    if opts.warn:
        lines += [f"#SBATCH --signal=B:USR1@{opts.warn}", "#SBATCH --requeue"]
    return lines + [f"#SBATCH {x}" for x in opts.extra]


# A job over several nodes: its first node (Slurm's node list, expanded) hosts torchrun's c10d
# rendezvous, on a port taken from the job id so two jobs sharing a node do not collide.
RENDEZVOUS = """GPCTL_HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
GPCTL_PORT=$(( 20000 + ${SLURM_JOB_ID:-0} % 20000 ))
"""


def launcher(gpus: int, nodes: int = 1) -> str:
    """The command that trains a run directory in the job: one process; for `gpus = N > 1` N ranks
    under torchrun on the job's node (DDP; rank 0 alone writes), as a local worker launches them; for
    `nodes = M > 1` one torchrun per node under srun, M × N ranks meeting at the first node."""
    python = shlex.quote(sys.executable)
    if nodes > 1:
        return (f"srun --nodes={nodes} --ntasks-per-node=1 --kill-on-bad-exit=1 {python} -m torch.distributed.run "
                f"--nnodes={nodes} --nproc_per_node={gpus} --rdzv_backend=c10d "
                f'--rdzv_endpoint="$GPCTL_HEAD:$GPCTL_PORT" --rdzv_id="$SLURM_JOB_ID" -m engine train')
    if gpus > 1:
        return f"{python} -m torch.distributed.run --standalone --nproc_per_node={gpus} -m engine train"
    return f"{python} -m engine train"


def check_gres(opts: SlurmOptions, gpus: int, what: str) -> None:
    """A `--gres gpu[:type]:N` that asks for another number of GPUs than the run trains on is refused:
    N ranks on fewer GPUs share them, and GPUs beyond the ranks sit idle."""
    n = None
    for item in filter(None, opts.gres.split(",")):        # gpu, gpu:2, gpu:a100:2 (a type never starts with a digit)
        m = re.fullmatch(r"gpu(?::[A-Za-z_][A-Za-z0-9_.-]*)?(?::(\d+))?", item)
        if m:
            n = int(m.group(1)) if m.group(1) else 1
    if n is not None and n != gpus:
        raise ConfigError(f"slurm --gres {opts.gres} asks for {n} GPU(s), but {what} trains on gpus = {gpus} "
                          f"(give --gres gpu:{gpus}, or --set gpus={n})")


def script(rd: RunDir, opts: SlurmOptions, resume: bool) -> str:
    directive_path(rd.path)          # first: a path no #SBATCH line can hold is refused before anything is read
    cfg = rd.config()
    head = _header(f"gpctl-{rd.id}", opts, rd.path, cfg.nodes)
    check_gres(opts, cfg.gpus, rd.id)
    body = BODY.format(run_dir=shlex.quote(str(rd.path)), resume="--resume" if resume else '""',
                       prelude=RENDEZVOUS if cfg.nodes > 1 else "", launch=launcher(cfg.gpus, cfg.nodes))
    return "\n".join(head) + "\n" + body


def array_script(rds: list[RunDir], opts: SlurmOptions, resume: bool, where: Path) -> str:
    """One Slurm job array for several runs: task i trains the i-th run directory. Its tasks share one
    header, so its runs must ask for the same number of GPUs."""
    shapes = {(rd.config().gpus, rd.config().nodes) for rd in rds}
    if len(shapes) > 1:
        raise ConfigError(f"a Slurm array's runs share one job script, but they ask for (gpus, nodes) = "
                          f"{', '.join(map(str, sorted(shapes)))}; submit them without --array, or with one shape")
    gpus, nodes = shapes.pop()
    check_gres(opts, gpus, f"{rds[0].id} (and its array)")
    limit = f"%{opts.array_limit}" if opts.array_limit else ""
    head = _header(f"gpctl-array-{rds[0].id}", opts, where, nodes) + [f"#SBATCH --array=0-{len(rds) - 1}{limit}"]
    dirs = " ".join(shlex.quote(str(rd.path)) for rd in rds)
    body = BODY.format(run_dir='"${DIRS[$SLURM_ARRAY_TASK_ID]}"', resume="--resume" if resume else '""',
                       prelude=RENDEZVOUS if nodes > 1 else "", launch=launcher(gpus, nodes))
    return "\n".join(head) + f"\nDIRS=({dirs})\n" + body


def _dependency(store: JobStore, after: list[str]) -> list[str]:
    """`--after` as Slurm's --dependency=afterok: on the Slurm ids of those runs (all must be Slurm jobs)."""
    ids = []
    for run_id in after:
        job = store.get(run_id)
        if job is None or job.backend != "slurm" or not job.slurm_id:
            raise SlurmError(f"--after {run_id}: not a Slurm job of this home; a Slurm job can wait only on Slurm jobs")
        ids.append(job.slurm_id)
    return [f"--dependency=afterok:{':'.join(ids)}", "--kill-on-invalid-dep=yes"] if ids else []


def keep_options(rd: RunDir, opts: SlurmOptions) -> None:
    """The options a run was submitted with, kept in its folder: its twins are submitted with them."""
    write_atomic(rd.path / "slurm.json", json.dumps(asdict(opts)))


def options_of(rd: RunDir) -> SlurmOptions:
    """The Slurm options `rd` was submitted with (defaults when it kept none)."""
    try:
        data = json.loads((rd.path / "slurm.json").read_text())
        fields = {f: data[f] for f in SlurmOptions.__dataclass_fields__ if f in data}
        fields["extra"] = tuple(fields.get("extra", ()))
        return SlurmOptions(**fields)
    except (OSError, ValueError, TypeError):
        return SlurmOptions()


def submit(store: JobStore, rd: RunDir, opts: SlurmOptions, resume: bool = False, after: list[str] = (),
           priority: int = 0) -> str:
    keep_options(rd, opts)
    path = rd.path / "slurm.sh"
    path.write_text(script(rd, opts, resume))
    path.chmod(0o700)
    slurm_id = _run(["sbatch", "--parsable", *_dependency(store, list(after)), str(path)]).strip().split(";")[0]
    cfg = rd.config()
    job_id = store.enqueue(rd.id, rd.path, gpus=cfg.gpus, resume=resume, backend="slurm", group=cfg.group,
                           after=after, priority=priority)
    store.update(job_id, slurm_id=slurm_id, state="queued", started=None)
    rd.append_event("slurm_submit", slurm_id=slurm_id, script=str(path))
    return slurm_id


def submit_array(store: JobStore, rds: list[RunDir], opts: SlurmOptions, home: Path, resume: bool = False,
                 after: list[str] = (), priority: int = 0) -> list[str]:
    """The runs as one Slurm job array (one entry in squeue; `array_limit` caps how many run at once);
    returns each run's Slurm id, `ARRAYID_TASK`."""
    path = home / "slurm" / f"array-{rds[0].id}-{len(rds)}.sh"
    path.parent.mkdir(mode=0o700, exist_ok=True)
    path.write_text(array_script(rds, opts, resume, home))
    path.chmod(0o700)
    array_id = _run(["sbatch", "--parsable", *_dependency(store, list(after)), str(path)]).strip().split(";")[0]
    ids = []
    for i, rd in enumerate(rds):
        keep_options(rd, opts)
        cfg = rd.config()
        job_id = store.enqueue(rd.id, rd.path, gpus=cfg.gpus, resume=resume, backend="slurm", group=cfg.group,
                               after=after, priority=priority)
        store.update(job_id, slurm_id=f"{array_id}_{i}", state="queued", started=None)
        rd.append_event("slurm_submit", slurm_id=f"{array_id}_{i}", script=str(path), array=array_id, task=i)
        ids.append(f"{array_id}_{i}")
    return ids


def squeue_states(ids: list[str]) -> dict[str, str]:
    if not ids:
        return {}
    jobs = sorted({i.split("_")[0] for i in ids})        # array tasks are asked for by their array's id
    text = _run(["squeue", "-h", "-r", "-j", ",".join(jobs), "-o", "%i %T"]) if ids else ""
    return dict(line.split()[:2] for line in text.splitlines() if line.strip())


def sync(store: JobStore) -> None:
    """Bring the states of Slurm jobs up to date (squeue for live ones; the run dir for ended ones)."""
    jobs = [j for j in store.jobs() if j.backend == "slurm" and j.state in ("queued", "running") and j.slurm_id]
    if not jobs:
        return
    try:
        live = squeue_states([j.slurm_id for j in jobs])
    except SlurmError as e:
        if "Invalid job id" not in str(e):
            return   # squeue could not answer (slurmctld busy, a timeout): decide nothing; the next sync will
        live = {}  # squeue answers "Invalid job id" once every job has left the queue
    for j in jobs:
        s = live.get(j.slurm_id)
        _twins(store, j)
        if s in SLURM_ACTIVE:
            if s == "RUNNING" and j.state != "running":
                store.update(j.id, state="running", started=time.time())
            restarts = RunDir(Path(j.run_dir)).status().get("slurm_restarts")
            if isinstance(restarts, int) and restarts + 1 > j.attempts:   # requeued (time limit, preemption)
                store.update(j.id, attempts=restarts + 1)
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


def _twins(store: JobStore, job) -> None:
    """The twins a Slurm job's acknowledgements name, forked and submitted here, on the login node
    (the job itself writes only its run directory; see engine.launch.twins)."""
    from engine.launch.twins import fork_owed
    try:
        fork_owed(store, RunDir(Path(job.run_dir)))
    except (OSError, SlurmError, ConfigError) as e:    # the next sync tries again
        print(f"warning: {job.run_id}: its twin is not submitted yet: {e}", file=sys.stderr)


def cancel(store: JobStore, run_id: str) -> str:
    job = store.get(run_id)
    if job is None or job.backend != "slurm":
        raise KeyError(run_id)
    if job.state not in ("queued", "running"):
        return job.state
    store.update(job.id, cancel=1)
    _run(["scancel", "--signal=TERM", "--full", job.slurm_id] if job.state == "running" else ["scancel", job.slurm_id])
    return "cancelling"
