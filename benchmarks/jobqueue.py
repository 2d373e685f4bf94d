"""The queue's costs: enqueueing 1000 jobs, and how long a freed slot waits for its next job.

    python benchmarks/queue.py [--enqueue 1000] [--jobs 8]

1. 1000 enqueues into a fresh jobs.db (one transaction each, as `gpctl run` does them).
2. A worker with one CPU slot runs `--jobs` one-step jobs; the slot's wait is the time from a job's
   end (its trainer's final status write; the process exits right after) to the next job's claim:
   process exit + the worker noticing it (poll interval) + the claim. Python's start-up is not in it.
"""
from __future__ import annotations

import argparse
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--enqueue", type=int, default=1000)
    ap.add_argument("--jobs", type=int, default=8)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store = JobStore(root / "bulk")
        t0 = time.perf_counter()
        for i in range(args.enqueue):
            store.enqueue(f"job-{i}", root / f"job-{i}")
        dt = time.perf_counter() - t0
        t0 = time.perf_counter()
        claimed = 0
        while store.claim("bench", "host", None):
            claimed += 1
        dc = time.perf_counter() - t0
        print(f"enqueue {args.enqueue} jobs: {dt:.3f} s ({dt / args.enqueue * 1e3:.2f} ms each); "
              f"claim them all: {dc:.3f} s ({dc / max(claimed, 1) * 1e3:.2f} ms each)")

        home = root / "home"
        cfg = {"steps": 1, "eval_every": 0, "batch_size": 4, "device": "cpu", "model": {"name": "resnet18", "width": 2},
               "data": {"source": "synthetic_images", "image_size": 8, "eval_samples": 8, "teacher_width": 4}}
        store = JobStore(home)
        for i in range(args.jobs):
            rd = RunDir.create(home, build(dict(cfg, name=f"j{i}", preset="bench"), "bench"))
            store.enqueue(rd.id, rd.path)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "gpctl", "--home", str(home), "worker", "--cpu-slots", "1",
                        "--idle-exit", "1"], check=True, capture_output=True)
        total = time.perf_counter() - t0
        jobs = sorted(store.jobs(), key=lambda j: j.started)
        assert all(j.state == "done" for j in jobs), [(j.run_id, j.state) for j in jobs]
        # a job's end: when its trainer wrote its final status (the process exits right after)
        ends = [RunDir(Path(j.run_dir)).status()["ended"] for j in jobs]
        waits = [b.started - end for end, b in zip(ends, jobs[1:])]
        print(f"{args.jobs} one-step jobs on one CPU slot: {total:.1f} s in all "
              f"({statistics.mean(j.ended - j.started for j in jobs):.2f} s per job, mostly Python + torch start-up)")
        print(f"freed slot waits for its next job: median {statistics.median(waits) * 1e3:.0f} ms, "
              f"max {max(waits) * 1e3:.0f} ms (worker poll interval 200 ms)")


if __name__ == "__main__":
    main()
