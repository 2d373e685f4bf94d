"""The queue's faces: enqueue-and-serve, wait with progress, worker, cancel, logs."""
from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from engine.launch import backends, slurm
from engine.config import ConfigError
from engine.store.jobs import JobStore
from engine.store.state import TERMINAL
from engine.store.rundir import RunDir, UnknownRun, resolve
from engine.launch.worker import Worker, live_workers, visible_gpus
from gpctl.common import MAX_PRIORITY, RunArg, State, check_int, err, friendly, out, parse_gpus, plain_table, print_json

def enqueue(rds: list[RunDir], resume: bool = False, priority: int = 0, after: list[str] = (),
            retries: int = 0, home: Path | None = None) -> None:
    store = JobStore(home or State.home)
    try:
        backends.BACKENDS["local"].submit(store, rds, resume, after, priority, retries)
    finally:
        store.close()


def resolve_after(items: list[str]) -> list[str]:
    """Run ids for `--after RUN|GROUP`: a run id (or unique prefix), or a group (every run in it)."""
    if not items:
        return []
    store = JobStore.for_reading(State.home)
    try:
        out = []
        for item in items:
            group = store.group_runs(item)
            if group:
                out += group
                continue
            rd = resolve(State.home, item)
            if store.get(rd.id) is None:
                raise UnknownRun(f"--after {item}: run {rd.id} is not in the queue, so it will never end `done` "
                                 f"(gpctl resume {rd.id} queues it)")
            out.append(rd.id)
        return list(dict.fromkeys(out))
    finally:
        store.close()


def submit_slurm(rds: list[RunDir], opts: slurm.SlurmOptions, resume: bool = False, array: bool = False,
                 after: list[str] = (), priority: int = 0) -> list[str]:
    store = JobStore(State.home)
    try:
        return backends.BACKENDS["slurm"].submit(store, rds, resume, after, priority, opts=opts, array=array,
                                                 home=State.home)
    finally:
        store.close()


def sync(store: JobStore) -> None:
    """Slurm jobs' states from squeue and their run dirs (local workers keep theirs current)."""
    try:
        backends.sync(store)
    except slurm.SlurmError as e:
        err.print(f"warning: {e}", markup=False)


def ensure_worker(idle_exit: float | None = None, cpu_slots: int = 1, home: Path | None = None) -> bool:
    """Start a detached local worker unless one serves this home on this host; True if started.

    It exits after `idle_exit` seconds with nothing to do ($GPCTL_WORKER_IDLE_EXIT, default 60);
    on a machine without GPUs it runs `cpu_slots` jobs at once. `home`: the CLI's --home by default
    (the TUI passes its own).
    """
    home = home or State.home
    if idle_exit is None:
        idle_exit = float(os.environ.get("GPCTL_WORKER_IDLE_EXIT", "60"))
    store = JobStore(home)
    try:
        if live_workers(store):
            return False
    finally:
        store.close()
    # the host's worker lock is taken here and handed to the worker it starts: a second `gpctl run`
    # during the worker's start-up (seconds: it imports torch) finds it held and starts none
    fd = os.open(worker_lock(home), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False          # a worker holds it: running, or starting
        with open(home / "worker.log", "ab") as log:
            subprocess.Popen([sys.executable, "-m", "gpctl", "--home", str(home), "worker", "--exclusive",
                              "--idle-exit", str(idle_exit), "--cpu-slots", str(cpu_slots)], stdout=log,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                             pass_fds=(fd,), env=dict(os.environ, GPCTL_WORKER_LOCK_FD=str(fd)))
    finally:
        os.close(fd)   # the worker's copy of it keeps the lock (flock belongs to the open file)
    return True


def worker_lock(home: Path) -> Path:
    return home / f"worker.{socket.gethostname()}.lock"


def _take_worker_lock(home: Path):
    """The host's worker lock for `worker --exclusive`, or None when another worker holds it. A
    worker started by ensure_worker is handed the lock already taken ($GPCTL_WORKER_LOCK_FD)."""
    given = os.environ.pop("GPCTL_WORKER_LOCK_FD", None)
    if given is not None and given.isdigit():
        try:
            lock = os.fdopen(int(given), "a")
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)   # ours already: the same open file
            return lock
        except OSError:
            pass          # not a descriptor of ours (a stale variable): take it the usual way
    lock = open(worker_lock(home), "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        return None
    return lock


def wait_for(rds: list[RunDir], poll: float = 0.5) -> list[str]:
    """Block with one progress bar per run until every job ends; returns the jobs' final states."""
    store = JobStore(State.home)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[state]} last loss {task.fields[loss]} {task.fields[rate]}"),
               TimeElapsedColumn(), TextColumn("{task.fields[eta]}"))
    try:
        states = _watch(store, rds, columns, poll)
    except KeyboardInterrupt:
        left = [rd.id for rd in rds if (j := store.get(rd.id)) is None or j.state not in TERMINAL]
        err.print(f"stopped waiting; {len(left)} run(s) go on in the queue: follow them with `gpctl ls`, "
                  f"`gpctl tui` or `gpctl logs -f {left[0] if left else 'RUN'}`", markup=False)
        raise typer.Exit(130) from None
    finally:
        store.close()
    return [states[rd.id] for rd in rds]


