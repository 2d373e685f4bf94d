"""TUI speed: a plot frame with 20 runs × 100k points, and start-up with 100 runs × 50k steps.

    python benchmarks/tui.py [--runs 20 --points 100000] [--startup-runs 100 --startup-steps 50000]

Frame: gpctl's braille renderer (min/max per pixel column) on a 150×40-cell plot, against plotext
drawing the same series naively (when plotext is installed; it is not a dependency).
Start-up: run directories whose metrics.jsonl have 50k step records each; the time from creating
the app to its first full table and plot (Textual's headless test driver, 160×48).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.config import build  # noqa: E402
from engine.rundir import RunDir  # noqa: E402
from gpctl.tui.widgets.plot import render  # noqa: E402


def frame(runs: int, points: int, repeats: int = 5) -> None:
    rng = np.random.default_rng(0)
    x = np.arange(points, dtype=float)
    series = [(x, 2 + np.exp(-x / (points / 5)) + 0.05 * rng.standard_normal(points), "cyan") for _ in range(runs)]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        render(series, 150, 40)
        times.append(time.perf_counter() - t0)
    ours = statistics.median(times)
    print(f"frame, {runs} runs x {points} points, 150x40 cells: {ours * 1e3:.1f} ms (median of {repeats}; goal <= 50 ms)")
    try:
        import plotext as plt
        plt.clear_figure
    except (ImportError, AttributeError):
        print("plotext (with the classic plot/build API) not installed: no naive baseline")
        return
    t0 = time.perf_counter()
    plt.clear_figure()
    plt.plotsize(150, 40)
    for _, y, _ in series:
        plt.plot(x.tolist(), y.tolist())
    plt.build()
    naive = time.perf_counter() - t0
    print(f"plotext, same series, no downsampling: {naive * 1e3:.0f} ms ({naive / ours:.0f}x slower)")


def startup(runs: int, steps: int) -> None:
    from gpctl.tui.app import GpctlApp

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        cfg = build({"name": "arm", "preset": "bench", "steps": steps, "device": "cpu",
                     "model": {"name": "resnet18", "width": 2}}, "bench")
        line = '{{"step": {s}, "samples": {n}, "lr_time": {s}.0, "wall": {w:.3f}, "lr": 0.05, "batch_size": 512, "loss": {l:.6f}}}\n'
        for r in range(runs):
            rd = RunDir.create(home, cfg)
            with open(rd.metrics_file, "w") as f:
                f.write("".join(line.format(s=s, n=512 * s, w=s * 0.1, l=2.3 - s / steps) for s in range(1, steps + 1)))
            rd.write_status(state="done", step=steps)
        size_mb = sum(p.stat().st_size for p in home.rglob("metrics.jsonl")) / 2**20

        async def go() -> float:
            t0 = time.perf_counter()
            app = GpctlApp(home, live=False)
            async with app.run_test(size=(160, 48)) as pilot:
                await pilot.pause()
                assert app.table.row_count == runs and app.plot.series
                return time.perf_counter() - t0

        took = asyncio.run(go())
        print(f"start-up, {runs} runs x {steps} steps ({size_mb:.0f} MB of records): {took:.2f} s (goal <= 2 s)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--points", type=int, default=100_000)
    ap.add_argument("--startup-runs", type=int, default=100)
    ap.add_argument("--startup-steps", type=int, default=50_000)
    args = ap.parse_args()
    frame(args.runs, args.points)
    startup(args.startup_runs, args.startup_steps)


if __name__ == "__main__":
    main()
