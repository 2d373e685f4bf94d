"""The job store: `$GPCTL_HOME/jobs.db`, SQLite in WAL mode — the queue and registry of runs.

Every change is one transaction; a claim is `BEGIN IMMEDIATE` + select + update, so concurrent
enqueuers and several workers never lose or double a job.

    queued -> running -> done | failed | diverged | stopped | cancelled
                      -> lost (its process vanished)  -> queued again, resuming (unless --no-requeue)
"""
from __future__ import annotations

import os
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from engine.fs import make_home

from engine.store.state import JOB_STATES

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id    TEXT NOT NULL UNIQUE,
    run_dir   TEXT NOT NULL,
    state     TEXT NOT NULL,
    gpus      INTEGER NOT NULL DEFAULT 1,   -- GPUs the job wants on a GPU worker
    resume    INTEGER NOT NULL DEFAULT 0,   -- start from the run's last checkpoint
    cancel    INTEGER NOT NULL DEFAULT 0,   -- a cancel was requested while it ran
    worker    TEXT,
    host      TEXT,
    pid       INTEGER,
    devices   TEXT,
    exit_code INTEGER,
    error     TEXT,
    attempts  INTEGER NOT NULL DEFAULT 0,
    backend   TEXT NOT NULL DEFAULT 'local',
    slurm_id  TEXT,
    created   REAL,
    started   REAL,
    ended     REAL,
    priority  INTEGER NOT NULL DEFAULT 0,   -- higher first, then first come, first served
    grp       TEXT,                         -- the run's family (config `group`)
    after     TEXT,                         -- JSON list of run ids that must end `done` first
    retries   INTEGER NOT NULL DEFAULT 0    -- `failed` attempts retried (from the last checkpoint)
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, id);
CREATE TABLE IF NOT EXISTS attempts (           -- every attempt's end, kept when the job is retried
    job_id    INTEGER NOT NULL,
    attempt   INTEGER NOT NULL,
    state     TEXT NOT NULL,
    worker    TEXT,
    host      TEXT,
    exit_code INTEGER,
    error     TEXT,
    started   REAL,
    ended     REAL
);
CREATE INDEX IF NOT EXISTS attempts_job ON attempts(job_id, attempt);
CREATE TABLE IF NOT EXISTS workers (
    id        TEXT PRIMARY KEY,
    host      TEXT,
    pid       INTEGER,
    slots     TEXT,
    started   REAL,
    heartbeat REAL,
    stopped   REAL
);
"""


_ADDED_COLUMNS = {"priority": "INTEGER NOT NULL DEFAULT 0", "grp": "TEXT", "after": "TEXT",
                  "retries": "INTEGER NOT NULL DEFAULT 0"}
DEP_FAILED = ("failed", "diverged", "cancelled")   # a dependency that ended so fails its dependents


@dataclass
class Job:
    id: int
    run_id: str
    run_dir: str
    state: str
    gpus: int
    resume: int
    cancel: int
    worker: str | None
    host: str | None
    pid: int | None
    devices: str | None
    exit_code: int | None
    error: str | None
    attempts: int
    backend: str
    slurm_id: str | None
    created: float | None
    started: float | None
    ended: float | None
    priority: int = 0
    grp: str | None = None
    after: str | None = None
    retries: int = 0

    @property
    def deps(self) -> list[str]:
        import json
        return json.loads(self.after) if self.after else []


DB_TIMEOUT = float(os.environ.get("GPCTL_DB_TIMEOUT") or 60)   # seconds a writer waits for a lock
                                                                # (tests shorten it to hold one past it)


class JobStore:
    """The store, opened for writing (created with its schema if missing)."""

    writable = True
    problem: str | None = None      # for_reading: why jobs.db could not be read (then it reads as empty)

    def __init__(self, root: Path):
        make_home(root)
        self.path = root / "jobs.db"
        self.db = sqlite3.connect(self.path, timeout=DB_TIMEOUT, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA busy_timeout={int(DB_TIMEOUT * 1000)}")
        with self.tx():
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    self.db.execute(statement)
        have = {r["name"] for r in self.db.execute("PRAGMA table_info(jobs)")}
        for col, decl in _ADDED_COLUMNS.items():        # a store made by an older gpctl: add what is new
            if col not in have:
                with self.tx():
                    self.db.execute(f"ALTER TABLE jobs ADD COLUMN {col} {decl}")
        os.chmod(self.path, 0o600)
        st = os.stat(self.path)
        self.identity = (st.st_dev, st.st_ino)   # the worker checks that this is still the file at `path`

    def wal_identity(self) -> tuple[int, int] | None:
        """(device, inode) of jobs.db-wal, which lives as long as this connection (None: none)."""
        try:
            st = os.stat(self.path.with_name(self.path.name + "-wal"))
        except OSError:
            return None
        return st.st_dev, st.st_ino

    @classmethod
    def for_reading(cls, root: Path, lenient: bool = False) -> "JobStore":
        """A store that creates and changes nothing: what `ls`, `show`, `logs` and the TUI use, so they
        work on a read-only home (a colleague's, a mounted results disk). No jobs.db yet: an empty store.
        A home we may write to gets the usual connection (so `ls` can still bring Slurm states up to
        date); otherwise the file is opened read-only (immutable where its WAL index cannot be made).
        `lenient` (ls, show, the TUI: views of the runs themselves): a jobs.db that cannot be read
        reads as an empty queue and `problem` says why, so the runs can still be seen."""
        self = cls.__new__(cls)
        self.path = root / "jobs.db"
        self.identity = None
        self.problem = None
        try:
            self._open_for_reading(root)
        except sqlite3.DatabaseError as e:      # garbage, a folder, a lost WAL: runs are still readable
            if not lenient:
                raise
            self.problem = (f"{self.path}: {e} (the queue cannot be read: runs are shown without their jobs)")
            self.db = _connect(":memory:")
            self.writable = False
            self._open_for_reading(None)
        return self

    def _probe(self, db: sqlite3.Connection) -> bool:
        """Keep `db` if it can read (a full disk cannot make the -shm file a WAL read needs: then the
        file is read read-only, or immutable, as for a home we may not write)."""
        try:
            db.execute("SELECT name FROM sqlite_master LIMIT 1").fetchall()
        except sqlite3.OperationalError:
            db.close()
            return False
        self.db = db
        return True

    def _open_for_reading(self, root: Path | None) -> None:
        if root is None:
            pass
        elif not self.path.exists():
            self.db = _connect(":memory:")
            self.writable = False
        elif os.access(self.path, os.W_OK) and os.access(root, os.W_OK) and self._probe(_connect(str(self.path))):
            self.db.execute(f"PRAGMA busy_timeout={int(DB_TIMEOUT * 1000)}")
        else:
            self.writable = False
            self.db = _connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True)
            try:
                self.db.execute("SELECT 1 FROM jobs LIMIT 1").fetchall()
            except sqlite3.OperationalError:   # WAL needs a -shm file it cannot create: read as immutable
                self.db.close()
                self.db = _connect(f"{self.path.resolve().as_uri()}?immutable=1", uri=True)
        # a missing table (no store yet, an older one) reads as empty
        have = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        for statement in SCHEMA.split(";"):
            words = statement.split()
            if words[:2] == ["CREATE", "TABLE"] and words[5] not in have:
                self.db.execute(statement.replace("CREATE TABLE", "CREATE TEMP TABLE", 1))

    @contextmanager
    def tx(self):
        """One write transaction, taken at once (BEGIN IMMEDIATE), so readers-then-writers never race."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()

    # ------------------------------------------------------------ jobs
    def enqueue(self, run_id: str, run_dir: Path, gpus: int = 1, resume: bool = False,
                backend: str = "local", priority: int = 0, group: str = "", after: list[str] = (),
                retries: int = 0) -> int:
        """Queue a run (or re-queue an ended one to resume). `after`: run ids that must end `done`
        before it starts; `retries`: how many `failed` attempts are retried from the last checkpoint."""
        import json
        deps = json.dumps(list(after)) if after else None
        with self.tx() as db:
            row = db.execute("SELECT id, state FROM jobs WHERE run_id = ?", (run_id,)).fetchone()
            if row:  # re-enqueue (resume) an existing run
                if row["state"] in ("queued", "running"):
                    raise ValueError(f"run {run_id} is already {row['state']}")
                db.execute("UPDATE jobs SET state='queued', resume=?, cancel=0, exit_code=NULL, error=NULL, "
                           "worker=NULL, pid=NULL, devices=NULL, ended=NULL, backend=? WHERE id=?",
                           (int(resume), backend, row["id"]))
                return row["id"]
            cur = db.execute("INSERT INTO jobs (run_id, run_dir, state, gpus, resume, backend, created, priority, "
                             "grp, after, retries) VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?)",
                             (run_id, str(run_dir), gpus, int(resume), backend, time.time(), priority,
                              group or None, deps, retries))
            return cur.lastrowid

    def claim(self, worker: str, host: str, max_gpus: int | None, fits=None) -> Job | None:
        """The first queued local job that fits and is ready, by priority (higher first), then age
        (max_gpus None: a CPU worker takes any job). Ready: every `after` dependency ended `done`; a
        job whose dependency ended failed, diverged or cancelled fails here, with the reason.
        `fits(job)`: False leaves a job queued (a GPU worker packing by free memory) for the next."""
        with self.tx() as db:
            q = "SELECT * FROM jobs WHERE state='queued' AND backend='local'"
            rows = db.execute(q + (" AND gpus <= ?" if max_gpus is not None else "") + " ORDER BY priority DESC, id",
                              (max_gpus,) if max_gpus is not None else ()).fetchall()
            row = None
            for cand in rows:
                why = self._blocked(db, Job(**dict(cand)))
                if why is None:
                    if fits is not None and not fits(Job(**dict(cand))):
                        continue
                    row = cand
                    break
                if why:
                    db.execute("UPDATE jobs SET state='failed', error=?, ended=? WHERE id=?",
                               (why, time.time(), cand["id"]))
            if row is None:
                return None
            db.execute("UPDATE jobs SET state='running', worker=?, host=?, attempts=attempts+1, started=?, "
                       "pid=NULL, exit_code=NULL, error=NULL WHERE id=? AND state='queued'",
                       (worker, host, time.time(), row["id"]))
            return self.get_id(row["id"])

    @staticmethod
    def _blocked(db, job: Job) -> str | None:
        """None: ready. "": waiting on a dependency. Text: a dependency failed (the reason)."""
        waiting = False
        for dep in job.deps:
            row = db.execute("SELECT state FROM jobs WHERE run_id=?", (dep,)).fetchone()
            if row is None:
                return f"dependency {dep} is not in the queue"
            if row["state"] in DEP_FAILED:
                return f"dependency {dep} ended {row['state']}"
            if row["state"] != "done":
                waiting = True
        return "" if waiting else None

    def waiting_on(self, job: Job) -> list[str]:
        """The dependencies of a queued job that have not ended `done` yet."""
        out = []
        for dep in job.deps:
            row = self.db.execute("SELECT state FROM jobs WHERE run_id=?", (dep,)).fetchone()
            if row is None or row["state"] != "done":
                out.append(dep)
        return out

    def move(self, run_id: str, priority: int | None = None, first: bool = False) -> int:
        """Change a queued job's priority (`first`: above every other queued job); returns it."""
        with self.tx() as db:
            row = db.execute("SELECT id, state FROM jobs WHERE run_id=?", (run_id,)).fetchone()
            if row is None:
                raise KeyError(run_id)
            if row["state"] != "queued":
                raise ValueError(f"run {run_id} is {row['state']}, not queued: only queued jobs can move")
            if first:
                top = db.execute("SELECT MAX(priority) FROM jobs WHERE state='queued'").fetchone()[0] or 0
                priority = top + 1
            db.execute("UPDATE jobs SET priority=? WHERE id=?", (priority, row["id"]))
            return priority

    def group_runs(self, group: str) -> list[str]:
        return [r["run_id"] for r in self.db.execute("SELECT run_id FROM jobs WHERE grp=? ORDER BY id", (group,))]

    def update(self, job_id: int, **fields) -> None:
        cols = ", ".join(f"{k}=?" for k in fields)
        with self.tx() as db:
            db.execute(f"UPDATE jobs SET {cols} WHERE id=?", (*fields.values(), job_id))

    def finish(self, job_id: int, state: str, exit_code: int | None = None, error: str | None = None) -> None:
        assert state in JOB_STATES
        with self.tx() as db:
            self._end_attempt(db, job_id, state, exit_code, error)
            db.execute("UPDATE jobs SET state=?, exit_code=?, error=?, ended=?, pid=NULL WHERE id=?",
                       (state, exit_code, error, time.time(), job_id))

    def requeue(self, job_id: int, resume: bool = True, ended_as: str | None = None, error: str | None = None) -> None:
        """Back in the queue; `ended_as` (lost, stopped) records how the attempt that ran ended."""
        with self.tx() as db:
            if ended_as:
                self._end_attempt(db, job_id, ended_as, None, error)
                db.execute("UPDATE jobs SET error=? WHERE id=?", (error, job_id))
            db.execute("UPDATE jobs SET state='queued', resume=?, worker=NULL, pid=NULL, devices=NULL, cancel=0 "
                       "WHERE id=?", (int(resume), job_id))

    @staticmethod
    def _end_attempt(db, job_id: int, state: str, exit_code: int | None, error: str | None) -> None:
        row = db.execute("SELECT attempts, worker, host, started, state FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None or row["state"] not in ("running", "lost") or not row["attempts"]:
            return   # never ran (a queued job cancelled): no attempt to record
        db.execute("INSERT INTO attempts (job_id, attempt, state, worker, host, exit_code, error, started, ended) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", (job_id, row["attempts"], state, row["worker"], row["host"],
                                                        exit_code, error, row["started"], time.time()))

    def attempts(self, job_id: int) -> list[dict]:
        """How each attempt ended, oldest first (a retried job's earlier errors stay here)."""
        return [dict(r) for r in self.db.execute("SELECT * FROM attempts WHERE job_id=? ORDER BY attempt, ended",
                                                 (job_id,))]

    def request_cancel(self, run_id: str) -> str:
        """Cancel: a queued job at once; a running one is flagged for its worker. Returns the new state."""
        with self.tx() as db:
            row = db.execute("SELECT id, state FROM jobs WHERE run_id=?", (run_id,)).fetchone()
            if row is None:
                raise KeyError(run_id)
            if row["state"] in ("queued", "lost"):
                db.execute("UPDATE jobs SET state='cancelled', ended=? WHERE id=?", (time.time(), row["id"]))
                return "cancelled"
            if row["state"] == "running":
                db.execute("UPDATE jobs SET cancel=1 WHERE id=?", (row["id"],))
                return "cancelling"
            return row["state"]

    def get(self, run_id: str) -> Job | None:
        row = self.db.execute("SELECT * FROM jobs WHERE run_id=?", (run_id,)).fetchone()
        return Job(**dict(row)) if row else None

    def get_id(self, job_id: int) -> Job:
        return Job(**dict(self.db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()))

    def jobs(self, state: str | None = None, worker: str | None = None) -> list[Job]:
        q, args = "SELECT * FROM jobs WHERE 1=1", []
        if state:
            q, args = q + " AND state=?", args + [state]
        if worker:
            q, args = q + " AND worker=?", args + [worker]
        return [Job(**dict(r)) for r in self.db.execute(q + " ORDER BY id", args)]

    # ------------------------------------------------------------ workers
    def register_worker(self, worker: str, host: str, pid: int, slots: str) -> None:
        now = time.time()
        with self.tx() as db:
            db.execute("INSERT OR REPLACE INTO workers (id, host, pid, slots, started, heartbeat, stopped) "
                       "VALUES (?, ?, ?, ?, ?, ?, NULL)", (worker, host, pid, slots, now, now))

    def heartbeat(self, worker: str) -> None:
        with self.tx() as db:
            db.execute("UPDATE workers SET heartbeat=? WHERE id=?", (time.time(), worker))

    def worker_stopped(self, worker: str) -> None:
        with self.tx() as db:
            db.execute("UPDATE workers SET stopped=? WHERE id=?", (time.time(), worker))

    def workers(self) -> list[dict]:
        return [dict(r) for r in self.db.execute("SELECT * FROM workers ORDER BY started")]


def _connect(target: str, uri: bool = False) -> sqlite3.Connection:
    db = sqlite3.connect(target, timeout=DB_TIMEOUT, isolation_level=None, uri=uri)
    db.row_factory = sqlite3.Row
    return db