def _watch(store: JobStore, rds: list[RunDir], columns, poll: float) -> dict[str, str]:
    with Progress(*columns, console=out) as progress:
        tasks = {rd.id: progress.add_task(rd.id, total=rd.config().steps, state="queued", loss="-", rate="", eta="")
                 for rd in rds}
        while True:
            sync(store)
            states = {}
            for rd in rds:
                job = store.get(rd.id)
                st = rd.status()
                states[rd.id] = job.state if job else st.get("state", "?")
                loss = st.get("loss")
                rate, eta = progress_words(st, rd.config().steps) if states[rd.id] == "running" else ("", "")
                if states[rd.id] == "queued" and job is not None:
                    rate = f"({why_queued(store, job)})"
                progress.update(tasks[rd.id], completed=st.get("step", 0), state=states[rd.id],
                                loss=f"{loss:.4f}" if loss is not None else "-", rate=rate, eta=eta)
            if all(s in TERMINAL for s in states.values()):
                return states
            time.sleep(poll)


def progress_words(status: dict, steps: int) -> tuple[str, str]:
    """'12.3 steps/s' and 'ETA 4m05s' from a running run's status.json (steps since its process began
    over the time since); empty before the first steps."""
    step, started, updated = status.get("step") or 0, status.get("started"), status.get("updated")
    first = status.get("start_step") or 0          # a resumed run: count only this process's steps
    if not (started and updated and updated > started and step > first):
        return "", ""
    rate = (step - first) / (updated - started)
    left = max(0, steps - step) / rate
    return f"{rate:.3g} steps/s", f"ETA {int(left // 60)}m{int(left % 60):02d}s"


def why_queued(store: JobStore, job) -> str:
    """Why a queued job has not started: the runs it waits for, no worker, or every slot busy."""
    pending = [d for d in job.deps if (j := store.get(d)) is None or j.state != "done"]
    if pending:
        return f"waits for {', '.join(pending[:2])}{' and more' if len(pending) > 2 else ''}"
    if job.backend == "slurm":
        return "waits for Slurm to start it"
    workers = live_workers(store)
    if not workers:
        return "no worker is running: gpctl worker"
    running = [j for j in store.jobs() if j.state == "running" and j.backend != "slurm"]
    if running:
        return f"every slot is busy: {len(running)} running ({running[0].run_id}{', ...' if len(running) > 1 else ''})"
    return "starting"


@friendly
def worker(gpus: Annotated[Optional[str], typer.Option("--gpus", help="GPU ids, e.g. 0,1 (default: all visible).")] = None,
           jobs_per_gpu: Annotated[int, typer.Option("--jobs-per-gpu", help="Jobs sharing one GPU (small runs pack several per GPU).")] = 1,
           cpu_slots: Annotated[int, typer.Option("--cpu-slots", help="Concurrent jobs on a machine without GPUs.")] = 1,
           idle_exit: Annotated[float, typer.Option("--idle-exit", help="Exit after this many idle seconds (0: never).")] = 0.0,
           no_requeue: Annotated[bool, typer.Option("--no-requeue", help="Leave lost jobs lost instead of resuming them.")] = False,
           exclusive: Annotated[bool, typer.Option("--exclusive", help="Exit if another worker already serves this home on this host.")] = False,
           status: Annotated[bool, typer.Option("--status", help="Show the workers and their jobs, then exit.")] = False) -> None:
    """Serve the queue: run queued jobs on this machine's GPUs (or CPU), survive crashes."""
    check_int("--cpu-slots", cpu_slots, 1, 1024)
    check_int("--jobs-per-gpu", jobs_per_gpu, 1, 64)
    if not 0 <= idle_exit < float("inf"):
        raise ConfigError(f"--idle-exit must be seconds >= 0 (0: never), got {idle_exit}")
    gpu_ids = parse_gpus(gpus)
    if status:
        show_workers()
        return
    if exclusive:
        lock = _take_worker_lock(State.home)   # held until the process exits
        if lock is None:
            out.print("another worker serves this home on this host")
            return
    ids = gpu_ids if gpu_ids is not None else visible_gpus()
    w = Worker(State.home, gpus=ids, jobs_per_gpu=jobs_per_gpu, cpu_slots=cpu_slots, idle_exit=idle_exit,
               requeue_lost=not no_requeue)
    out.print(f"worker {w.id} serving {State.home} on {'GPUs ' + ','.join(ids) if ids else f'{cpu_slots} CPU slot(s)'}")
    if ids:
        from engine.train.mps import mps_line
        if line := mps_line(jobs_per_gpu):
            out.print(line, markup=False, highlight=False)
    w.serve()
    if w.wal_lost:      # closing the connection would checkpoint a WAL nobody else reads into jobs.db
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    if w.ghost:
        raise typer.Exit(1)


