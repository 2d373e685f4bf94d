"""The worker: keeps a machine's GPUs (or CPU slots) busy with queued jobs.

    serve():
      register; reconcile (jobs marked running on this host whose process is gone -> lost -> requeued)
      loop every `poll` seconds:
        reap        finished processes -> done / stopped / diverged / failed (exit code + log tail)
        cancel      jobs flagged for cancel -> SIGTERM (the run checkpoints and stops) -> cancelled
        launch      claim queued jobs for free slots: `python -m engine train RUN_DIR [--resume]`,
                    CUDA_VISIBLE_DEVICES set to its GPUs, output appended to the run's log.txt
      on SIGTERM: SIGTERM every job (each checkpoints and ends "stopped"), wait, requeue them to
                  resume, exit. A restarted worker picks them up where they stopped.

Jobs run in their own session, so a worker that dies leaves them running; a restarted worker
adopts those whose process is still alive and watches them by pid.
"""
from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from engine.store.jobs import Job, JobStore
from engine.fs import pid_alive
from engine.store.rundir import RunDir


def visible_gpus() -> list[str]:
    """GPU ids from CUDA_VISIBLE_DEVICES, else NVML / torch, else none."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip() and g.strip() != "-1"]
    try:
        import torch
        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - no torch / no driver: a CPU machine
        return []


def nvml_free_gib() -> dict[str, float] | None:
    """Free memory (GiB) of each GPU by index, through NVML (nvidia-ml-py); None without NVML."""
    try:
        import pynvml
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no library, no driver: nothing to plan with
        return None
    try:
        return {str(i): pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).free / 2**30
                for i in range(pynvml.nvmlDeviceGetCount())}
    finally:
        pynvml.nvmlShutdown()


def job_memory(job: Job) -> float:
    """GiB a job needs per GPU: its config's `gpu_memory`, else the peak its run recorded, else 0 (unknown)."""
    rd = RunDir(Path(job.run_dir))
    try:
        need = rd.config().gpu_memory
    except Exception:  # noqa: BLE001 - an unreadable config fails at launch, with its reason
        return 0.0
    if not need:
        peak = rd.status().get("gpu_peak_gib")
        need = float(peak) if isinstance(peak, (int, float)) else 0.0
    return need


