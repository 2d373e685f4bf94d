"""How long a run's plan takes (what `gpctl presets check` and `gpctl run --dry-run` compute), at sizes
no test trains: 10^9 steps, 20,000 planned changes. The baseline in the same run is the stepped
loop (every step iterated: what the plan cost before issue 31), at a size it can finish.

    python benchmarks/plan_speed.py
"""
import time

from engine import plan as planmod
from engine.config import Change
from engine.presets import load_preset


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def check_many() -> float:
    """`gpctl presets check` on demo with 20,000 planned changes, in this process (no start-up)."""
    import tempfile
    from pathlib import Path

    from typer.testing import CliRunner

    from gpctl.cli import app
    src = (Path(__file__).resolve().parents[1] / "presets" / "demo.toml").read_text()
    src = src.replace("steps = 200 ", "steps = 2000000 ", 1)
    a, b = src.index("[[runs.bs32to512.changes]]"), src.index("[runs.bs512]")
    changes = "".join(f"[[runs.bs32to512.changes]]\nat_step = {50 * (k + 1)}\nbatch_size = {512 if k % 2 == 0 else 256}\n\n"
                      for k in range(20_000))
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "many.toml"
        p.write_text(src[:a] + changes + src[b:])
        t = time.perf_counter()
        res = CliRunner().invoke(app, ["presets", "check", str(p)])
        secs = time.perf_counter() - t
    assert "presets pass" in res.stdout, res.output[-500:]
    return secs


def main() -> None:
    base = load_preset("demo").configs()[0]
    rows = []
    for label, over in (("10^9 steps", {"steps": 10 ** 9}),
                        ("20,000 changes over 10^6 steps", {"steps": 10 ** 6, "changes": [
                            Change(at_step=50 * (i + 1), lr=0.05 if i % 2 else 0.01) for i in range(20_000)]})):
        cfg = base.__class__(**{**vars(base), **over})
        planmod._PLANS.clear()
        rows.append((label, timed(lambda: planmod._plan(cfg)), cfg))
    stepped = base.__class__(**{**vars(base), "steps": 200_000})
    closed = timed(lambda: planmod._plan(stepped))
    saved, planmod.JUMP = planmod.JUMP, 10 ** 18
    try:
        loop = timed(lambda: planmod._plan(stepped))
    finally:
        planmod.JUMP = saved
    for label, secs, _ in rows:
        print(f"plan, {label}: {secs * 1000:.1f} ms (goal < 1000 ms)")
    print(f"gpctl presets check, a preset of 20,000 changes (1.2 MB of TOML): {check_many() * 1000:.0f} ms "
          f"(goal < 1000 ms; parsing and validating the TOML is most of it)")
    print(f"plan, 200,000 steps: {closed * 1000:.2f} ms in closed form vs {loop * 1000:.0f} ms stepped "
          f"(ratio {loop / closed:.0f}x; stepped 10^9 steps would take ~{loop * 5000 / 60:.0f} min)")


if __name__ == "__main__":
    main()