def show_workers() -> None:
    store = JobStore.for_reading(State.home)
    t = Table(title="workers")
    for col in ("worker", "slots", "alive", "heartbeat", "jobs"):
        t.add_column(col)
    from engine.fs import pid_alive
    for w in store.workers():
        jobs = [j.run_id for j in store.jobs(state="running", worker=w["id"])]
        alive = "yes" if not w["stopped"] and w["host"] == socket.gethostname() and pid_alive(w["pid"]) else "no"
        t.add_row(w["id"], w["slots"], alive, f"{time.time() - w['heartbeat']:.0f}s ago", ", ".join(jobs) or "-")
    out.print(t)
    store.close()


@friendly
def cancel(runs: Annotated[list[str], typer.Argument(help="Runs to cancel.")],
           wait: Annotated[bool, typer.Option("--wait", help="Wait until running ones have stopped.")] = False,
           timeout: Annotated[float, typer.Option("--timeout", help="With --wait: give up waiting after this many seconds (the jobs still stop).")] = 120.0) -> None:
    """Cancel queued or running jobs (a running one checkpoints and stops)."""
    store = JobStore(State.home)
    rds = [resolve(State.home, r) for r in runs]
    for rd in rds:
        job = store.get(rd.id)
        if job is None:
            raise UnknownRun(f"run {rd.id} is not in the queue ({State.home / 'jobs.db'})")
        state = backends.cancel(store, rd.id)
        out.print(f"{rd.id}: {state}")
    if wait:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            sync(store)
            if all(store.get(rd.id).state in TERMINAL for rd in rds):
                break
            time.sleep(0.2)
        for rd in rds:
            out.print(f"{rd.id}: {store.get(rd.id).state}")
    store.close()


