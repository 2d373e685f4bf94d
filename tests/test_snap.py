"""Issue 30: `gpctl snap RUN`: the changed run's held-out curve after T0 fitted as a translation of the
reference's, judged against the gap before T0, with a never-changed run as the negative control.
Checked on runs whose curves are made by hand, so the true shift is known, against an independent
brute-force fit in NumPy."""
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from engine.presets import load_preset
from engine.store.rundir import RunDir
from gpctl.cli import app

XS = np.arange(0, 401, 10)
T0, TAU = 100, 50


def low(x):                       # the low-noise (reference) curve
    return 2.0 * np.exp(-np.asarray(x, float) / 100) + 0.5


def high(x):                      # high noise: the same curve at half the speed
    return low(np.asarray(x, float) * 0.5)


def make(home, name, ys, change=None, arm=None):
    cfg = load_preset("demo").configs()[0 if arm is None else ["bs32to512", "bs512", "bs512_seed2"].index(arm)]
    rd = RunDir.create(home, cfg, run_id=name)
    rd.append_metrics([{"step": int(x), "samples": int(x) * 32, "lr_time": float(x), "wall": x * 0.01,
                        "eval_loss": float(y)} for x, y in zip(XS, ys)])
    if change:
        rd.append_event("schedule", source="preset", change=0, changed=change, step=T0, lr_time=float(T0), samples=T0 * 32)
    return rd


def runs(home):
    dropped = np.where(XS <= T0, high(XS), low(XS - TAU))      # after T0: the low curve shifted right by 50
    return (make(home, "dropped", dropped, {"batch_size": [32, 512]}),
            make(home, "ref", low(XS)),
            make(home, "never", high(XS)),                         # the control: never changed
            make(home, "stuck", high(XS), {"batch_size": [32, 512]}))   # changed, but did not follow


def brute(xd, yd, xr, yr, t0):
    """An independent fit: the shift in [0, t0] (step 0.25) with the least RMS residual after t0."""
    after = xd > t0
    best = min((np.sqrt(np.mean((yd[after] - np.interp(xd[after] - tau, xr, yr)) ** 2)), tau)
               for tau in np.arange(0, t0 + 0.01, 0.25) if ((xd[after] - tau) >= xr[0]).all())
    return best[1], best[0]


