"""A soak: N tiny jobs through one worker, its RSS, open files and each freed slot's wait sampled.

    python benchmarks/soak.py [--jobs 1000] [--cpu-slots 2] [--json OUT]

Each job is a real run (`python -m engine train`, ResNet-18 at width 2, one step on synthetic
images), queued as `gpctl run` queues it. While the worker runs them, its resident memory and open
file descriptors are read from /proc every second. At the end:

- lost or doubled: every job must be `done` after exactly one attempt, with exactly one training
  record and one `end` event in its run directory;
- worker RSS growth: the last sample less the sample after the first `--warm` jobs ended (imports
  and SQLite's page cache settle in the first ones);
- fds: the spread of the open-descriptor count over the samples taken while jobs ran;
- slot wait: from each job's end (its final status write) to the claim of the job that took its
  slot (all jobs are queued before the worker starts: the k-th end's slot goes to the (k+slots)-th
  claim).
Linux only (/proc).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.config import build  # noqa: E402
from engine.store.jobs import JobStore  # noqa: E402
from engine.store.rundir import RunDir  # noqa: E402

CFG = {"steps": 1, "eval_every": 0, "checkpoint_every": 0, "batch_size": 4, "device": "cpu",
       "model": {"name": "resnet18", "width": 2},
       "data": {"source": "synthetic_images", "image_size": 8, "eval_samples": 8, "teacher_width": 4}}


def proc_sample(pid: int) -> tuple[float, int] | None:
    """(RSS in MB, open fds) of `pid`, or None once it is gone."""
    try:
        rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                   if line.startswith("VmRSS:"))
        return rss / 1024, len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, StopIteration):
        return None


def soak(jobs: int, cpu_slots: int, warm: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        store = JobStore(home)
        for i in range(jobs):
            rd = RunDir.create(home, build(dict(CFG, name=f"s{i}", preset="soak"), "soak"))
            store.enqueue(rd.id, rd.path)
        t0 = time.time()
        worker = subprocess.Popen([sys.executable, "-m", "gpctl", "--home", str(home), "worker",
                                   "--cpu-slots", str(cpu_slots), "--idle-exit", "2"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        samples: list[tuple[float, float, int, int]] = []   # (time, RSS MB, fds, jobs done so far)
        while worker.poll() is None:
            s = proc_sample(worker.pid)
            if s:
                done = sum(1 for _ in store.jobs(state="done"))
                samples.append((time.time(), s[0], s[1], done))
            time.sleep(1.0)
        err = worker.stderr.read()
        total = time.time() - t0
        rows = store.jobs()
        bad = []
        for j in rows:
            rd = RunDir(Path(j.run_dir))
            metrics = sum(1 for r in rd.metrics()[0] if "loss" in r)   # train records (the end's eval is another)
            ends = sum(1 for e in rd.events()[0] if e.get("event") == "end")
            if j.state != "done" or j.attempts != 1 or metrics != 1 or ends != 1:
                bad.append((j.run_id, j.state, j.attempts, metrics, ends))
        ended = sorted(RunDir(Path(j.run_dir)).status().get("ended", 0.0) for j in rows)
        started = sorted(j.started for j in rows)
        # every job was queued before the worker started: the k-th end frees the slot that the
        # (k + slots)-th claim fills
        waits = [b - e for e, b in zip(ended, started[cpu_slots:])]
        warm_at = next((i for i, s in enumerate(samples) if s[3] >= warm), 0)
        busy = [s for s in samples if s[3] < jobs]
        return {
            "jobs": jobs, "cpu_slots": cpu_slots, "seconds": round(total, 1),
            "lost_or_doubled": len(bad), "bad": bad[:10], "worker_exit": worker.returncode,
            "worker_stderr": err.strip().splitlines()[-3:],
            "rss_mb_after_warm": round(samples[warm_at][1], 1) if samples else None,
            "rss_mb_last": round(samples[-1][1], 1) if samples else None,
            "rss_growth_mb": round(samples[-1][1] - samples[warm_at][1], 2) if samples else None,
            "fds_min": min(s[2] for s in busy) if busy else None,
            "fds_max": max(s[2] for s in busy) if busy else None,
            "fds_first_last": [busy[0][2], busy[-1][2]] if busy else None,
            "slot_wait_ms_median": round(statistics.median(waits) * 1e3) if waits else None,
            "slot_wait_ms_p95": round(statistics.quantiles(waits, n=20)[-1] * 1e3) if len(waits) >= 20 else None,
            "samples": len(samples),
        }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--cpu-slots", type=int, default=2)
    ap.add_argument("--warm", type=int, default=20, help="jobs ended before RSS growth is counted")
    ap.add_argument("--json", type=Path, help="write the result here too")
    args = ap.parse_args()
    r = soak(args.jobs, args.cpu_slots, min(args.warm, max(1, args.jobs // 2)))
    print(f"{r['jobs']} jobs on {r['cpu_slots']} CPU slot(s): {r['seconds']} s; lost or doubled: "
          f"{r['lost_or_doubled']}; worker RSS {r['rss_mb_after_warm']} -> {r['rss_mb_last']} MB "
          f"(growth {r['rss_growth_mb']} MB); open fds {r['fds_min']}..{r['fds_max']} "
          f"(first {r['fds_first_last'][0]}, last {r['fds_first_last'][1]}); freed slot waits: median "
          f"{r['slot_wait_ms_median']} ms, p95 {r['slot_wait_ms_p95']} ms")
    if r["bad"]:
        print("not done exactly once:", r["bad"])
    if args.json:
        args.json.write_text(json.dumps(r, indent=1))
    sys.exit(1 if r["lost_or_doubled"] else 0)


if __name__ == "__main__":
    main()