@friendly
def logs(run: RunArg, follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing until the job ends.")] = False) -> None:
    """Print a run's log.txt (its process's own output)."""
    rd = resolve(State.home, run)
    store = JobStore.for_reading(State.home)
    pos = 0
    while True:
        chunk, pos = backends.backend_of(store.get(rd.id)).logs(rd, pos)
        if chunk:
            sys.stdout.write(chunk.decode(errors="replace"))
            sys.stdout.flush()
        job = store.get(rd.id)
        if not follow or job is None or job.state in TERMINAL:
            break
        time.sleep(0.5)
    store.close()


queue_app = typer.Typer(help="The queue: its order, priorities and waits; move a job.",
                        context_settings={"help_option_names": ["-h", "--help"]},
                        epilog="Example: gpctl queue; gpctl queue move demo-bs512 --first")


@queue_app.callback(invoke_without_command=True)
@friendly
def show_queue(ctx: typer.Context,
               as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """Queued and running jobs in the order workers take them: priority, group, what each waits on,
    attempts, and the worker and devices of running ones."""
    if ctx.invoked_subcommand:
        return
    store = JobStore.for_reading(State.home)
    if store.writable:
        sync(store)
    rows = queue_rows(store)
    store.close()
    if as_json:
        print_json(rows)
        return
    print(queue_text(rows))


def queue_rows(store: JobStore) -> list[dict]:
    """Running jobs, then queued ones in the order workers take them (`gpctl queue`, the TUI's Q)."""
    running = [j for j in store.jobs(state="running")]
    queued = sorted(store.jobs(state="queued"), key=lambda j: (-j.priority, j.id))
    rows = []
    for pos, j in enumerate(running + queued):
        waits = store.waiting_on(j) if j.state == "queued" else []
        rows.append({"pos": pos + 1 if j.state == "queued" else None, "id": j.run_id, "state": j.state,
                     "priority": j.priority, "group": j.grp, "waiting_on": waits,
                     "attempts": j.attempts, "retries": j.retries, "backend": j.backend,
                     "where": (f"slurm {j.slurm_id}" if j.backend == "slurm" else
                               f"{j.worker or '-'} {j.devices or 'cpu'}") if j.state == "running" else "",
                     "since": j.started if j.state == "running" else j.created,
                     **_eta(store.path.parent, j)})
    return rows


def _eta(home: Path, job) -> dict:
    """{"eta": seconds or None, "eta_from": where the step times come from}: a running job's time left
    from its own steps per second (as --wait's bars), else from step times the home has cached (what
    earlier runs of the same model and batch recorded, or a `presets check --cost` probe), never a new
    probe; a queued job's whole time likewise; None where no step time is known."""
    from engine.analysis.cost import device_kind, estimate
    rd = RunDir(Path(job.run_dir))
    try:
        cfg = rd.config()
        st = rd.status()
    except Exception:  # noqa: BLE001 - an unreadable run: no estimate, `ls` says why
        return {"eta": None, "eta_from": None}
    if job.state == "running":
        rate = _own_rate(st)
        if rate:
            return {"eta": max(0.0, (cfg.steps - (st.get("step") or 0)) / rate), "eta_from": "its own steps/s"}
        left = cfg.steps - (st.get("step") or 0)
        devs = [device_kind(st.get("device") or ("cuda" if job.devices else "cpu"))]
    else:
        left = None
        devs = ["cpu"] if cfg.device == "cpu" else ["cuda", "cpu"]
    for dev in devs:
        got = estimate(cfg, home, dev, left)
        if got:
            return {"eta": got[0], "eta_from": got[1]}
    return {"eta": None, "eta_from": None}


def _own_rate(st: dict) -> float | None:
    """Steps per second of a running run since its process began (status.json), as progress_words."""
    try:
        start_step, started, now_step, at = (st.get("start_step") or 0, st.get("started"), st.get("step") or 0,
                                             st.get("updated") or time.time())
        if started and now_step > start_step and at > started:
            return (now_step - start_step) / (at - started)
    except TypeError:
        pass
    return None


def queue_text(rows: list[dict]) -> str:
    if not rows:
        return "the queue is empty (gpctl ls shows every run)"
    now = time.time()
    cells = [[str(r["pos"] or "-"), r["id"], r["state"], str(r["priority"]), r["group"] or "-",
              ", ".join(r["waiting_on"]) or "-", f"{r['attempts']}/{r['retries'] + 1}", r["where"] or "-",
              f"{(now - (r['since'] or now)) / 60:.1f} min", _eta_text(r)] for r in rows]
    text = plain_table(("#", "id", "state", "priority", "group", "waiting on", "attempt", "where", "for", "est. time"),
                       cells, left=3)
    sources = sorted({r["eta_from"] for r in rows if r.get("eta_from")})
    if sources:
        text += "\nest. time: left for a running job, the whole run for a queued one, from " + "; ".join(sources)
    if any(r.get("eta") is None for r in rows):
        text += ("\n?: no step time known for that model and batch yet (gpctl presets check NAME --cost measures "
                 "one; a finished run keeps its own)")
    return text


def _eta_text(r: dict) -> str:
    eta = r.get("eta")
    if eta is None:
        return "?"
    h, rest = divmod(int(round(eta)), 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


@queue_app.command("move", epilog="Example: gpctl queue move demo-bs512 --first")
@friendly
def move(run: RunArg,
         first: Annotated[bool, typer.Option("--first", help="Above every other queued job.")] = False,
         priority: Annotated[Optional[int], typer.Option("--priority", help="This priority (higher runs first; default 0).")] = None) -> None:
    """Reorder the queue: give a queued job a priority, or put it first."""
    if first == (priority is not None):
        raise UnknownRun("give one of --first or --priority N")
    check_int("--priority", priority, -MAX_PRIORITY, MAX_PRIORITY)
    rd = resolve(State.home, run)
    store = JobStore(State.home)
    try:
        new = store.move(rd.id, priority, first)
    except KeyError:
        raise UnknownRun(f"run {rd.id} is not in the queue ({State.home / 'jobs.db'})") from None
    except ValueError as e:
        raise UnknownRun(str(e)) from None
    finally:
        store.close()
    out.print(f"{rd.id}: priority {new}", markup=False)


def register(app: typer.Typer) -> None:
    app.command()(worker)
    app.command()(cancel)
    app.command()(logs)
    app.add_typer(queue_app, name="queue", rich_help_panel="Queue")
