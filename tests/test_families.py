"""Issue 16: families of runs (seeds, sweeps, groups) and a queue you can order (priorities,
dependencies, retries)."""
import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from engine.store.jobs import JobStore
from engine.store.rundir import RunDir, list_runs
from gpctl.cli import app
from tests.conftest import TINY_IMAGES, tiny

runner = CliRunner()

SWEEP_PRESET = """
[preset]
description = "a sweep"
compares = "batch_size"
reference = "b"

[base]
steps = 4
lr = 0.05
batch_size = 16
eval_every = 2
device = "cpu"

[base.model]
name = "cnn"
width = 4

[base.data]
source = "synthetic_images"
image_size = 8
eval_samples = 32

[runs.a]

[runs.b]
batch_size = 32

[sweep]
seeds = [3, 5]
lr = [0.1, 0.025]
"""


def invoke(home, *args):
    return runner.invoke(app, ["--home", str(home), *args])


def test_seeds_and_sweep_create_named_grouped_runs_and_dry_run_creates_none(tmp_path):
    home = tmp_path / "home"
    res = invoke(home, "run", "preset", "demo", "--arm", "bs512", "--seeds", "2", "--sweep", "lr=0.1,0.05",
                 "--sweep", "batch_size=32,512", "--dry-run")
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[-1] == "8 run(s); nothing created (--dry-run)"
    assert [ln.split()[:3] for ln in lines[1:-1]] == [
        [f"bs512-lr{lr}-bs{bs}-s{s}", f"demo.bs512-lr{lr}-bs{bs}", str(s)]
        for lr in ("0.1", "0.05") for bs in (32, 512) for s in (0, 1)]
    assert not home.exists()
    res = invoke(home, "run", "preset", "demo", "--arm", "bs512", "--seeds", "0,4,7", "--sweep", "lr=0.1,0.05",
                 "--no-worker")
    assert res.exit_code == 0, res.output
    cfgs = sorted((rd.config() for rd in list_runs(home)), key=lambda c: c.name)
    assert [(c.name, c.group, c.seed, c.lr) for c in cfgs] == [
        (f"bs512-lr{lr}-s{s}", f"demo.bs512-lr{lr}", s, float(lr)) for lr in ("0.05", "0.1") for s in (0, 4, 7)]
    store = JobStore(home)
    assert sorted(j.grp for j in store.jobs()) == sorted(c.group for c in cfgs)
    assert len(store.group_runs("demo.bs512-lr0.1")) == 3


def test_a_presets_sweep_table_and_bad_sweeps(tmp_path):
    p = tmp_path / "sw.toml"
    p.write_text(SWEEP_PRESET)
    res = invoke(tmp_path / "h", "run", "preset", str(p), "--dry-run")
    assert res.exit_code == 0, res.output
    names = [ln.split()[0] for ln in res.stdout.splitlines()[1:-1]]
    assert names == [f"{arm}-lr{lr}-s{s}" for arm in "ab" for lr in ("0.1", "0.025") for s in (3, 5)]
    for args, line in ((["--seeds", "0,0"], "error: --seeds '0,0': seeds must be distinct integers >= 0"),
                       (["--seeds", "x"], "error: --seeds 'x': give a count (3: seeds 0, 1, 2) or seeds like 0,4,7"),
                       (["--sweep", "lr"], "error: --sweep 'lr': expected key=v1,v2,..."),
                       (["--sweep", "colour=1,2"], "error: --set colour: unknown key 'colour'")):
        res = invoke(tmp_path / "h", "run", "preset", "demo", "--dry-run", *args)
        assert res.exit_code == 2 and res.stderr.strip() == line, (args, res.output)


def _queued(home, n, **kw):
    store = JobStore(home)
    rds = []
    for i in range(n):
        rd = RunDir.create(home, tiny(TINY_IMAGES, "steps=2", name=f"j{i}"))
        store.enqueue(rd.id, rd.path, **kw)
        rds.append(rd)
    return store, rds


