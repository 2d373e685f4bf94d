"""Issue 24: `gpctl figure` draws the paper's panels: held-out loss (EMA 0.8) on the figure's axis,
offline early stopping marked, the reference translated onto each changed arm (right for a drop,
left for a raise), or "no fit" and why. Runs here are written with known curves (no training), so
every number is checked against an independent computation from their metrics.jsonl."""
import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from engine.presets import load_preset
from engine.store.rundir import RunDir
from gpctl.cli import app

runner = CliRunner()


def write_run(home, cfg, train, held, error=None, every=5, t0=None, x="step"):
    """A finished run whose train loss is train(step) and held-out loss held(step) every `every` steps;
    a schedule event at t0 (on the x clock) when given. lr_time = step * lr / lr_ref."""
    rd = RunDir.create(home, cfg)
    per = cfg.lr / cfg.lr_ref
    recs = []
    for s in range(1, cfg.steps + 1):
        if cfg.max_lr_time and s * per > cfg.max_lr_time + 1e-9:
            break
        clocks = {"step": s, "samples": s * cfg.batch_size, "lr_time": s * per, "wall": 0.1 * s}
        recs.append(dict(clocks, lr=cfg.lr, batch_size=cfg.batch_size, loss=train(clocks[x])))
        if s % every == 0:
            recs.append(dict(clocks, eval_loss=held(clocks[x]), eval_error=(error or (lambda t: 0.5))(clocks[x])))
    rd.append_metrics(recs)
    if t0 is not None:
        rd.append_event("schedule", source="preset", change=0, changed={"lr": [0, 0]},
                        step=int(t0 / (per if x == "lr_time" else 1)), lr_time=t0 if x == "lr_time" else t0 * per)
    rd.write_status(state="done", step=recs[-1]["step"])
    return rd


def ema(values, coef=0.8):
    out, s = [], None
    for v in values:
        s = v if s is None else coef * s + (1 - coef) * v
        out.append(s)
    return out


def figure_json(home, preset, *extra):
    res = runner.invoke(app, ["--home", str(home), "figure", preset, "--json", *extra])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_the_online_offline_panel_is_held_out_loss_with_early_stopping(tmp_path):
    """The Fig. 3 twin's offline arm overfits: its train loss falls to 0.39 while its held-out loss
    turns back up. The panel must show the held-out curve (the train-loss panel showed the opposite)."""
    home = tmp_path / "home"
    p = load_preset("cifar_online_offline_bs_tiny")
    runs = {}
    for cfg in p.configs():
        if cfg.data.mode == "offline":
            train = lambda s: 0.39 + 2.0 * math.exp(-s / 40)                     # memorizes its subset
            held = lambda s: 1.2 + 1.2 * math.exp(-s / 40) + 0.004 * max(0, s - 120)   # then overfits
        else:
            train = held = lambda s, k=cfg.batch_size: 0.7 + 1.6 * math.exp(-s / (30 if k == 512 else 90))
        runs[cfg.name] = write_run(home, cfg, train, held, every=25)
    data = figure_json(home, "cifar_online_offline_bs_tiny")
    assert data["x"] == "step" and data["y"] == "held-out loss (EMA 0.8)"
    for c in data["curves"]:
        recs = [r for r in runs[c["arm"]].metrics()[0] if "eval_loss" in r]
        assert c["x"] == [r["step"] for r in recs]
        assert c["y"] == pytest.approx(ema([r["eval_loss"] for r in recs]), rel=1e-12)
    off = next(c for c in data["curves"] if c["arm"] == "offline_bs512")
    i = int(np.argmin(off["y"]))
    assert off["early_stop"] == [off["x"][i], off["y"][i]] and 100 <= off["x"][i] <= 200
    assert off["y"][-1] > 1.5 > min(off["y"])            # held-out loss turns back up
    # negative control: the train-loss panel (what `figure` drew before) shows the offline arm lowest
    tr = figure_json(home, "cifar_online_offline_bs_tiny", "--train")
    assert tr["y"] == "train loss (EMA 0.8)"
    last = {c["arm"]: c["y"][-1] for c in tr["curves"]}
    assert last["offline_bs512"] < last["online_bs512"]
    held_last = {c["arm"]: c["y"][-1] for c in data["curves"]}
    assert held_last["offline_bs512"] > held_last["online_bs512"]
    assert {c["arm"] for c in data["error_curves"]} == set(runs)          # classifiers: an error panel
    png = tmp_path / "fig.png"
    res = runner.invoke(app, ["--home", str(home), "figure", "cifar_online_offline_bs_tiny", "--out", str(png)])
    assert res.exit_code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def curve(t, scale):
    return 1.0 + 2.0 * math.exp(-t / scale)


