"""How fast the CLI answers: `gpctl --help`, `gpctl ls` (100 runs) and an enqueue, against a bare
`python -c pass` measured in the same run (goal: each within 0.5 s of it, and under 150 MB).

    python benchmarks/cli.py [--repeats 5]

Each command runs as its own process (as a user types it); time is wall time, memory the child's
peak resident set (ru_maxrss). Prints one line per command: median seconds, seconds over bare, MB.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def measure(cmd: list[str], env: dict, repeats: int) -> tuple[float, float]:
    times, peak = [], 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        pid = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid
        _, status, usage = os.wait4(pid, 0)
        times.append(time.perf_counter() - t)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"{' '.join(cmd)} failed")
        peak = max(peak, usage.ru_maxrss / 1024)   # KiB on Linux
    return statistics.median(times), peak


def fill_home(home: Path, n: int) -> None:
    """n finished-looking runs (config + a few records), made without training."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from engine.presets import load_preset
    from engine.store.rundir import RunDir

    cfg = load_preset("demo").configs()[1]
    for i in range(n):
        rd = RunDir.create(home, cfg, run_id=f"demo-bs512-{i:06x}")
        rd.append_metrics([{"step": s, "samples": 512 * s, "lr_time": float(s), "wall": 0.1 * s, "lr": 0.05,
                            "batch_size": 512, "loss": 2.0 - s / 200} for s in range(1, 201)])
        rd.write_status(state="done")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        fill_home(home, 100)
        env = {**os.environ, "GPCTL_HOME": str(home)}
        bare, bare_mb = measure([py, "-c", "pass"], env, args.repeats)
        print(f"{'python -c pass':<40} {bare:6.3f} s   (baseline)     {bare_mb:6.0f} MB")
        for name, cmd in (("gpctl --help", [py, "-m", "gpctl", "--help"]),
                          ("gpctl ls (100 runs)", [py, "-m", "gpctl", "ls"]),
                          ("gpctl run preset demo --no-worker", [py, "-m", "gpctl", "run", "preset", "demo",
                                                                 "--no-worker"])):
            t, mb = measure(cmd, env, args.repeats)
            print(f"{name:<40} {t:6.3f} s   +{t - bare:5.3f} s over bare   {mb:6.0f} MB")


if __name__ == "__main__":
    main()
