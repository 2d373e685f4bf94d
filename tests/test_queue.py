"""The job store and the worker, with real processes (CPU)."""
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.store.jobs import JobStore
from engine.store.rundir import RunDir
from engine.train.loop import train
from gpctl.cli import app
from tests.conftest import TINY_IMAGES, TINY_LM, tiny

SLOW = ["steps=400", "log_every=2", "eval_every=0", "checkpoint_every=10", "batch_size=64",
        "data.image_size=16", "model.width=4"]


def _enqueue_many(root, tag, n):
    store = JobStore(Path(root))
    for i in range(n):
        store.enqueue(f"{tag}-{i}", Path(root) / f"{tag}-{i}")
    store.close()


def test_concurrent_enqueues_give_distinct_jobs(tmp_path):
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_enqueue_many, args=(tmp_path, f"p{k}", 5)) for k in range(10)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    jobs = JobStore(tmp_path).jobs()
    assert len(jobs) == 50
    assert len({j.id for j in jobs}) == 50 and len({j.run_id for j in jobs}) == 50
    assert {j.state for j in jobs} == {"queued"}


def _claim_all(root, name, q):
    store = JobStore(Path(root))
    got = []
    while (job := store.claim(name, "host", None)) is not None:
        got.append(job.run_id)
    q.put(got)


def test_two_claimers_never_take_the_same_job(tmp_path):
    _enqueue_many(tmp_path, "j", 200)
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(tmp_path, f"w{k}", q)) for k in range(2)]
    for p in procs:
        p.start()
    got = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join()
    assert not set(got[0]) & set(got[1])
    assert sorted(got[0] + got[1]) == sorted(f"j-{i}" for i in range(200))


def enqueue(home, *rds):
    store = JobStore(home)
    for rd in rds:
        store.enqueue(rd.id, rd.path)
    return store