def test_an_lr_raise_is_fitted_with_a_left_shift_on_lr_normalized_steps(tmp_path):
    """Fig. 5b's twin: after the raise at lr_time 180 the run follows the high-lr reference 30
    LR-normalized steps ahead of it: the fit shifts the reference left by 30."""
    home = tmp_path / "home"
    cfgs = {c.name: c for c in load_preset("c4_lr_up_tiny").configs()}
    ref = lambda t: curve(t, 60)                                            # the high-noise arm
    low = lambda t: curve(t, 40) if t <= 180 else ref(t + 30)
    write_run(home, cfgs["lr3e3"], ref, ref, every=25, x="lr_time")
    write_run(home, cfgs["lr3e4to3e3"], low, low, every=25, t0=180.0, x="lr_time")
    data = figure_json(home, "c4_lr_up_tiny")
    assert data["x"] == "lr_time"                                            # an lr figure: LR-normalized steps
    (fit,) = data["fits"]
    assert fit["ok"] and fit["direction"] == "raise" and fit["t0"] == 180.0
    assert fit["tau"] == pytest.approx(-30, abs=2.0) and fit["residual"] < 0.02
    res = runner.invoke(app, ["--home", str(home), "figure", "c4_lr_up_tiny", "--out", str(tmp_path / "f.png")])
    assert "lr3e4to3e3: after T0 = 180 it follows lr3e3 shifted left by " in res.stdout
    # negative control: a run that keeps its own (low-noise) curve after T0 follows no shift of the reference
    home2 = tmp_path / "home2"
    write_run(home2, cfgs["lr3e3"], ref, ref, every=25, x="lr_time")
    write_run(home2, cfgs["lr3e4to3e3"], lambda t: curve(t, 40) - 0.002 * max(0.0, t - 180), lambda t: curve(t, 40)
              - 0.002 * max(0.0, t - 180), every=25, t0=180.0, x="lr_time")
    (bad,) = figure_json(home2, "c4_lr_up_tiny")["fits"]
    assert bad["residual"] > 50 * fit["residual"]


def test_an_lr_drop_is_fitted_with_a_right_shift_and_a_failed_fit_says_why(tmp_path):
    home = tmp_path / "home"
    cfgs = {c.name: c for c in load_preset("c4_lr_down_tiny").configs()}
    ref = lambda t: curve(t, 40)                                            # the low-noise arm, lr 3e-4
    high = lambda t: curve(t, 120) if t <= 180 else ref(t - 45)             # 45 behind after the drop
    write_run(home, cfgs["lr3e4"], ref, ref, every=100, x="lr_time")
    write_run(home, cfgs["lr3e3to3e4"], high, high, every=10, t0=180.0, x="lr_time")
    (fit,) = figure_json(home, "c4_lr_down_tiny")["fits"]
    assert fit["ok"] and fit["tau"] == pytest.approx(45, abs=2.0)
    # a run whose change never took effect: no fit, and the sentence says why (not "shifted by 0.0")
    home2 = tmp_path / "home2"
    write_run(home2, cfgs["lr3e4"], ref, ref, every=100, x="lr_time")
    write_run(home2, cfgs["lr3e3to3e4"], high, high, every=10, x="lr_time")
    (fit,) = figure_json(home2, "c4_lr_down_tiny")["fits"]
    assert fit == {"ok": False, "why": "no fit: the run's noise change never took effect", "tau": None,
                   "arm": "lr3e3to3e4", "ref": "lr3e4", "direction": "drop", "t0": None}
    res = runner.invoke(app, ["--home", str(home2), "figure", "c4_lr_down_tiny", "--out", str(tmp_path / "g.png")])
    assert res.stdout.strip().splitlines()[1] == "lr3e3to3e4: no fit: the run's noise change never took effect"


def test_a_preset_without_a_contract_compares_lrs_with_a_relative_tolerance(tmp_path):
    from engine.presets import Preset
    from gpctl.compare import figure_axis
    p = load_preset("demo", check=False)
    bare = Preset(p.name, p.path, p.figure, p.description, p.twin, p.base, p.runs)    # declares nothing
    assert figure_axis(bare, None) == "step"
    bare.runs = {**p.runs, "other": {"lr": 0.05 * (1 + 1e-9)}}                       # float noise only
    assert figure_axis(bare, None) == "step"
    bare.runs = {**p.runs, "other": {"lr": 0.01}}
    assert figure_axis(bare, None) == "lr_time"