def test_priorities_and_queue_move_change_the_claim_order(tmp_path):
    home = tmp_path / "home"
    store, rds = _queued(home, 4)
    store.update(store.get(rds[2].id).id, priority=5)
    assert invoke(home, "queue", "move", rds[3].id, "--first").stdout.strip() == f"{rds[3].id}: priority 6"
    res = invoke(home, "queue", "--json")
    assert [r["id"] for r in json.loads(res.stdout)] == [rds[3].id, rds[2].id, rds[0].id, rds[1].id]
    order = [store.claim("w", "h", None).run_id for _ in range(4)]
    assert order == [rds[3].id, rds[2].id, rds[0].id, rds[1].id]
    assert store.claim("w", "h", None) is None
    res = invoke(home, "queue", "move", rds[0].id, "--first")
    assert res.exit_code == 2 and res.stderr.strip() == f"error: run {rds[0].id} is running, not queued: only queued jobs can move"


def test_after_waits_for_done_and_fails_on_failed(tmp_path):
    home = tmp_path / "home"
    store, (a, b) = _queued(home, 2)
    c = RunDir.create(home, tiny(TINY_IMAGES, "steps=2", name="c"))
    store.enqueue(c.id, c.path, after=[a.id, b.id], priority=10)
    assert store.claim("w", "h", None).run_id == a.id           # c outranks them but waits on both
    store.finish(store.get(a.id).id, "done")
    assert store.claim("w", "h", None).run_id == b.id
    assert store.claim("w", "h", None) is None                  # b still running: c waits
    assert store.waiting_on(store.get(c.id)) == [b.id]
    store.finish(store.get(b.id).id, "done")
    assert store.claim("w", "h", None).run_id == c.id
    d, e = (RunDir.create(home, tiny(TINY_IMAGES, "steps=2", name=n)) for n in "de")
    store.enqueue(d.id, d.path)
    store.enqueue(e.id, e.path, after=[d.id])
    store.claim("w", "h", None)
    store.finish(store.get(d.id).id, "failed", 1, "boom")
    assert store.claim("w", "h", None) is None
    job = store.get(e.id)
    assert (job.state, job.error) == ("failed", f"dependency {d.id} ended failed")


def test_after_a_group_from_the_cli(tmp_path):
    home = tmp_path / "home"
    res = invoke(home, "run", "preset", "demo", "--arm", "bs512", "--seeds", "2", "--no-worker")
    seeds = res.stdout.split()
    res = invoke(home, "run", "preset", "demo", "--arm", "bs32to512", "--after", "demo.bs512", "--no-worker")
    assert res.exit_code == 0, res.output
    assert JobStore(home).get(res.stdout.split()[0]).deps == seeds
    res = invoke(home, "run", "preset", "demo", "--arm", "bs512", "--after", "nothing", "--no-worker")
    assert res.exit_code == 2 and "unknown run 'nothing'" in res.stderr