def start_worker(home, *extra):
    return subprocess.Popen([sys.executable, "-m", "gpctl", "--home", str(home), "worker", "--cpu-slots", "1",
                             "--idle-exit", "3", *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_until(pred, timeout=120.0, poll=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(poll)
    raise AssertionError("timed out")


def _strip(rd):
    return [{k: v for k, v in r.items() if k != "wall"} for r in rd.metrics()[0]]


@pytest.mark.slow
def test_two_workers_run_every_job_once(home):
    store = JobStore(home)
    rds = [RunDir.create(home, tiny(TINY_IMAGES, "steps=3", "eval_every=0", name=f"a{i}")) for i in range(4)]
    for rd in rds:
        store.enqueue(rd.id, rd.path)
    workers = [start_worker(home), start_worker(home)]
    wait_until(lambda: all(store.get(rd.id).state == "done" for rd in rds))
    for w in workers:
        w.wait(timeout=60)
    jobs = [store.get(rd.id) for rd in rds]
    assert [j.attempts for j in jobs] == [1, 1, 1, 1]
    assert len({j.worker for j in jobs}) == 2   # both worked
    for rd in rds:
        assert rd.log_file.read_text().count("launch") == 1


def test_the_worker_keeps_a_finished_runs_step_times_for_estimates(home):
    """Issue 28: a finished job's step times (per batch, warm-up left out) are kept in the home's
    step-time cache, keyed like a probe's, for `presets check --cost` and the queue's ETAs."""
    import json

    from engine.analysis.cost import key, run_step_times
    store = JobStore(home)
    rd = RunDir.create(home, tiny(TINY_IMAGES, "steps=12", "log_every=1", "eval_every=0", name="timed"))
    store.enqueue(rd.id, rd.path)
    w = start_worker(home)
    wait_until(lambda: store.get(rd.id).state == "done")
    w.wait(timeout=60)
    cache = json.loads((home / "cache" / "step_times.json").read_text())
    hit = cache[key(rd.config(), 16, "cpu")]
    assert hit["run"] == rd.id and hit["batch"] == 16
    assert hit["seconds"] == run_step_times(rd.train_records())[16] > 0


@pytest.mark.slow
def test_worker_killed_mid_run_then_restarted_finishes_exactly(home):
    cfg = tiny(TINY_IMAGES, *SLOW, "steps=60")
    ref = RunDir.create(home / "ref", cfg)
    assert train(ref) == "done"
    rd = RunDir.create(home, cfg)
    store = enqueue(home, rd)
    w = start_worker(home)
    wait_until(lambda: rd.status().get("step", 0) >= 25)
    job = store.get(rd.id)
    os.kill(w.pid, signal.SIGKILL)        # the worker dies ...
    os.killpg(job.pid, signal.SIGKILL)    # ... and so does its job, between checkpoints
    w.wait()
    wait_until(lambda: not os.path.exists(f"/proc/{job.pid}") or
               open(f"/proc/{job.pid}/stat").read().split(")")[-1].split()[0] == "Z", 10)
    w2 = start_worker(home)
    wait_until(lambda: store.get(rd.id).state == "done")
    w2.wait(timeout=60)
    assert store.get(rd.id).attempts == 2
    assert _strip(rd) == _strip(ref)
    resumed = [e for e in rd.events()[0] if e["event"] == "resume"]
    assert resumed and resumed[0]["step"] in (20, 30)


@pytest.mark.slow
def test_cancel_stops_a_running_job_within_seconds(home):
    rd = RunDir.create(home, tiny(TINY_IMAGES, *SLOW, "steps=100000"))
    enqueue(home, rd)
    w = start_worker(home)
    wait_until(lambda: rd.status().get("step", 0) >= 4)
    t0 = time.monotonic()
    res = CliRunner().invoke(app, ["--home", str(home), "cancel", rd.id, "--wait", "--timeout", "30"])
    took = time.monotonic() - t0
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines() == [f"{rd.id}: cancelling", f"{rd.id}: cancelled"]
    assert took < 10
    assert rd.status()["state"] == "stopped" and rd.list_checkpoints()
    w.wait(timeout=60)


@pytest.mark.slow
def test_a_killed_job_is_failed_with_exit_code_and_log_tail(home):
    rd = RunDir.create(home, tiny(TINY_IMAGES, *SLOW, "steps=100000"))
    store = enqueue(home, rd)
    w = start_worker(home)
    wait_until(lambda: rd.status().get("step", 0) >= 2)
    os.kill(store.get(rd.id).pid, signal.SIGKILL)
    wait_until(lambda: store.get(rd.id).state == "failed")
    job = store.get(rd.id)
    assert job.exit_code == -9 and "process exited with code -9" in job.error
    shown = CliRunner().invoke(app, ["--home", str(home), "show", rd.id])
    assert "exit code -9" in shown.stdout and "--- log tail ---" in shown.stdout and "launch" in shown.stdout
    assert json.loads(CliRunner().invoke(app, ["--home", str(home), "ls", "--json"]).stdout)[0]["state"] == "failed"
    w.wait(timeout=60)


@pytest.mark.slow
def test_diverged_job_is_not_retried(home):
    rd = RunDir.create(home, tiny(TINY_LM, "steps=30", "lr=1e6", "optim.grad_clip=0.0", "log_every=1"))
    store = enqueue(home, rd)
    w = start_worker(home)
    wait_until(lambda: store.get(rd.id).state not in ("queued", "running"))
    w.wait(timeout=60)
    job = store.get(rd.id)
    assert (job.state, job.attempts, job.exit_code) == ("diverged", 1, 1)


@pytest.mark.slow
def test_sigterm_checkpoints_and_requeues_then_resumes(home):
    rd = RunDir.create(home, tiny(TINY_IMAGES, *SLOW, "steps=80"))
    store = enqueue(home, rd)
    w = start_worker(home)
    wait_until(lambda: rd.status().get("step", 0) >= 6)
    w.send_signal(signal.SIGTERM)
    w.wait(timeout=60)
    job = store.get(rd.id)
    assert (job.state, job.resume) == ("queued", 1)
    stopped_at = rd.status()["step"]
    assert rd.status()["state"] == "stopped" and rd.list_checkpoints()[-1][0] == stopped_at
    w2 = start_worker(home)
    wait_until(lambda: store.get(rd.id).state == "done")
    w2.wait(timeout=60)
    assert [r["step"] for r in rd.metrics()[0] if "loss" in r] == list(range(1, 81))


@pytest.mark.slow
def test_gpu_slots_give_each_job_its_own_device(home):
    """A worker owning GPUs 0 and 1 (one job each) hands out distinct devices; on a CPU machine the
    jobs still run (CUDA_VISIBLE_DEVICES names a GPU torch cannot see, so device=auto picks the CPU)."""
    store = JobStore(home)
    rds = [RunDir.create(home, tiny(TINY_IMAGES, *SLOW, "steps=30", name=f"g{i}")) for i in range(3)]
    for rd in rds:
        store.enqueue(rd.id, rd.path)
    w = subprocess.Popen([sys.executable, "-m", "gpctl", "--home", str(home), "worker", "--gpus", "0,1",
                          "--idle-exit", "3"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    # running, and launched: the worker records pid and devices right after it starts the process
    wait_until(lambda: all(store.get(rd.id).state == "running" and store.get(rd.id).pid for rd in rds[:2]))
    assert sorted(store.get(rd.id).devices for rd in rds[:2]) == ["0", "1"]
    assert store.get(rds[2].id).state == "queued"          # both GPUs busy
    wait_until(lambda: all(store.get(rd.id).state == "done" for rd in rds))
    w.wait(timeout=60)
    assert store.get(rds[2].id).devices in ("0", "1")
    assert "devices=['0']" in rds[0].log_file.read_text() or "devices=['1']" in rds[0].log_file.read_text()


def test_reconcile_leaves_a_live_workers_jobs_alone(home):
    """A job another live worker has just claimed (its pid not yet recorded) is not 'lost'."""
    import socket
    from engine.launch.worker import Worker
    store = JobStore(home)
    rd = RunDir.create(home, tiny(TINY_IMAGES, "steps=2", name="claimed"))
    store.enqueue(rd.id, rd.path)
    host = socket.gethostname()
    other = f"{host}:other"                  # this (live) test process stands in for the other worker
    store.register_worker(other, host, os.getpid(), "cpu=1")
    assert store.claim(other, host, None).run_id == rd.id
    w = Worker(home)
    w.reconcile()
    job = store.get(rd.id)
    assert (job.state, job.worker, job.attempts) == ("running", other, 1)
    store.worker_stopped(other)              # once that worker is gone, the job is lost and requeued
    Worker(home).reconcile()
    job = store.get(rd.id)
    assert (job.state, job.resume) == ("queued", 1)


def test_reconcile_records_the_lost_attempt_and_keeps_every_attempts_error(home):
    """Issue 12: no `lost` event was written, and a job's error was cleared when it was claimed again."""
    import socket
    from engine.launch.worker import Worker
    host = socket.gethostname()
    rd = RunDir.create(home, tiny(TINY_IMAGES, "steps=2", name="lost"))
    store = enqueue(home, rd)
    dead = subprocess.Popen(["true"])
    dead.wait()
    store.register_worker(f"{host}:gone", host, dead.pid, "cpu=1")      # a worker that died with its job
    job = store.claim(f"{host}:gone", host, None)
    store.update(job.id, pid=dead.pid)
    rd.write_status(state="running", pid=dead.pid, host=host, step=1)
    Worker(home).reconcile()
    job = store.get(rd.id)
    assert (job.state, job.resume, job.attempts) == ("queued", 1, 1)
    why = f"its process (pid {dead.pid} on {host}) was gone when a worker restarted"
    assert [(a["attempt"], a["state"], a["error"]) for a in store.attempts(job.id)] == [(1, "lost", why)]
    lost = [e for e in rd.events()[0] if e["event"] == "lost"]
    assert len(lost) == 1 and (lost[0]["pid"], lost[0]["step"], lost[0]["requeued"]) == (dead.pid, 1, True)
    assert (rd.status()["state"], rd.status()["error"]) == ("lost", why)
    job = store.claim("w2", host, None)                                 # the second attempt fails
    store.finish(job.id, "failed", 1, "boom")
    assert [(a["attempt"], a["state"], a["error"]) for a in store.attempts(job.id)] == [(1, "lost", why), (2, "failed", "boom")]
    shown = CliRunner().invoke(app, ["--home", str(home), "show", rd.id]).stdout
    assert f"  attempt 1 ended lost: {why}\n  attempt 2 ended failed: boom\n" in shown
    store.enqueue(rd.id, rd.path)                                       # a queued job cancelled: no attempt ran
    store.request_cancel(rd.id)
    assert len(store.attempts(job.id)) == 2


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_worker_whose_jobs_db_goes_away_stops_loudly(home, how):
    """Issue 12: with jobs.db deleted under it, a worker kept serving the deleted file; new jobs
    stayed queued forever and `worker --status` showed no worker."""
    JobStore(home).close()
    w = subprocess.Popen([sys.executable, "-m", "gpctl", "--home", str(home), "worker", "--idle-exit", "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_until(lambda: JobStore(home).workers())
    db = home / "jobs.db"
    if how == "deleted":
        for p in home.glob("jobs.db*"):
            p.unlink()
    else:
        other = home / "other"
        other.mkdir()
        JobStore(other).close()
        os.replace(other / "jobs.db", db)
    out, err = w.communicate(timeout=30)
    assert w.returncode == 1, (out, err)
    import socket
    assert err.strip() == (f"error: {db} was deleted or replaced under worker {socket.gethostname()}:{w.pid}; "
                           "it stops (jobs it started keep running: none; start a worker again to serve the new queue)")


def test_wait_says_steps_per_second_eta_and_why_a_run_is_queued(tmp_path):
    """`--wait`'s words: this process's steps/s and the ETA from status.json (a resumed run counts
    only its own steps), and why a queued job waits: its dependency, no worker, or busy slots."""
    import os
    import socket

    from gpctl.queue import progress_words, why_queued
    assert progress_words({"step": 150, "start_step": 50, "started": 100.0, "updated": 110.0}, 1150) == \
        ("10 steps/s", "ETA 1m40s")                                   # (150 - 50) / 10 s; (1150 - 150) / 10
    assert progress_words({"step": 150, "started": 100.0, "updated": 110.0}, 150) == ("15 steps/s", "ETA 0m00s")
    assert progress_words({"step": 0, "started": 100.0, "updated": 100.0}, 10) == ("", "")
    store = JobStore(tmp_path)
    store.enqueue("a", tmp_path / "a")
    store.enqueue("b", tmp_path / "b", after=["a"])
    b = next(j for j in store.jobs() if j.run_id == "b")
    assert why_queued(store, b) == "waits for a"
    a = next(j for j in store.jobs() if j.run_id == "a")
    assert why_queued(store, a) == "no worker is running: gpctl worker"
    store.register_worker("w1", socket.gethostname(), os.getpid(), "cpu")
    assert why_queued(store, a) == "starting"
    assert store.claim("w1", socket.gethostname(), None).run_id == "a"
    store.enqueue("c", tmp_path / "c")
    c = next(j for j in store.jobs() if j.run_id == "c")
    assert why_queued(store, c) == "every slot is busy: 1 running (a)"
    store.close()


def test_a_run_during_the_worker_start_up_starts_no_second_worker(home, monkeypatch):
    """Issue 26: `gpctl run` during a worker's start-up (it imports torch before it registers) started
    a second detached worker. The host's lock is taken before the worker is started and handed to it."""
    from gpctl import queue
    from gpctl.common import State
    monkeypatch.setattr(State, "home", home)
    assert queue.ensure_worker(idle_exit=1) is True
    assert queue.ensure_worker(idle_exit=1) is False       # at once: the first has not registered yet
    store = JobStore(home)
    wait_until(lambda: store.workers(), timeout=60)
    assert queue.ensure_worker(idle_exit=1) is False       # registered and holding the lock
    wait_until(lambda: not queue.live_workers(store), timeout=60)
    store.close()
    log = (home / "worker.log").read_text()
    assert log.count(" serving ") == 1 and "another worker serves" not in log, log
    # negative control: with the lock free again (its worker exited), the next call starts one
    assert queue.ensure_worker(idle_exit=1) is True
    store = JobStore(home)
    wait_until(lambda: (home / "worker.log").read_text().count(" serving ") == 2, timeout=60)
    wait_until(lambda: not queue.live_workers(store), timeout=60)
    store.close()