def _transient(e: Exception) -> bool:
    """Errors that pass: a full disk or quota, a database locked or full (not a missing or damaged one)."""
    import errno
    if isinstance(e, sqlite3.OperationalError):
        text = str(e)
        return "locked" in text or "full" in text or "disk I/O error" in text
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def log_tail(rd: RunDir, lines: int = 20) -> str:
    try:
        with open(rd.log_file, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 8192))
            return "\n".join(f.read().decode(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


@dataclass
class Running:
    job: Job
    devices: list[str]
    proc: subprocess.Popen | None      # None: adopted from a previous worker (watched by pid)
    pid: int
    term_sent: float = 0.0
    stall_notified: bool = False
    events_at: int = 0                 # how far its events.jsonl has been read for twins it asks for
    snap_checked: float = 0.0          # when check_snaps last fitted it (monotonic)
    snap_said: bool = False            # its snap was announced (a `snap` event, a notification)


@dataclass
class Worker:
    root: Path
    gpus: list[str] = field(default_factory=list)
    jobs_per_gpu: int = 1
    cpu_slots: int = 1
    poll: float = 0.2
    idle_exit: float = 0.0             # seconds with nothing to do before exiting; 0 = never
    requeue_lost: bool = True
    free_memory: object = nvml_free_gib    # () -> {gpu: free GiB} | None; packing by memory when it answers

    def __post_init__(self):
        self.host = socket.gethostname()
        self.id = f"{self.host}:{os.getpid()}"
        self.store = JobStore(self.root)
        self.running: dict[int, Running] = {}
        self.stopping = False
        self._free_mem: dict[str, float] | None = None
        self.ghost = False                 # jobs.db was replaced under it (see store_is_ours)
        self.snap_pending: dict[str, list[float]] = {}   # ended, changed, not snapped yet: dir -> [ended, checked]

    # ------------------------------------------------------------------ slots
    def _gpu_load(self) -> dict[str, int]:
        load = {g: 0 for g in self.gpus}
        for r in self.running.values():
            for d in r.devices:
                load[d] = load.get(d, 0) + 1
        return load

    def _free_gpus(self) -> list[str]:
        return [g for g, n in self._gpu_load().items() if n < self.jobs_per_gpu]

    def _can_take(self) -> int | None:
        """-1: no room; None: a CPU slot is free; k: k GPUs are free."""
        if self.gpus:
            free = len(self._free_gpus())
            return free if free else -1
        return None if len(self.running) < self.cpu_slots else -1

    # ------------------------------------------------------------------ the loop
    def serve(self) -> None:
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)
        slots = f"gpus={','.join(self.gpus)}x{self.jobs_per_gpu}" if self.gpus else f"cpu={self.cpu_slots}"
        self.store.register_worker(self.id, self.host, os.getpid(), slots)
        self.reconcile()
        idle_since = time.monotonic()
        last_beat = 0.0
        try:
            while not self.stopping:
                if not self.store_is_ours():
                    break
                try:
                    self.fork_twins()
                    self.reap()
                    self.handle_cancels()
                    launched = self.fill()
                except (sqlite3.OperationalError, OSError) as e:
                    if not _transient(e):
                        raise
                    self._wait_out(e)     # a full disk, a lock held past the timeout: wait, say so, retry
                    continue
                self._trouble_since = None
                if self.running or launched:
                    idle_since = time.monotonic()
                elif self.idle_exit and time.monotonic() - idle_since > self.idle_exit:
                    break
                if time.monotonic() - last_beat > 5:
                    try:
                        self.store.heartbeat(self.id)
                    except sqlite3.OperationalError as e:
                        if not _transient(e):
                            raise
                        self._wait_out(e)
                    self.check_stalls()
                    self.check_snaps()
                    last_beat = time.monotonic()
                time.sleep(self.poll)
            if self.stopping:
                self.shutdown()
        finally:
            if not self.ghost:
                self.store.worker_stopped(self.id)

    _wal: tuple[int, int] | None = None   # jobs.db-wal's identity while this worker's connection lives
    wal_lost = False                        # it changed: exit without closing the connection (no checkpoint)
    _trouble_since: float | None = None
    _trouble_said = 0.0

    def _wait_out(self, e: Exception) -> None:
        """jobs.db or the home cannot be written for now: its jobs keep running (their records are
        in their run directories); the worker says so once a minute and tries again, backing off to 5 s."""
        now = time.monotonic()
        self._trouble_since = self._trouble_since or now
        if now - self._trouble_said >= 60:
            self._trouble_said = now
            print(f"warning: worker {self.id}: {self.store.path}: {e}; waiting and retrying "
                  f"(for {now - self._trouble_since:.0f} s; its {len(self.running)} running job(s) go on)",
                  file=sys.stderr, flush=True)
        time.sleep(min(5.0, 0.5 + (now - self._trouble_since) / 10))

    def _notify(self, rd: RunDir, state: str) -> None:
        from engine.control.notify import notify
        try:
            notify(rd, state)
        except Exception as e:  # noqa: BLE001 - a notification never stops the worker
            print(f"warning: notify for {rd.id}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)

    def check_stalls(self) -> None:
        """A running job with no new record for `stall_minutes` (settings.toml): notify once."""
        from engine.config import ConfigError
        from engine.control.notify import STALL_MINUTES, settings
        try:
            minutes = float(settings(self.root).get("stall_minutes", STALL_MINUTES))
        except ConfigError as e:
            print(f"warning: {e}", file=sys.stderr, flush=True)
            return
        if not minutes:
            return
        now = time.time()
        for r in self.running.values():
            rd = RunDir(Path(r.job.run_dir))
            try:
                last = max(rd.metrics_file.stat().st_mtime, r.job.started or 0.0)
            except OSError:
                continue
            if now - last > minutes * 60 and not r.stall_notified:
                r.stall_notified = True
                self._notify(rd, "stalled")
            elif now - last <= minutes * 60:
                r.stall_notified = False     # it recorded again: a later stall is news again

    snap_every = 60.0                  # seconds between snap fits of one running job
    snap_pending_s = 3600.0            # how long after its end a changed run is still looked at

    def check_snaps(self, ended: bool = False) -> None:
        """Each running job whose noise was changed: has it snapped onto its reference arm
        (engine.analysis.snap.announce, gpctl snap's measure)? Once it has, a `snap` event and a
        `snapped` notification, once. At most one fit per job per `snap_every` seconds, niced by
        being rare: it reads the run's and its reference's held-out curves.

        A changed run that ended without a snap (shorter than `snap_every`, or ended before its
        reference arm had trained: the demo runs its arms one after the other) stays pending for
        `snap_pending_s`: looked at again every `snap_every` and, with `ended`, at once, whenever a
        job of this worker ends (a reference that just completed its curve)."""
        now = time.monotonic()
        for r in list(self.running.values()):
            if r.snap_said or now - r.snap_checked < self.snap_every:
                continue
            r.snap_checked = now
            r.snap_said = self._snap_look(RunDir(Path(r.job.run_dir)))
        for path, when in list(self.snap_pending.items()):
            if now - when[0] > self.snap_pending_s:
                del self.snap_pending[path]
            elif ended or now - when[1] >= self.snap_every:
                when[1] = now
                if self._snap_look(RunDir(Path(path))):
                    del self.snap_pending[path]

    def _snap_look(self, rd: RunDir) -> bool:
        """One fit of `rd`; True once its snap has been said (now, with a notification, or before)."""
        from engine.analysis.snap import announce
        try:
            said = announce(rd)
        except Exception as e:  # noqa: BLE001 - a curve that cannot be fitted never stops the worker
            print(f"warning: worker {self.id}: snap of {rd.id}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            return False
        if said is not None:
            self._notify(rd, "snapped")
            return True
        return any(e.get("event") == "snap" for e in rd.events()[0][-50:])

    def _snap_after_end(self, ended: list[Running]) -> None:
        """Jobs just ended: each changed one not yet said joins the pending looks; then every pending
        run is looked at once (this job may have been the reference another was waiting for)."""
        from engine.analysis.curves import change_point
        now = time.monotonic()
        for r in ended:
            if r.snap_said:
                continue
            try:
                changed = change_point(RunDir(Path(r.job.run_dir))) is not None
            except (OSError, ValueError):
                changed = False
            if changed:
                self.snap_pending[r.job.run_dir] = [now, 0.0]
        self.check_snaps(ended=True)

    def store_is_ours(self) -> bool:
        """False (with one loud line) once jobs.db was deleted or replaced under this worker: it would
        serve a queue nobody else sees. Jobs it started keep running and recording in their run dirs."""
        try:
            st = os.stat(self.store.path)
            same = (st.st_dev, st.st_ino) == self.store.identity
        except OSError:
            same = False
        if not same:
            running = ", ".join(r.job.run_id for r in self.running.values()) or "none"
            print(f"error: {self.store.path} was deleted or replaced under worker {self.id}; it stops "
                  f"(jobs it started keep running: {running}; start a worker again to serve the new queue)",
                  file=sys.stderr, flush=True)
            self.ghost = True
            return False
        if self._wal is None:
            self._wal = self.store.wal_identity()
        elif self.store.wal_identity() != self._wal:
            running = ", ".join(r.job.run_id for r in self.running.values()) or "none"
            print(f"error: {self.store.path}-wal was deleted or replaced under worker {self.id}: the queue's "
                  "latest writes may be gone from it; the worker stops at once and writes nothing more "
                  f"(jobs it started keep running: {running}; check `gpctl queue`, then start a worker)",
                  file=sys.stderr, flush=True)
            self.ghost = self.wal_lost = True
            return False
        return True

    def _on_term(self, signum, frame) -> None:
        self.stopping = True

    def reconcile(self) -> None:
        """Jobs this host ran whose worker is gone: adopt live processes, requeue or mark the dead."""
        others = {w["id"] for w in live_workers(self.store, self.host)} - {self.id}
        for job in self.store.jobs(state="running"):
            if job.host != self.host or job.backend != "local" or job.worker in others:
                continue  # another machine's, Slurm's, or a live worker's (it may not have its pid yet)
            if job.worker != self.id and pid_alive(job.pid):
                devices = job.devices.split(",") if job.devices else []
                self.store.update(job.id, worker=self.id)
                self.running[job.id] = Running(job, devices, None, job.pid)
                continue
            rd = RunDir(Path(job.run_dir))
            st = rd.status()
            if st.get("state") in ("done", "diverged"):
                self.store.finish(job.id, st["state"], None, st.get("error"))
                continue
            why = f"its process (pid {job.pid or '?'} on {job.host}) was gone when a worker restarted"
            try:
                rd.append_event("lost", pid=job.pid, host=job.host, attempt=job.attempts, step=st.get("step"),
                                requeued=self.requeue_lost, reason=why)
                if st.get("state") == "running":
                    rd.write_status(state="lost", error=why)
            except OSError:
                pass   # a run directory we cannot write: the queue still records it
            if self.requeue_lost:
                self.store.requeue(job.id, resume=True, ended_as="lost", error=why)
            else:
                self.store.finish(job.id, "lost", None, why)
            self._notify(rd, "lost")

    def fill(self) -> int:
        launched = 0
        # with several jobs per GPU, place by free memory too (what NVML says now, less what this
        # round already handed out): a job is never started where it would not fit
        self._free_mem = self.free_memory() if self.gpus and self.jobs_per_gpu > 1 else None
        while not self.stopping:
            room = self._can_take()
            if room == -1:
                break
            job = self.store.claim(self.id, self.host, room, fits=self._fits if self._free_mem is not None else None)
            if job is None:
                break
            self.launch(job)
            launched += 1
        return launched

    def _devices_for(self, job: Job) -> list[str]:
        free = self._free_gpus()
        mem = getattr(self, "_free_mem", None)
        if mem is None:
            return free[: max(1, job.gpus)]
        need = job_memory(job)
        fit = sorted((g for g in free if mem.get(g, float("inf")) >= need), key=lambda g: -mem.get(g, 0.0))
        return fit[: max(1, job.gpus)]

    def _fits(self, job: Job) -> bool:
        return len(self._devices_for(job)) >= max(1, job.gpus)

    def launch(self, job: Job) -> None:
        rd = RunDir(Path(job.run_dir))
        devices = self._devices_for(job) if self.gpus else []
        if getattr(self, "_free_mem", None) is not None:
            need = job_memory(job)
            for d in devices:
                self._free_mem[d] = self._free_mem.get(d, 0.0) - need
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=",".join(devices), PYTHONUNBUFFERED="1")
        if len(devices) > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={len(devices)}",
                   "-m", "engine", "train", str(rd.path)]
        else:
            cmd = [sys.executable, "-m", "engine", "train", str(rd.path)]
        if job.resume:
            cmd.append("--resume")
        with open(rd.log_file, "ab") as log:
            log.write(f"[worker {self.id}] launch {' '.join(cmd)} devices={devices or 'cpu'}\n".encode())
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, start_new_session=True, cwd=str(rd.path))
        self.store.update(job.id, pid=proc.pid, devices=",".join(devices))
        self.running[job.id] = Running(job, devices, proc, proc.pid)

    def fork_twins(self, r: Running | None = None) -> None:
        """Fork and queue the twins the running jobs' acknowledgements name (engine.launch.twins):
        one stat per job per poll; only new events are read."""
        from engine.launch.twins import fork_owed, owed

        for r in [r] if r else list(self.running.values()):
            rd = RunDir(Path(r.job.run_dir))
            try:
                if rd.events_file.stat().st_size == r.events_at:
                    continue
            except OSError:
                continue
            events, at = rd.events(r.events_at)
            try:
                if owed(events):
                    fork_owed(self.store, rd, events)
            except (OSError, sqlite3.OperationalError) as e:   # a full disk: the next poll tries again
                print(f"warning: worker {self.id}: could not fork {rd.id}'s twin yet: {e}", file=sys.stderr, flush=True)
                continue
            except Exception as e:  # noqa: BLE001 - a bad event never stops the worker
                print(f"warning: worker {self.id}: {rd.id}'s twin: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            r.events_at = at

    def reap(self) -> None:
        ended: list[Running] = []
        try:
            for job_id, r in list(self.running.items()):
                if r.proc is not None:
                    code = r.proc.poll()
                    if code is None:
                        continue
                elif pid_alive(r.pid):
                    continue
                else:
                    code = None
                self.fork_twins(r)            # a twin asked for just before the job ended
                self._record_end(r, code)     # may raise (a full disk): the job stays ours, tried again
                del self.running[job_id]
                ended.append(r)
        finally:
            if ended:      # a last look at each changed run, and at those waiting for a reference
                self._snap_after_end(ended)

    def _record_end(self, r: Running, code: int | None) -> None:
        rd = RunDir(Path(r.job.run_dir))
        st = rd.status()
        state = st.get("state")
        cancel = self.store.get_id(r.job.id).cancel
        if state in ("done", "stopped"):
            self._keep_step_times(rd, st)
        if state == "done":
            self.store.finish(r.job.id, "done", code)
        elif state == "diverged":
            self.store.finish(r.job.id, "diverged", code, st.get("error"))
        elif cancel:
            self.store.finish(r.job.id, "cancelled", code, "cancelled by request")
        elif state == "stopped" and self.stopping:
            self.store.requeue(r.job.id, resume=True, ended_as="stopped", error="its worker was stopped")
        elif state == "stopped":
            self.store.finish(r.job.id, "stopped", code)
        else:
            why = st.get("error") or f"process exited with code {code}"
            job = self.store.get_id(r.job.id)
            if state not in ("failed",):   # it died without a record (killed): say so, and tell the user
                rd.write_status(state="failed", error=why, ended=time.time())
                self._notify(rd, "failed")
            if job.attempts <= job.retries:   # the retry policy: again from its last checkpoint
                rd.append_event("retry", attempt=job.attempts, of=job.retries + 1, error=why.splitlines()[0])
                self.store.requeue(r.job.id, resume=True, ended_as="failed",
                                   error=f"{why}\n--- log tail ---\n{log_tail(rd)}")
            else:
                self.store.finish(r.job.id, "failed", code, f"{why}\n--- log tail ---\n{log_tail(rd)}")

    def _keep_step_times(self, rd: RunDir, st: dict) -> None:
        """What the run measured per batch, kept for cost estimates and the queue's ETAs
        (engine/analysis/cost.py record_run); a failure here never touches the job's end."""
        try:
            from engine.analysis.cost import record_run
            record_run(self.root, rd.config(), rd.train_records(), st.get("device"), rd.id)
        except Exception as e:  # noqa: BLE001 - an estimate's input, never the job's outcome
            print(f"warning: worker {self.id}: could not keep the step times of {rd.id}: {type(e).__name__}: {e}",
                  file=sys.stderr, flush=True)

    def handle_cancels(self) -> None:
        for job in self.store.jobs(state="running", worker=self.id):
            r = self.running.get(job.id)
            if job.cancel and r and not r.term_sent:
                self._terminate(r)
            elif r and r.term_sent and time.time() - r.term_sent > 60:
                os.killpg(r.pid, signal.SIGKILL)  # it ignored SIGTERM for a minute

    def _terminate(self, r: Running) -> None:
        r.term_sent = time.time()
        try:
            os.killpg(r.pid, signal.SIGTERM)   # its own session: torchrun and its ranks too
        except ProcessLookupError:
            pass

    def shutdown(self, timeout: float = 120.0) -> None:
        """SIGTERM: every job checkpoints and stops; they are requeued to resume."""
        for r in self.running.values():
            self._terminate(r)
        deadline = time.monotonic() + timeout
        while self.running and time.monotonic() < deadline:
            self.reap()
            time.sleep(self.poll)
        for r in self.running.values():  # still there: kill, and let reconcile requeue them
            os.killpg(r.pid, signal.SIGKILL)
            self.store.requeue(r.job.id, resume=True, ended_as="stopped", error="killed: it ignored SIGTERM")


def live_workers(store: JobStore, host: str | None = None) -> list[dict]:
    host = host or socket.gethostname()
    return [w for w in store.workers() if w["host"] == host and not w["stopped"] and pid_alive(w["pid"])]