@pytest.mark.slow
def test_retries_stop_at_the_cap_and_keep_every_attempts_error(tmp_path):
    home = tmp_path / "home"
    rd = RunDir.create(home, tiny(TINY_IMAGES, "steps=2", "data.source='cifar5m'", f"data.path='{tmp_path}/none'"))
    store = JobStore(home)
    store.enqueue(rd.id, rd.path, retries=2)
    w = subprocess.Popen([sys.executable, "-m", "gpctl", "--home", str(home), "worker", "--idle-exit", "2"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    w.wait(timeout=180)
    job = store.get(rd.id)
    assert (job.state, job.attempts) == ("failed", 3)
    hist = store.attempts(job.id)
    assert [(a["attempt"], a["state"]) for a in hist] == [(1, "failed"), (2, "failed"), (3, "failed")]
    assert all("CIFAR-5m" in a["error"] or "cifar" in a["error"].lower() for a in hist), hist
    assert [e["attempt"] for e in rd.events()[0] if e["event"] == "retry"] == [1, 2]


def test_a_diverged_run_is_never_retried(tmp_path):
    """The retry policy is for failures, not for a loss that became NaN."""
    from engine.launch.worker import Running, Worker
    home = tmp_path / "home"
    rd = RunDir.create(home, tiny(TINY_IMAGES, "steps=2"))
    store = JobStore(home)
    store.enqueue(rd.id, rd.path, retries=3)
    w = Worker(home)
    job = store.claim(w.id, w.host, None)
    rd.write_status(state="diverged", error="loss is nan")
    w._record_end(Running(job, [], None, 0), 1)
    assert (store.get(rd.id).state, store.get(rd.id).attempts) == ("diverged", 1)
    rd.write_status(state="running")                               # negative control: a failure is retried
    store.enqueue(rd.id, rd.path)
    job = store.claim(w.id, w.host, None)
    store.update(job.id, retries=3)
    w._record_end(Running(store.get_id(job.id), [], None, 0), 1)
    assert (store.get(rd.id).state, store.get(rd.id).resume) == ("queued", 1)


def test_a_group_plots_as_the_mean_of_its_seeds_with_a_band(tmp_path):
    import numpy as np

    from engine.analysis.curves import train_curve
    from engine.train.loop import train
    from gpctl.figures import seed_band
    home = tmp_path / "home"
    res = invoke(home, "run", "preset", "demo", "--arm", "bs512", "--seeds", "3", "--no-worker",
                 "--set", "steps=6", "--set", "model.width=2", "--set", "data.eval_samples=64", "--set", "eval_every=3",
                 "--set", "checkpoint_every=0")
    assert res.exit_code == 0, res.output
    rds = list_runs(home)
    for rd in rds:
        assert train(rd) == "done"
    rows = json.loads(invoke(home, "ls", "--json", "--group", "demo.bs512").stdout)
    assert sorted(r["id"] for r in rows) == sorted(rd.id for rd in rds) and {r["group"] for r in rows} == {"demo.bs512"}
    curves = [train_curve(rd, "step", 0.0) for rd in rds]
    xs, lo, mid, hi = seed_band(curves)
    ys = np.stack([c[1] for c in curves])
    assert list(xs) == [1, 2, 3, 4, 5, 6]
    assert np.allclose(mid, ys.mean(0)) and np.allclose(lo, ys.min(0)) and np.allclose(hi, ys.max(0))
    assert not np.allclose(lo, hi)                          # the seeds differ: the band is not a line
    res = invoke(home, "plot", "demo.bs512", "--mean", "--out", str(tmp_path / "m.png"))
    assert res.exit_code == 0 and (tmp_path / "m.png").stat().st_size > 1000, res.output


def test_a_gpu_worker_packs_jobs_by_free_memory_and_never_starts_one_that_would_not_fit(tmp_path, monkeypatch):
    """Issue 16: with --jobs-per-gpu N, place by free GPU memory (NVML) as well as by count. NVML is
    stood in for by a table of free GiB; the jobs' processes by a stub (no GPU here)."""
    import os

    import engine.launch.worker as wm

    class Proc:
        def __init__(self, cmd, **kw):
            self.pid, self.env = os.getpid(), kw["env"]

        def poll(self):
            return None
    monkeypatch.setattr(wm.subprocess, "Popen", Proc)

    def place(free):
        home = tmp_path / f"home{len(list(tmp_path.iterdir()))}"
        store = JobStore(home)
        rds = {}
        for name, gib in (("a", 30), ("b", 30), ("c", 15), ("d", 15)):
            rds[name] = RunDir.create(home, tiny(TINY_IMAGES, "steps=2", f"gpu_memory={gib}", name=name))
            store.enqueue(rds[name].id, rds[name].path)
        w = wm.Worker(home, gpus=["0", "1"], jobs_per_gpu=3, free_memory=lambda: dict(free) if free else None)
        w.fill()
        return {n: (store.get(rd.id).state, store.get(rd.id).devices) for n, rd in rds.items()}
    got = place({"0": 40.0, "1": 20.0})
    assert got == {"a": ("running", "0"), "b": ("queued", None), "c": ("running", "1"), "d": ("queued", None)}
    counted = place(None)                # negative control: without NVML, by count only: all four start
    assert [s for s, _ in counted.values()] == ["running"] * 4