TV_PRESET = """
[preset]
figure = "Fig. 7a (test)"
compares = "batch_size"
reference = "bs128"
direction = "drop"
baselines = ["bs128_seed2"]

[base]
steps = 150
lr = 0.02
batch_size = 128
eval_every = 25
checkpoint_every = 0
log_every = 10
device = "cpu"
checkpoint_at_losses = [2.25, 2.2, 2.15, 2.1, 2.05]
model.name = "cnn"
model.width = 8
data.source = "synthetic_images"
data.image_size = 8
data.eval_samples = 64
data.teacher_width = 8
control.poll_ms = 0

[runs.bs32to128]
batch_size = 32
[[runs.bs32to128.changes]]
at_step = 60
batch_size = 128

[runs.bs128]

[runs.bs128_seed2]
seed = 1
"""


def test_figure_tv_compares_the_arms_at_their_shared_loss_levels(tmp_path):
    """Figs. 7/8: TV of each arm to the reference at matched loss, against steps, with the seed baseline."""
    preset = tmp_path / "tvfig.toml"
    preset.write_text(TV_PRESET)
    home = tmp_path / "home"
    assert runner.invoke(app, ["--home", str(home), "run", "preset", str(preset), "--foreground"]).exit_code == 0
    png = tmp_path / "tv.png"
    data = figure_json(home, str(preset), "--tv", str(png))
    rows = data["tv"]["pairs"]
    assert {r["arm"] for r in rows} <= {"bs32to128", "bs128_seed2"} and rows
    for r in rows:                 # every kept pair: recorded losses within 2 % of the reference's
        assert abs(r["match_gap"]) <= 0.02 * r["loss_b"] + 1e-12
        assert 0 <= r["tv"] <= 1
    assert any(r["levels"] for r in rows)                 # pairs taken at a shared loss level
    assert any(s.startswith("bs32to128 vs bs128: ") and "pairs at matched loss" in s for s in data["tv"]["sentences"])
    res = runner.invoke(app, ["--home", str(home), "figure", str(preset), "--out", str(tmp_path / "f.png"),
                              "--tv", str(png)])
    assert res.exit_code == 0 and f"wrote {png}" in res.stdout and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_translated_reference_is_smoothed_as_the_arm_so_a_good_fit_lies_on_the_arms_curve(tmp_path):
    """The dashed reference of a panel is the reference's raw curve translated by the fit, put after the
    arm's own pre-T0 points and smoothed by the same EMA as the arm (curves.translated_curve): where the
    arm's raw points are the translated reference (tests/test_snap.py's hand-made drop, evals every 10
    steps with the demo's eval_every 25: a long EMA memory), the two smoothed curves coincide; the reference's own
    EMA shifted (what was drawn before) does not, by the lag of the pre-T0 losses."""
    import numpy as np

    from engine.analysis.curves import held_out_curve, translated_curve
    from engine.presets import load_preset
    from gpctl.figures import panel_data
    from tests.test_snap import T0, TAU, XS, high, low, make
    home = tmp_path / "home"
    d = make(home, "demo-bs32to512-aaaaaa", np.where(XS <= T0, high(XS), low(XS - TAU)), {"batch_size": [32, 512]},
             arm="bs32to512")
    r = make(home, "demo-bs512-bbbbbb", low(XS), arm="bs512")
    data = panel_data({"bs32to512": d, "bs512": r}, load_preset("demo").contract, "step", 0.8)
    (fit,) = data["fits"]
    tx, ty = np.asarray(fit["translated"]["x"]), np.asarray(fit["translated"]["y"])
    ax, ay = held_out_curve(d, "step", 0.8)
    on = np.isin(ax, tx)
    assert len(tx) == (XS > T0).sum() and np.all(tx > T0)
    assert np.max(np.abs(ay[on] - ty)) < 2e-3                       # on the arm's curve (tau's grid: 0.25 step)
    # an independent computation: the composite raw curve, then the EMA by hand (coef 0.8 per eval_every steps)
    comp = np.where(XS <= T0, high(XS), np.interp(XS - fit["tau"], XS, low(XS)))   # the raw reference, translated
    s, hand = comp[0], []
    for i, v in enumerate(comp):
        if i:
            k = 0.8 ** ((XS[i] - XS[i - 1]) / d.config().eval_every)
            s = k * s + (1 - k) * v
        hand.append(s)
    assert np.allclose(ty, np.asarray(hand)[XS > T0], atol=1e-12)
    # negative control: the reference's own EMA shifted right by tau misses the arm's curve
    rx, ry = held_out_curve(r, "step", 0.8)
    old = np.interp(tx, rx + fit["tau"], ry)
    assert np.max(np.abs(ay[on] - old)) > 0.05
    assert translated_curve(d, (XS, low(XS)), 0.0, 1e9)[0].size == 0    # nothing after a T0 past the end
