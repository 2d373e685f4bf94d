"""What following TV live costs the training it watches (issue 30), on this machine's CPU.

    python benchmarks/tv_follow.py [--steps 120] [--every 20] [--width 8] [--eval-samples 512]

A reference run B is trained first (checkpoints every `--every` steps). Then the same config with
another seed is trained twice, in this process, alternating which goes first: once alone, and once
while `gpctl tv RUN B --match-loss --follow` (its own niced process, one evaluation at a time)
computes the TV of each checkpoint it writes. Reported: the training's seconds per step in each
case (from its records' wall clock), their ratio (the cost of following), the follow's own CPU
seconds per checkpoint pair, and whether its rows equal `gpctl tv`'s afterwards.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.config import build  # noqa: E402
from engine.store.rundir import RunDir  # noqa: E402
from engine.train.loop import train  # noqa: E402


def config(args, seed: int, name: str):
    return build({"name": name, "preset": "tvfollow", "steps": args.steps, "lr": 0.05, "batch_size": 32,
                  "eval_every": args.every, "checkpoint_every": args.every, "log_every": 10, "device": "cpu",
                  "seed": seed, "model": {"name": "resnet18", "width": args.width},
                  "data": {"source": "synthetic_images", "image_size": 32, "eval_samples": args.eval_samples,
                           "teacher_width": 8}}, "<benchmark>")


def step_time(rd: RunDir) -> float:
    recs = rd.train_records()
    a, b = recs[len(recs) // 5], recs[-1]          # past the first fifth: warm
    return (b["wall"] - a["wall"]) / (b["step"] - a["step"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--every", type=int, default=20)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--eval-samples", type=int, default=512)
    ap.add_argument("--pairs", type=int, default=2)
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="tvfollow-"))
    gpctl = [sys.executable, "-m", "gpctl", "--home", str(home)]
    ref = RunDir.create(home, config(args, 0, "ref"), run_id="ref")
    assert train(ref) == "done"
    alone, followed, cpu_per_pair, equal = [], [], [], []
    for k in range(args.pairs):
        for watched in ((False, True) if k % 2 == 0 else (True, False)):
            rd = RunDir.create(home, config(args, 1, "run"), run_id=f"run{k}{'f' if watched else 'a'}")
            proc = None
            if watched:
                rd.write_status(state="running", pid=os.getpid())   # what follow watches for while it trains
                proc = subprocess.Popen(gpctl + ["tv", rd.id, "ref", "--match-loss", "--follow", "--poll", "1",
                                                 "--json", "--max-gap", "0"], stdout=subprocess.PIPE, text=True)
                time.sleep(3)                                        # it has loaded torch and looked once
            assert train(rd) == "done"
            (followed if watched else alone).append(step_time(rd))
            if proc is not None:
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                lines = proc.communicate(timeout=600)[0].splitlines()
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                rows = [json.loads(x) for x in lines if '"tv"' in x]
                cpu_per_pair.append((after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
                                    / max(1, len(rows)))
                whole = json.loads(subprocess.run(gpctl + ["tv", rd.id, "ref", "--match-loss", "--json", "--max-gap",
                                                           "0"], capture_output=True, text=True).stdout)["pairs"]
                latest = {r["step_a"]: (r["step_b"], r["tv"]) for r in rows}
                equal.append(latest == {r["step_a"]: (r["step_b"], r["tv"]) for r in whole})
    ratio = sum(followed) / sum(alone)
    print(json.dumps({"steps": args.steps, "checkpoint_every": args.every, "width": args.width,
                      "eval_samples": args.eval_samples, "cpus": os.cpu_count(),
                      "s_per_step_alone": alone, "s_per_step_followed": followed,
                      "ratio_followed_over_alone": round(ratio, 4),
                      "follow_cpu_s_per_pair (whole process, torch start included)": [round(c, 2) for c in cpu_per_pair],
                      "follow_rows_equal_gpctl_tv": equal}, indent=1))


if __name__ == "__main__":
    main()
