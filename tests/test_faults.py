"""Issue 26: faults that strand nothing. A full disk, a full or locked jobs.db: each is an ending
in words (or a wait with a message), nothing in the home is lost, and the run goes on afterwards
with records equal to an uninterrupted run's."""
import json
import os
import subprocess
import uuid

import pytest
from typer.testing import CliRunner

from engine.store.rundir import RunDir
from engine.train.loop import train
from gpctl.cli import app
from tests.conftest import TINY_IMAGES, tiny
from tests.test_queue import wait_until

runner = CliRunner()


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (CI runs as root); skipped, with the reason, where mounting is refused."""
    where = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    where.mkdir()
    if os.getuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(where)],
                         capture_output=True, text=True)
    if res.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def _fill(path):
    try:
        with open(path, "wb") as f:
            while True:
                f.write(b"x" * 65536)
    except OSError:
        pass


def _strip(rd):
    return [{k: v for k, v in r.items() if k != "wall"} for r in rd.metrics()[0]]


ARGS = ("steps=40", "checkpoint_every=10", "log_every=1", "eval_every=10")


def test_a_full_disk_is_an_ending_and_resume_continues_exactly(small_disk, tmp_path):
    home = small_disk / "home"
    rd = RunDir.create(home, tiny(TINY_IMAGES, *ARGS))
    filler = home / "filler"

    def fill(t):
        if t.step == 15:
            _fill(filler)
    assert train(rd, hooks=[fill]) == "failed"                  # no traceback out of train()
    st = rd.status()
    assert st["state"] == "failed" and st["disk_full"] is True
    assert st["error"].startswith(f"disk full: {rd.checkpoints / 'step_0000020.state.safetensors'}: "
                                  "No space left on device (")
    assert st["error"].endswith(f"its last checkpoint (step 10) is kept: free space, then gpctl resume {rd.id}")
    assert [s for s, _ in rd.list_checkpoints()] == [10]
    assert sorted(p.name for p in rd.checkpoints.iterdir()) == ["step_0000010.safetensors",
                                                                "step_0000010.state.safetensors"]  # no torn files
    assert not [p for p in rd.path.iterdir() if p.name.endswith(".tmp")]
    res = runner.invoke(app, ["--home", str(home), "ls", "--json"])              # a full home is listed
    assert res.exit_code == 0 and json.loads(res.stdout)[0]["state"] == "failed", res.output
    res = runner.invoke(app, ["--home", str(home), "show", rd.id])
    assert res.exit_code == 0 and "disk full: " in res.stdout, res.output
    filler.unlink()                                              # space again: it goes on exactly
    assert train(rd, resume=True) == "done"
    whole = RunDir.create(tmp_path / "whole", tiny(TINY_IMAGES, *ARGS))
    assert train(whole) == "done"
    assert _strip(rd) == _strip(whole)


def _worker(home, env=None):
    import sys
    return subprocess.Popen([sys.executable, "-m", "gpctl", "--home", str(home), "worker", "--cpu-slots", "1",
                             "--idle-exit", "3"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, **(env or {})})


def test_a_lock_held_past_the_timeout_makes_the_worker_wait_never_exit(tmp_path):
    """Fault 4: a write lock on jobs.db held past the busy timeout killed the worker. It now waits,
    says so, and records the job's end once the lock is gone."""
    import sqlite3
    import time

    from engine.store.jobs import JobStore
    home = tmp_path / "home"
    rd = RunDir.create(home, tiny(TINY_IMAGES, "steps=30", "eval_every=0", "log_every=1"))
    store = JobStore(home)
    store.enqueue(rd.id, rd.path)
    store.close()
    w = _worker(home, {"GPCTL_DB_TIMEOUT": "0.5"})
    try:
        wait_until(lambda: rd.status().get("state") == "running")
        lock = sqlite3.connect(home / "jobs.db", timeout=5, isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")                 # held 3 s: six times the worker's timeout
        wait_until(lambda: rd.status().get("state") == "done")   # the job itself never needed jobs.db
        time.sleep(3)
        assert w.poll() is None                         # still serving
        lock.execute("COMMIT")
        lock.close()
        wait_until(lambda: JobStore.for_reading(home).get(rd.id).state == "done", timeout=60)
        assert w.wait(timeout=60) == 0                  # its idle exit, not an error
        log = w.stdout.read()
        assert "database is locked; waiting and retrying" in log and "Traceback" not in log, log
    finally:
        if w.poll() is None:
            w.kill()


def test_a_full_disk_under_a_worker_strands_nothing(small_disk, tmp_path):
    """Fault 1 end to end: the disk fills while a worker's job trains. The job ends `failed` in one
    line naming the path; the worker survives (waiting while jobs.db cannot be written) and records
    the end; after space is freed, `gpctl resume` continues the run to `done`, with records equal to
    an uninterrupted run's."""
    from engine.store.jobs import JobStore
    home = small_disk / "home"
    args = ("steps=1000", "checkpoint_every=100", "log_every=10", "eval_every=0")
    rd = RunDir.create(home, tiny(TINY_IMAGES, *args))
    store = JobStore(home)
    store.enqueue(rd.id, rd.path)
    store.close()
    w = _worker(home)
    filler = home / "filler"
    try:
        wait_until(lambda: rd.status().get("step", 0) >= 250)
        _fill(filler)
        wait_until(lambda: rd.status().get("state") == "failed")
        assert rd.status().get("disk_full") is True and rd.status()["error"].startswith("disk full: ")
        assert w.poll() is None or w.returncode == 0, w.stdout.read()
        filler.unlink()
        wait_until(lambda: JobStore.for_reading(home).get(rd.id).state == "failed", timeout=60)
        w.wait(timeout=60)
        log = w.stdout.read()
        assert "Traceback" not in log, log
    finally:
        if w.poll() is None:
            w.kill()
    assert rd.list_checkpoints() and not [p for p in rd.checkpoints.iterdir() if p.name.endswith(".tmp")]
    res = runner.invoke(app, ["--home", str(home), "resume", rd.id, "--foreground"])
    assert res.exit_code == 0, res.output
    assert rd.status()["state"] == "done"
    whole = RunDir.create(tmp_path / "whole", tiny(TINY_IMAGES, *args))
    assert train(whole) == "done"
    assert _strip(rd) == _strip(whole)


def test_resume_takes_back_a_job_whose_process_and_worker_are_gone(tmp_path):
    """Fault 1's tail: a worker that died (a full jobs.db) left its job `running`; `gpctl resume`
    refused ("is already running") until a new worker reconciled. It now sees both are gone."""
    import socket
    import sys

    from engine.store.jobs import JobStore
    home = tmp_path / "home"
    rd = RunDir.create(home, tiny(TINY_IMAGES, "steps=4", "checkpoint_every=2", "eval_every=0"))
    assert train(rd) == "done"
    rd.write_status(state="running", pid=999_999_999, host=socket.gethostname())   # as a kill leaves it
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    store = JobStore(home)
    store.enqueue(rd.id, rd.path)
    store.register_worker("vm:gone", socket.gethostname(), pid, "cpu=1")
    job = store.claim("vm:gone", socket.gethostname(), None)
    store.update(job.id, pid=pid)
    store.close()
    res = runner.invoke(app, ["--home", str(home), "resume", rd.id, "--wait"], env={"GPCTL_WORKER_IDLE_EXIT": "1"})
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith(f"{rd.id}: queued to resume from its last checkpoint"), res.output
    store = JobStore(home)
    assert store.get(rd.id).state == "done" and rd.status()["state"] == "done"
    assert [a["state"] for a in store.attempts(job.id)][-2:] == ["lost", "done"]


def test_a_full_home_is_listed_and_run_leaves_nothing_half_made(small_disk):
    """Fault 5: with no live connection, reading jobs.db needs a -shm file a full disk cannot make;
    `ls` and `show` read it read-only instead. `gpctl run` names the path and leaves no run folder."""
    from engine.store.jobs import JobStore
    home = small_disk / "home"
    rd = RunDir.create(home, tiny(TINY_IMAGES, "steps=4"))
    store = JobStore(home)
    store.enqueue(rd.id, rd.path)
    store.close()
    assert not (home / "jobs.db-shm").exists()
    _fill(home / "filler")
    res = runner.invoke(app, ["--home", str(home), "ls", "--json"])
    assert res.exit_code == 0 and "warning" not in res.stderr, res.output
    assert [(r["id"], r["state"], r["job"]) for r in json.loads(res.stdout)] == [(rd.id, "queued", "queued")]
    res = runner.invoke(app, ["--home", str(home), "show", rd.id])
    assert res.exit_code == 0 and "job queued" in res.stdout, res.output
    res = runner.invoke(app, ["--home", str(home), "run", "preset", "demo", "--no-worker"])
    assert res.exit_code == 2, res.output
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith(f"error: {home / 'runs'}/demo-") and line.endswith(": No space left on device"), line
    assert sorted(p.name for p in (home / "runs").iterdir()) == [rd.id]


def test_a_locked_jobs_db_leaves_no_run_without_its_job(tmp_path, monkeypatch):
    """Fault 4's other half: `gpctl run` against a lock held past the timeout exits 2 in one line
    and removes the run folders it had made."""
    import sqlite3

    import engine.store.jobs
    from engine.store.jobs import JobStore
    home = tmp_path / "home"
    JobStore(home).close()
    monkeypatch.setattr(engine.store.jobs, "DB_TIMEOUT", 0.3)
    lock = sqlite3.connect(home / "jobs.db", timeout=5, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        res = runner.invoke(app, ["--home", str(home), "run", "preset", "demo", "--no-worker"])
    finally:
        lock.execute("COMMIT")
        lock.close()
    assert res.exit_code == 2 and res.stderr.strip() == f"error: {home / 'jobs.db'}: database is locked", res.output
    assert not (home / "runs").exists() or list((home / "runs").iterdir()) == []


def test_resume_falls_back_past_a_torn_newest_checkpoint(tmp_path):
    """A machine crash tore the newest checkpoint: resume used to refuse it, and a worker retried it
    in vain. It now resumes from the one before, says which it skipped, and ends exactly."""
    args = ("steps=8", "checkpoint_every=2", "eval_every=4")
    rd = RunDir.create(tmp_path / "home", tiny(TINY_IMAGES, *args))
    assert train(rd, hooks=[lambda t: setattr(t, "stop_requested", True) if t.step == 7 else None]) == "stopped"
    newest = rd.list_checkpoints()[-1][1]
    assert newest.name == "step_0000007.safetensors"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])                     # torn mid-write
    assert train(rd, resume=True) == "done"
    (ev,) = [e for e in rd.events()[0] if e["event"] == "resume"]
    assert ev["checkpoint"] == "step_0000006.safetensors" and ev["skipped"][0].startswith("step_0000007.safetensors (")
    whole = RunDir.create(tmp_path / "whole", tiny(TINY_IMAGES, *args))
    assert train(whole) == "done"
    assert _strip(rd) == _strip(whole)
    res = runner.invoke(app, ["--home", str(tmp_path / "home"), "show", rd.id])
    assert "resumed at step 6 from step_0000006.safetensors, past 1 unreadable newer checkpoint(s): step_0000007" \
        in res.stdout, res.stdout


def test_a_deleted_wal_under_a_live_worker_stops_it_loudly(tmp_path):
    """Fault 3: deleting jobs.db-wal under a live worker went unnoticed while every other command
    failed (and queued jobs could be lost). The worker now notices, as it does a replaced jobs.db,
    and exits at once without writing (so it checkpoints no WAL nobody else reads)."""
    import signal

    from engine.store.jobs import JobStore
    home = tmp_path / "home"
    rd = RunDir.create(home, tiny(TINY_IMAGES, "steps=100000", "eval_every=0", "log_every=10"))
    store = JobStore(home)
    store.enqueue(rd.id, rd.path)
    store.close()
    w = _worker(home)
    try:
        wait_until(lambda: rd.status().get("state") == "running" and rd.status().get("step", 0) > 0)
        (home / "jobs.db-wal").unlink()
        assert w.wait(timeout=30) == 1
        log = w.stdout.read()
        assert f"error: {home / 'jobs.db'}-wal was deleted or replaced under worker" in log, log
        assert f"jobs it started keep running: {rd.id}" in log and "Traceback" not in log, log
    finally:
        if w.poll() is None:
            w.kill()
        pid = rd.status().get("pid")
        if pid:
            try:
                os.killpg(os.getpgid(pid), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
