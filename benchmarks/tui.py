"""TUI speed: a plot frame with 20 runs × 100k points, and start-up with 100 runs × 50k steps.

    python benchmarks/tui.py [--runs 20 --points 100000] [--startup-runs 100 --startup-steps 50000]
                             [--key-runs 100 --key-steps 5000 --key-writers 10]

Frame: what the TUI does per redraw (EMA of each series, cached and extended; min/max per pixel
column; braille rows) on a 150×40-cell plot. Widgets: the same series drawn by gpctl's renderer,
textual-plotext and textual-plot (when installed; neither is a dependency), with every point and
with our downsample first.
Start-up: run directories whose metrics.jsonl have 50k step records each; the time from creating
the app to its first full table and plot (Textual's headless test driver, 160×48).
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from textual.app import App

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.config import build  # noqa: E402
from engine.store.rundir import RunDir  # noqa: E402
from gpctl.tui.widgets.plot import render  # noqa: E402


def _series(runs: int, points: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    x = np.arange(points, dtype=float)
    return [(x, 2 + np.exp(-x / (points / 5)) + 0.05 * rng.standard_normal(points)) for _ in range(runs)]


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def frame(runs: int, points: int, repeats: int = 5) -> float:
    """The TUI's own frame: each series' EMA (cached, extended with new points only), min/max per
    pixel column and the braille rows, for a 150x40-cell plot."""
    from gpctl.tui.data import RunTail

    series = _series(runs, points)
    tails = []
    for x, y in series:   # RunTails filled in memory, as after their first poll
        t = RunTail(None)
        t._train = {"step": x.tolist(), "samples": (x * 32).tolist(), "lr_time": x.tolist(),
                    "wall": (x / 10).tolist(), "loss": y.tolist()}
        tails.append(t)
    for t in tails:
        t.series("step", 0.8)   # first EMA: computed once per run (then only new points)
    ours = _median_ms(lambda: render([(*t.series("step", 0.8), "cyan") for t in tails], 150, 40), repeats)
    print(f"frame, {runs} runs x {points} points, 150x40 cells (EMA 0.8 + min/max columns + braille): "
          f"{ours:.1f} ms (median of {repeats}; goal <= 50 ms)")
    return ours


def widgets(runs: int, points: int, repeats: int = 3) -> None:
    """The plotting widgets the issue names, each drawing the same series into a 150x40 area:
    given every point (naive), and given our 2-points-per-pixel-column downsample."""
    from gpctl.tui.widgets.plot import column_minmax

    series = _series(runs, points)
    x0, x1 = 0.0, float(points - 1)
    down = []
    for x, y in series:
        lo, hi = column_minmax(x, y, x0, x1, 300)
        xs = np.repeat(np.linspace(x0, x1, 300), 2)
        down.append((xs, np.column_stack([lo, hi]).ravel()))
    rows = [("gpctl braille renderer (min/max columns built in)",
             lambda: render([(x, y, "cyan") for x, y in series], 150, 40), None)]
    try:
        from textual_plotext.plotext_plot import Plot as PlotextPlot

        def plotext(data):
            def go():
                p = PlotextPlot()
                p.plotsize(150, 40)
                for x, y in data:
                    p.plot(x.tolist(), y.tolist(), marker="braille")
                p.build()
            return go
        rows += [("textual-plotext, every point", plotext(series), None),
                 ("textual-plotext, downsampled first", plotext(down), None)]
    except ImportError:
        print("textual-plotext not installed: skipped")
    try:
        from textual_plot import HiResMode, PlotWidget

        def textual_plot(data):
            async def go():
                class Bench(App):
                    def compose(self):
                        yield PlotWidget()
                app = Bench()
                async with app.run_test(size=(150, 40)) as pilot:
                    w = app.query_one(PlotWidget)
                    await pilot.pause()
                    t0 = time.perf_counter()
                    for x, y in data:
                        w.plot(x, y, hires_mode=HiResMode.BRAILLE)
                    w._needs_rerender = True
                    w.render()                      # draws every dataset onto its canvas
                    return time.perf_counter() - t0
            return lambda: asyncio.run(go())
        rows += [("textual-plot, every point", None, textual_plot(series)),
                 ("textual-plot, downsampled first", None, textual_plot(down))]
    except ImportError:
        print("textual-plot not installed: skipped")
    base = None
    for name, fn, timed in rows:
        n = 1 if "every point" in name else repeats   # tens of seconds each: once is enough
        ms = _median_ms(fn, n) if fn else statistics.median(timed() for _ in range(n)) * 1e3
        base = base or ms
        print(f"  {name:<52} {ms:9.1f} ms  ({ms / base:6.1f}x)")


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
                assert len(app.table.run_ids) == runs and app.plot.series
                return time.perf_counter() - t0

        took = asyncio.run(go())
        print(f"start-up, {runs} runs x {steps} steps ({size_mb:.0f} MB of records): {took:.2f} s (goal <= 2 s)")


def keys(runs: int, steps: int, writers: int, presses: int = 60) -> None:
    """Key -> redraw: `runs` runs of `steps` records, `writers` of them appending a record every
    0.1 s (as training jobs do), the TUI polling live (0.2 s); the time from each key press (x, e,
    o, O) until the status line shows its effect (read every 2 ms), 95th percentile."""
    import threading

    from textual import events

    from gpctl.tui.app import GpctlApp

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        cfg = build({"name": "arm", "preset": "bench", "steps": 10 * steps, "device": "cpu",
                     "model": {"name": "resnet18", "width": 2}}, "bench")
        line = '{{"step": {s}, "samples": {n}, "lr_time": {s}.0, "wall": {w:.3f}, "lr": 0.05, "batch_size": 512, "loss": {l:.6f}}}\n'
        rds = []
        for r in range(runs):
            rd = RunDir.create(home, cfg)
            with open(rd.metrics_file, "w") as f:
                f.write("".join(line.format(s=s, n=512 * s, w=s * 0.1, l=2.3 - s / steps) for s in range(1, steps + 1)))
            rd.write_status(state="running" if r < writers else "done", step=steps)
            rds.append(rd)
        stop = threading.Event()

        def write(rd: RunDir) -> None:
            s = steps
            while not stop.is_set():
                s += 1
                rd.append_metrics([{"step": s, "samples": 512 * s, "lr_time": float(s), "wall": s * 0.1, "lr": 0.05,
                                    "batch_size": 512, "loss": 2.3 - s / (10 * steps)}])
                rd.write_status(step=s, durable=False)
                time.sleep(0.1)

        ui = []   # the UI thread's share of each refresh: apply_rows (filter, sort, table cells, plot, events)

        async def go() -> list[float]:
            app = GpctlApp(home, poll=0.2)
            lat = []
            apply = app.apply_rows

            def timed(rows):
                t = time.perf_counter()
                apply(rows)
                ui.append(time.perf_counter() - t)
            app.apply_rows = timed
            async with app.run_test(size=(160, 48)) as pilot:
                await pilot.pause(1.0)
                threads = [threading.Thread(target=write, args=(rd,), daemon=True) for rd in rds[:writers]]
                for t in threads:
                    t.start()
                await pilot.pause(1.0)
                status = app.query_one("#status")
                for i in range(presses):
                    before = status.render().plain
                    t0 = time.perf_counter()
                    app.post_message(events.Key("xeoO"[i % 4], "xeoO"[i % 4]))
                    while status.render().plain == before and time.perf_counter() - t0 < 10:
                        await asyncio.sleep(0.002)
                    lat.append((time.perf_counter() - t0, "xeoO"[i % 4]))
                    await asyncio.sleep(0.05)
                stop.set()
            return lat

        pairs = asyncio.run(go())
        lat = sorted(t for t, _ in pairs)
        p95 = lat[int(0.95 * (len(lat) - 1))] * 1e3
        per_key = {k: sorted(t for t, kk in pairs if kk == k) for k in "xeoO"}
        print(f"key -> redraw, {runs} runs x {steps} steps, {writers} writing: p95 {p95:.1f} ms, "
              f"median {statistics.median(lat) * 1e3:.1f} ms over {len(lat)} presses (goal p95 <= 50 ms)")
        ui.sort()
        print(f"  UI thread per refresh (apply_rows): median {statistics.median(ui) * 1e3:.1f} ms, "
              f"p95 {ui[int(0.95 * (len(ui) - 1))] * 1e3:.1f} ms over {len(ui)} refreshes (goal <= 5 ms)")
        print("  per key, median / max ms: " + ", ".join(
            f"{k} {statistics.median(v) * 1e3:.0f} / {v[-1] * 1e3:.0f}" for k, v in per_key.items()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--points", type=int, default=100_000)
    ap.add_argument("--startup-runs", type=int, default=100)
    ap.add_argument("--startup-steps", type=int, default=50_000)
    ap.add_argument("--no-widgets", action="store_true", help="skip the textual-plot / textual-plotext comparison")
    ap.add_argument("--key-runs", type=int, default=100)
    ap.add_argument("--key-steps", type=int, default=5000)
    ap.add_argument("--key-writers", type=int, default=10)
    args = ap.parse_args()
    frame(args.runs, args.points)
    if not args.no_widgets:
        print(f"plotting widgets, {args.runs} runs x {args.points} points, 150x40 cells:")
        widgets(args.runs, args.points)
    if args.startup_runs:
        startup(args.startup_runs, args.startup_steps)
    if args.key_runs:
        keys(args.key_runs, args.key_steps, args.key_writers)


if __name__ == "__main__":
    main()