def test_snap_finds_the_shift_an_independent_fit_finds_and_the_control_does_not_snap(tmp_path):
    home = tmp_path / "home"
    dropped, ref, never, stuck = runs(home)
    r = CliRunner()
    res = r.invoke(app, ["--home", str(home), "snap", "dropped", "--ref", "ref", "--control", "never", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    tau, resid = brute(XS.astype(float), np.where(XS <= T0, high(XS), low(XS - TAU)), XS.astype(float), low(XS), T0)
    assert tau == 50.0 and resid < 1e-12                          # the independent fit finds the true shift
    assert out["verdict"] == "snapped" and abs(out["tau"] - tau) <= 0.25 and out["ratio"] < 0.01
    gap = np.sqrt(np.mean((high(XS[XS <= T0]) - low(XS[XS <= T0])) ** 2))
    assert out["gap_before"] == pytest.approx(gap)
    assert out["at"] == 110 and out["direction"] == "drop"      # the first eval after T0 already on the curve
    ctl = out["control"]
    assert ctl["run"] == "never" and not ctl["fits"] and ctl["ratio"] > 0.25
    # the control's ratio by the same independent fit: its best shift leaves a residual above a quarter of the gap
    ctau, cres = brute(XS.astype(float), high(XS), XS.astype(float), low(XS), T0)
    assert ctl["ratio"] == pytest.approx(cres / gap, rel=0.05)
    res = r.invoke(app, ["--home", str(home), "snap", "dropped", "--ref", "ref", "--control", "never"])
    assert res.stdout.strip() == (f"dropped: snapped to ref shifted right by {out['tau']:.1f} step at T0 + 10 step "
                                  f"(residual {out['ratio']:.2g} of the pre-T0 gap; control never {ctl['ratio']:.2g})")
    # negative control: a run whose change had no effect has not snapped
    res = r.invoke(app, ["--home", str(home), "snap", "stuck", "--ref", "ref", "--control", "never", "--json"])
    assert json.loads(res.stdout)["verdict"] == "not yet"
    # a run with no change yet
    res = r.invoke(app, ["--home", str(home), "snap", "never", "--ref", "ref"])
    assert res.stdout.strip() == "never: no noise change has taken effect yet"


def test_snap_defaults_to_the_presets_reference_and_says_when_there_is_no_control(tmp_path):
    home = tmp_path / "home"
    dropped = make(home, "demo-bs32to512-aaaaaa", np.where(XS <= T0, high(XS), low(XS - TAU)), {"batch_size": [32, 512]},
                   arm="bs32to512")
    make(home, "demo-bs512-bbbbbb", low(XS), arm="bs512")
    res = CliRunner().invoke(app, ["--home", str(home), "snap", dropped.id])
    assert res.exit_code == 0, res.output
    line = res.stdout.strip()
    assert line.startswith(f"{dropped.id}: snapped to demo-bs512-bbbbbb shifted right by 49.9 step at T0 + 10 step")   # the fit's grid: 0.25
    assert line.endswith("; no control: no never-changed run of the same noise)")
    res = CliRunner().invoke(app, ["--home", str(home), "snap", "demo-bs512-bbbbbb"])
    assert res.exit_code == 2 and "is its own reference" in res.stderr
    # the reference's seed baseline (the preset's `baselines`): the fit's residual beside the seed
    # spread, the RMS gap of the two seeds after T0 (here a constant 0.01, by hand), as gpctl figure says it
    seed = make(home, "demo-bs512_seed2-cccccc", low(XS) + 0.01, arm="bs512_seed2")
    out = json.loads(CliRunner().invoke(app, ["--home", str(home), "snap", dropped.id, "--json"]).stdout)
    assert out["seed"] == seed.id and out["seed_spread"] == pytest.approx(0.01, rel=1e-9)
    assert out["verdict"] == "snapped" and out["residual"] < 0.01
    line = CliRunner().invoke(app, ["--home", str(home), "snap", dropped.id]).stdout.strip()
    assert line.endswith("; no control: no never-changed run of the same noise; fit within the seed spread 0.01)")
    # two seeds that agree far better than the fit does: the sentence says how many times, the verdict stays
    make(home, "demo-bs512_seed2-dddddd", low(XS) + 1e-7, arm="bs512_seed2")
    out = json.loads(CliRunner().invoke(app, ["--home", str(home), "snap", dropped.id, "--json"]).stdout)
    assert out["seed"] == "demo-bs512_seed2-dddddd" and out["seed_spread"] == pytest.approx(1e-7, rel=1e-6)
    line = CliRunner().invoke(app, ["--home", str(home), "snap", dropped.id]).stdout.strip()
    assert out["verdict"] == "snapped" and out["residual"] > 1e-7
    assert line.endswith(f"; fit {out['residual'] / 1e-7:.1f}x the seed spread 1e-07)")


def test_the_worker_announces_a_snap_once_and_notifies(tmp_path, monkeypatch):
    """Issue 30's snap notification: the worker fits each running job whose noise changed (at most
    once a minute); once it has snapped, a `snap` event with gpctl snap's sentence and a `snapped`
    notification, once. The reference itself (never changed) is never announced."""
    import json as _json
    import time as _time
    from types import SimpleNamespace

    from engine.analysis.snap import announce
    from engine.launch.worker import Running, Worker
    from engine.store.rundir import run_dir
    from gpctl.runs import measure_snap
    from tests.conftest import fixed_runs
    home = tmp_path / "home"
    fixed_runs(home)
    (home / "settings.toml").write_text(f'notify = "echo $GPCTL_STATE $GPCTL_RUN >> {tmp_path}/said.txt"\n')
    dropped, ref = run_dir(home, "demo-bs32to512-000000"), run_dir(home, "demo-bs512-000001")
    want = measure_snap(home, dropped)
    assert want["verdict"] == "snapped"
    assert announce(ref) is None                                    # the control: it never changed
    w = Worker(home, cpu_slots=1)
    w.snap_every = 0.0
    for rd in (dropped, ref):
        w.running[len(w.running) + 1] = Running(SimpleNamespace(run_dir=str(rd.path), run_id=rd.id), [], None, 0)
    w.check_snaps()
    w.check_snaps()                                                 # said once
    snaps = [e for e in dropped.events()[0] if e["event"] == "snap"]
    assert [(e["sentence"], e["ref"], e["tau"]) for e in snaps] == [(want["sentence"], ref.id, want["tau"])]
    assert [e for e in ref.events()[0] if e["event"] == "snap"] == []
    deadline = _time.monotonic() + 10
    while not (tmp_path / "said.txt").exists() and _time.monotonic() < deadline:
        _time.sleep(0.05)
    _time.sleep(0.2)
    assert (tmp_path / "said.txt").read_text() == f"snapped {dropped.id}\n"
    from engine.control import event_text
    assert event_text(snaps[0]) == want["sentence"]
    assert _json.loads(_json.dumps(snaps[0]))["x"] == "step"
    # the runs table's snap cell (ls and the TUI read the summary): the offset of gpctl snap's `at` from T0
    assert dropped.summary()["snap"] == f"✓+{want['at'] - want['t0']:.0f}"
    assert f"at T0 + {want['at'] - want['t0']:.0f} step" in want["sentence"]
    assert ref.summary()["snap"] == "-"                            # never changed
    w.store.close()


def test_the_snap_cell_says_changed_until_a_snap_event_and_reads_its_axis():
    from engine.store.rundir import snap_cell
    change = {"event": "schedule", "step": 50, "lr_time": 25.0}
    assert snap_cell([]) == "-"
    assert snap_cell([{"event": "start", "step": 0}, {"event": "control", "status": "rejected", "changed": {}}]) == "-"
    assert snap_cell([change]) == "changed"
    assert snap_cell([change, {"event": "snap", "x": "step", "at": 200.0}]) == "✓+150"
    assert snap_cell([change, {"event": "snap", "x": "lr_time", "at": 40.0}]) == "✓+15(lr_time)"
    assert snap_cell([{"event": "snap", "x": "step", "at": 200.0}]) == "✓"     # its change not in the file
    # a snap by the gap rule whose fit is 4x the seed spread says so in the cell; within it, nothing added
    assert snap_cell([change, {"event": "snap", "x": "step", "at": 200.0, "seed_ratio": 4.04}]) == "✓+150(4.0x-seed)"
    assert snap_cell([change, {"event": "snap", "x": "step", "at": 200.0, "seed_ratio": 0.5}]) == "✓+150"
    # hand-edited events: a list for an axis, a string for a step, never a crash of ls or the TUI
    assert snap_cell([change, {"event": "snap", "x": ["step"], "at": 200.0}]) == "✓+150"
    assert snap_cell([change, {"event": "snap", "x": "step", "at": "soon"}]) == "✓"
    assert snap_cell([{"event": "schedule", "step": "x"}, {"event": "snap", "x": "step", "at": 9.0}]) == "✓"


def test_a_changed_run_that_ended_before_its_reference_is_announced_when_the_reference_ends(tmp_path):
    """The demo trains its arms one after the other: the dropped arm ends (in 22 s, before the worker's
    first minute) while its reference has not trained yet. The worker keeps such a run pending and
    looks again whenever one of its jobs ends: once the reference is there, the snap is announced,
    once, with its notification; a never-changed run that ends is not kept."""
    import shutil
    import time as _time
    from types import SimpleNamespace

    from engine.launch.worker import Running, Worker
    from engine.store.rundir import run_dir
    from tests.conftest import fixed_runs
    home = tmp_path / "home"
    fixed_runs(home)
    (home / "settings.toml").write_text(f'notify = "echo $GPCTL_STATE $GPCTL_RUN >> {tmp_path}/said.txt"\n')
    dropped, ref = run_dir(home, "demo-bs32to512-000000"), run_dir(home, "demo-bs512-000001")
    away = tmp_path / "ref-not-trained-yet"
    shutil.move(str(ref.path), str(away))
    w = Worker(home, cpu_slots=1)
    ended = lambda rd: Running(SimpleNamespace(run_dir=str(rd.path), run_id=rd.id), [], None, 0)  # noqa: E731
    w._snap_after_end([ended(dropped)])
    assert list(w.snap_pending) == [str(dropped.path)]
    assert [e for e in dropped.events()[0] if e["event"] == "snap"] == []
    assert dropped.summary()["snap"] == "changed"
    shutil.move(str(away), str(ref.path))                          # the reference has trained
    w._snap_after_end([ended(ref)])                                # ... and its job ended
    assert w.snap_pending == {}                                    # said: no longer pending; ref never was
    snaps = [e for e in dropped.events()[0] if e["event"] == "snap"]
    assert len(snaps) == 1 and snaps[0]["ref"] == ref.id
    assert dropped.summary()["snap"].startswith("✓+")
    w._snap_after_end([ended(dropped)])                            # said before: not kept again
    assert w.snap_pending == {} and len([e for e in dropped.events()[0] if e["event"] == "snap"]) == 1
    deadline = _time.monotonic() + 10
    while not (tmp_path / "said.txt").exists() and _time.monotonic() < deadline:
        _time.sleep(0.05)
    _time.sleep(0.2)
    assert (tmp_path / "said.txt").read_text() == f"snapped {dropped.id}\n"
    w.store.close()
