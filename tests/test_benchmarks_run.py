"""The TUI benchmark still runs against the code it measures (a smoke run at toy sizes: it checks
that it completes and reports each goal's line, never the timings, which belong to benchmarks/)."""
import subprocess
import sys

from tests.conftest import REPO


def test_tui_benchmark_runs_at_toy_size(tmp_path):
    out = subprocess.run([sys.executable, "benchmarks/tui.py", "--runs", "2", "--points", "1000", "--startup-runs", "3",
                          "--startup-steps", "100", "--no-widgets", "--key-runs", "3", "--key-steps", "100"],
                         cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "c")})
    assert out.returncode == 0, out.stderr[-2000:]
    heads = [line.split(",")[0].split(" (")[0] for line in out.stdout.splitlines() if not line.startswith(" ")]
    assert heads == ["frame", "start-up", "key -> redraw"], out.stdout
    assert "UI thread per refresh (apply_rows): median" in out.stdout
