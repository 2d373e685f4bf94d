import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from engine.train.checkpoint import CheckpointError
from engine.store.rundir import RunDir
from engine.train.loop import train
from engine.analysis.tv import Ckpt, compare_models, match, tv_curve, tv_per_item
from gpctl.cli import app
from tests.conftest import TINY_IMAGES, tiny

CPU = torch.device("cpu")


class Fixed(torch.nn.Module):
    """Returns given logits whatever the input (for hand-computed cases)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits[: x.shape[0]]


class FakeEval:
    def __init__(self, x, y=None):
        self.batches, self.size, self.device = [(x, y)], x.shape[0], CPU


def test_tv_matches_numpy_on_a_small_random_model():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(5, 4), torch.nn.Linear(5, 4)
    x, y = torch.randn(64, 5), torch.randint(0, 4, (64,))
    res = compare_models(a, b, FakeEval(x, y))
    with torch.no_grad():
        la, lb = a(x).numpy().astype(np.float64), b(x).numpy().astype(np.float64)
    pa = np.exp(la) / np.exp(la).sum(1, keepdims=True)
    pb = np.exp(lb) / np.exp(lb).sum(1, keepdims=True)
    assert res.tv == pytest.approx(0.5 * np.abs(pa - pb).sum(1).mean(), rel=1e-5)
    assert res.loss_a == pytest.approx(-np.log(pa[np.arange(64), y.numpy()]).mean(), rel=1e-5)
    assert res.error_a == pytest.approx((pa.argmax(1) != y.numpy()).mean())
    assert 0 < res.tv <= 1
    assert compare_models(b, a, FakeEval(x, y)).tv == pytest.approx(res.tv, rel=1e-6)   # symmetric
    assert compare_models(a, a, FakeEval(x, y)).tv == 0.0                              # itself


def test_tv_is_at_most_one():
    big = torch.tensor([[100.0, -100.0]])
    assert float(tv_per_item(big, -big)) == pytest.approx(1.0)


def test_lm_tv_averages_over_examples_and_positions():
    # 2 sequences of 3 tokens over a vocabulary of 2 -> positions 0 and 1 predict tokens 1 and 2.
    sure0, sure1, even = [50.0, -50.0], [-50.0, 50.0], [0.0, 0.0]
    la = torch.tensor([[sure0, sure0, even], [sure0, even, even]])
    lb = torch.tensor([[sure1, sure0, even], [even, even, even]])
    tokens = torch.tensor([[0, 0, 1], [1, 0, 1]])
    res = compare_models(Fixed(la), Fixed(lb), FakeEval(tokens))
    # per position TV: seq 0: 1, 0; seq 1: 0.5, 0 -> mean 1.5 / 4
    assert res.tv == pytest.approx(0.375) and res.positions == 2 and res.examples == 2


def test_matched_loss_pairs_beyond_the_tolerance_are_dropped_and_counted():
    """The demo's failure: A's early checkpoints all paired with B's first at gaps of nats."""
    from engine.analysis.tv import pair_up
    a = [Ckpt("a", s, None, s, l) for s, l in ((10, 8.1), (20, 2.0), (30, 1.52), (40, 1.21))]
    b = [Ckpt("b", s, None, s, l) for s, l in ((10, 1.8), (20, 1.5), (30, 1.2))]
    p = pair_up(a, b, "loss", max_gap=0.02)
    # nearest with replacement: 10->10 (gap 6.3), 20->10 (0.2 > 0.036) dropped; 30->20 (0.02 <= 0.03), 40->30 kept
    assert [(x.step, y.step) for x, y in p.pairs] == [(30, 20), (40, 30)]
    assert [(x.step, y.step, round(g, 9)) for x, y, g in p.dropped] == [(10, 10, 6.3), (20, 10, 0.2)]
    assert p.summary() == {"pairing": "loss", "kept": 2, "dropped": 2, "unmatched": 0, "max_gap": 0.02,
                           "replacement": True, "level_pairs": 0}
    # without replacement: each of B once, closest first; A's step 10 is left with no candidate
    p = pair_up(a, b, "loss", max_gap=0.02, replacement=False)
    assert [(x.step, y.step) for x, y in p.pairs] == [(30, 20), (40, 30)]
    assert [(x.step, y.step) for x, y, _ in p.dropped] == [(20, 10)] and p.unmatched == 1
    # negative control: no tolerance keeps every pair, as before
    assert len(pair_up(a, b, "loss").pairs) == 4
    # checkpoints of one loss level pair first, even where another is nearer
    a2 = [Ckpt("a", 5, None, 5, 1.99, (2.0,))]
    b2 = [Ckpt("b", 7, None, 7, 1.985, (2.0,)), Ckpt("b", 8, None, 8, 1.99)]
    assert [(x.step, y.step) for x, y in pair_up(a2, b2, "loss", 0.02).pairs] == [(5, 7)]


def test_tv_cli_reports_dropped_pairs_with_their_numbers(three_runs):
    home, rds = three_runs
    runner = CliRunner()
    everything = runner.invoke(app, ["--home", str(home), "tv", "drop", "low", "--match-loss", "--max-gap", "0", "--json"])
    assert everything.exit_code == 0, everything.output
    report = json.loads(everything.stdout)
    assert report["pairing"]["main"]["kept"] == 2 and report["dropped"] == []
    gaps = sorted((abs(r["match_gap"]) / r["loss_b"], r) for r in report["pairs"])
    (small, _), (big, worst) = gaps[0], gaps[-1]
    limit = (small + big) / 2
    res = runner.invoke(app, ["--home", str(home), "tv", "drop", "low", "--match-loss", "--max-gap", f"{limit:.6g}"])
    assert res.exit_code == 0, res.output
    assert "main: 1 pairs kept (0 at a shared loss level), 1 dropped beyond" in res.stdout
    assert f"dropped: step {worst['step_a']} of drop" in res.stdout and f"~ step {worst['step_b']} of low" in res.stdout
    none = runner.invoke(app, ["--home", str(home), "tv", "drop", "low", "--match-loss", "--max-gap", "1e-9"])
    assert none.exit_code == 2
    assert none.stderr.strip() == ("error: no checkpoint pairs for drop and low (pairing by loss): 2 candidate pairs "
                                   "dropped, beyond --max-gap 1e-09 of B's loss")
    assert runner.invoke(app, ["--home", str(home), "tv", "drop", "low", "--match-loss", "--max-gap", "-1"]).exit_code == 2


def test_match_by_loss_picks_the_nearest_and_by_step_the_same_step():
    a = [Ckpt("a", s, None, s, l) for s, l in ((10, 2.0), (20, 1.5), (30, 1.02))]
    b = [Ckpt("b", s, None, s / 2, l) for s, l in ((10, 1.9), (20, 1.2), (30, 1.0), (40, 0.9))]
    assert [(x.step, y.step) for x, y in match(a, b, "loss")] == [(10, 10), (20, 20), (30, 30)]
    b[2].eval_loss = 1.5
    assert [(x.step, y.step) for x, y in match(a, b, "loss")] == [(10, 10), (20, 30), (30, 40)]
    assert [(x.step, y.step) for x, y in match(a, b, "step")] == [(10, 10), (20, 20), (30, 30)]
    assert [(x.step, y.step) for x, y in match(a, b, "lr_time")] == [(10, 20), (20, 40), (30, 40)]


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tv")
    rds = {}
    for name, extra in (("drop", ["batch_size=4"]), ("low", []), ("low2", ["seed=1"])):
        cfg = tiny(TINY_IMAGES, "steps=8", "checkpoint_every=4", "eval_every=0", *extra, name=name, preset="tv")
        rds[name] = RunDir.create(root / "home", cfg, run_id=name)
        assert train(rds[name]) == "done"
    return root / "home", rds


def test_tv_curve_reports_gap_and_is_cached(three_runs):
    home, rds = three_runs
    rows = tv_curve(rds["drop"], rds["low"], "loss")
    assert [(r["step_a"], r["run_b"]) for r in rows] == [(4, "low"), (8, "low")]
    for r in rows:
        assert r["loss_gap"] == pytest.approx(r["loss_a"] - r["loss_b"]) and 0 < r["tv"] < 1
        assert r["examples"] == 64
    cache = rds["drop"].read_tv_cache()
    assert len(cache) == 2
    assert tv_curve(rds["drop"], rds["low"], "loss") == rows          # from the cache
    self_rows = tv_curve(rds["low"], rds["low"], "step")
    assert [r["tv"] for r in self_rows] == [0.0, 0.0]
    sub = tv_curve(rds["drop"], rds["low"], "step", eval_samples=16)
    assert [r["examples"] for r in sub] == [16, 16]


def test_incompatible_checkpoints_are_refused(three_runs, tmp_path):
    home, rds = three_runs
    cfg = tiny(TINY_IMAGES, "steps=2", "model.num_classes=5", "eval_every=0", name="five", preset="tv")
    five = RunDir.create(home, cfg, run_id="five-classes")
    assert train(five) == "done"
    with pytest.raises(CheckpointError, match=r"incompatible checkpoints: num_classes 10 .* vs 5"):
        tv_curve(rds["low"], five, "lr_time")


def test_cli_json_baseline_and_png(three_runs, tmp_path):
    home, rds = three_runs
    png = tmp_path / "tv.png"
    res = CliRunner().invoke(app, ["--home", str(home), "tv", "drop", "low", "--match-loss", "--baseline", "low2",
                                   "--max-gap", "0", "--json", "--plot", str(png)])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    rows = report["pairs"]
    assert [r["curve"] for r in rows] == ["main", "main", "baseline", "baseline"]
    assert set(report["pairing"]) == {"main", "baseline"}
    # the seed spread, recomputed: mean TV of each curve over the range of A's loss both cover
    main = [r for r in rows if r["curve"] == "main"]
    base = [r for r in rows if r["curve"] == "baseline"]
    lo = max(min(r["loss_a"] for r in main), min(r["loss_a"] for r in base))
    hi = min(max(r["loss_a"] for r in main), max(r["loss_a"] for r in base))
    inside = [[r["tv"] for r in c if lo <= r["loss_a"] <= hi] for c in (main, base)]
    spread = report["seed_spread"]
    if hi >= lo and all(inside):
        assert spread["ratio"] == pytest.approx(np.mean(inside[0]) / np.mean(inside[1]))
    else:
        assert spread["ratio"] is None and "share no range" in spread["sentence"]
    assert {"step_a", "step_b", "loss_a", "loss_b", "tv", "loss_gap"} <= set(rows[0])
    assert [r["run_a"] for r in rows] == ["drop", "drop", "low2", "low2"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_plot_and_figure_write_pngs(three_runs, tmp_path):
    home, rds = three_runs
    runner = CliRunner()
    out = tmp_path / "loss.png"
    res = runner.invoke(app, ["--home", str(home), "plot", "drop", "low", "--x", "lr_time", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = runner.invoke(app, ["--home", str(home), "plot", "drop", "--x", "tokens"])
    assert bad.exit_code == 2 and bad.stderr.strip() == "error: --x must be one of step, samples, lr_time, wall, got 'tokens'"


def test_figure_of_a_preset_fits_the_translation(tmp_path):
    from tests.test_cli import TINY_PRESET
    preset = tmp_path / "snap.toml"
    preset.write_text(TINY_PRESET.replace("steps = 8", "steps = 16"))
    home, runner = tmp_path / "home", CliRunner()
    assert runner.invoke(app, ["--home", str(home), "run", "preset", str(preset), "--foreground"]).exit_code == 0
    png = tmp_path / "fig.png"
    res = runner.invoke(app, ["--home", str(home), "figure", str(preset), "--out", str(png)])
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    assert lines[0] == f"wrote {png}"
    assert lines[1].startswith("bs4to16: after T0 = 4 it follows bs16 shifted right by ")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    none = runner.invoke(app, ["--home", str(tmp_path / "empty"), "figure", str(preset)])
    assert none.exit_code == 2 and "no runs of preset 'snap'" in none.stderr


def test_fit_shift_recovers_a_known_translation():
    import numpy as np
    from engine.analysis.curves import fit_shift
    x = np.arange(0, 400, dtype=float)
    ref = 2.0 * np.exp(-x / 100) + 0.5
    drop = np.where(x <= 100, 3.0 - x / 200, 2.0 * np.exp(-(x - 37) / 100) + 0.5)
    fit = fit_shift(x, drop, x, ref, t0=100, settle=5)
    assert fit["tau"] == pytest.approx(37, abs=0.5) and fit["residual"] < 0.01


def test_tv_of_two_checkpoint_files(three_runs):
    home, rds = three_runs
    a, b = rds["drop"].checkpoint_path(8), rds["low"].checkpoint_path(8)
    runner = CliRunner()
    res = runner.invoke(app, ["--home", str(home), "tv", str(a), str(b), "--eval-from", "low", "--json"])
    assert res.exit_code == 0, res.output
    (row,) = json.loads(res.stdout)
    cached = [r for r in tv_curve(rds["drop"], rds["low"], "step") if r["step_a"] == 8][0]
    assert row["tv"] == pytest.approx(cached["tv"], rel=1e-6) and (row["step_a"], row["step_b"]) == (8, 8)
    bad = runner.invoke(app, ["--home", str(home), "tv", str(a), str(b)])
    assert bad.exit_code == 2
    assert bad.stderr.strip() == "error: comparing checkpoint files needs --eval-from RUN (whose held-out set to use)"


def test_fit_shift_left_translation_of_a_raised_run():
    """A raised run is ahead on the high-noise path: the fit finds a negative shift; the gap before
    T0 is NaN for a fork (no points before T0) and rms_gap measures it from the parent instead."""
    import numpy as np
    from engine.analysis.curves import fit_shift, rms_gap
    x = np.arange(0, 600, dtype=float)
    high = 2.0 * np.exp(-x / 200) + 0.8
    low = 2.0 * np.exp(-x / 100) + 0.5
    raised_x = x[x > 200]
    raised = 2.0 * np.exp(-(raised_x + 120) / 200) + 0.8       # high's curve, 120 steps ahead
    fit = fit_shift(raised_x, raised, x, high, t0=200, settle=10, taus=(-400.0, 0.0))
    assert fit["tau"] == pytest.approx(-120, abs=1.5) and fit["residual"] < 0.005
    assert np.isnan(fit["gap_before"])
    before = x <= 200
    expected = np.sqrt(np.mean((low[before] - high[before]) ** 2))
    assert rms_gap(x[before], low[before], x, high) == pytest.approx(expected, rel=1e-12)
    assert np.isnan(rms_gap(x[before], low[before], x[400:], high[400:]))   # no overlap


def test_seed_spread_compares_over_the_shared_loss_range_only():
    from gpctl.compare import seed_spread
    rows = [{"curve": "main", "loss_a": l, "tv": t} for l, t in ((3.0, 0.9), (2.0, 0.3), (1.5, 0.2))]
    rows += [{"curve": "baseline", "loss_a": l, "tv": t} for l, t in ((2.2, 0.1), (1.8, 0.1), (1.2, 0.05))]
    s = seed_spread(rows)
    # shared range of A's loss: [1.5, 2.2]; main there: 0.3, 0.2 (3.0 is outside); baseline: 0.1, 0.1
    assert s["range"] == [1.5, 2.2] and s["pairs"] == [2, 2]
    assert s["ratio"] == pytest.approx(0.25 / 0.1)
    assert s["sentence"].endswith("at A's losses 1.5000-2.2000: 2.50x the seed baseline")
    low = [dict(r, tv=r["tv"] / 10) if r["curve"] == "main" else r for r in rows]
    assert seed_spread(low)["sentence"].endswith("within the seed baseline")


# ------------------------------------------------------------------ issue 30: TV followed live

def test_tv_follow_prints_each_new_checkpoints_tv_and_ends_equal_to_gpctl_tv(tmp_path, monkeypatch):
    """`gpctl tv A B --match-loss --baseline C --follow` while A is "running": its checkpoints appear
    one look at a time (the test's sleep moves the next one in); each look prints only what is new, a
    checkpoint paired anew is printed again, and when A has ended the rows are `gpctl tv`'s own."""
    import json
    import os
    import shutil

    from typer.testing import CliRunner

    from gpctl import compare
    from gpctl.cli import app
    from tests.test_figures import TV_PRESET
    r = CliRunner()
    preset = tmp_path / "tvfig.toml"
    preset.write_text(TV_PRESET)
    home = tmp_path / "home"
    assert r.invoke(app, ["--home", str(home), "run", "preset", str(preset), "--foreground"]).exit_code == 0
    from engine.store.rundir import latest_runs
    runs = latest_runs(home, "tvfig")
    a, b, c = runs["bs32to128"], runs["bs128"], runs["bs128_seed2"]
    whole = json.loads(r.invoke(app, ["--home", str(home), "tv", a.id, b.id, "--match-loss", "--baseline", c.id,
                                      "--json"]).stdout)
    for rd in (a, c):
        rd.tv_cache_file.unlink()                  # followed from nothing: every TV computed again
    held = tmp_path / "held"
    held.mkdir()
    files = sorted(a.checkpoints.iterdir())
    for f in files:
        shutil.move(str(f), held / f.name)
    steps = sorted({f.name[:12] for f in files})   # step_XXXXXXX: weights and state move together
    held_steps = list(steps)
    a.write_status(state="running", pid=os.getpid())
    looks = []

    def sleep(seconds):
        looks.append(seconds)
        nxt = steps.pop(0)
        for f in sorted(held.glob(nxt + "*")):
            shutil.move(str(f), a.checkpoints / f.name)
        if not steps:
            a.write_status(state="done")

    monkeypatch.setattr(compare, "_sleep", sleep)
    res = r.invoke(app, ["--home", str(home), "tv", a.id, b.id, "--match-loss", "--baseline", c.id, "--follow",
                         "--poll", "0.5", "--json"])
    assert res.exit_code == 0, res.output
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    printed, summary = lines[:-1], lines[-1]
    assert looks == [0.5] * len(held_steps)
    # the latest row printed for each (curve, checkpoint of A) is gpctl tv's row for it
    latest = {}
    for row in printed:
        latest[(row["curve"], row["step_a"])] = row
    key = lambda row: (row["curve"], row["step_a"], row["step_b"], row["tv"])   # noqa: E731
    assert sorted(map(key, latest.values())) == sorted(map(key, whole["pairs"]))
    assert summary["seed_spread"] == whole["seed_spread"] and summary["summary"] == whole["pairing"]
    # incremental: the baseline's rows (C has ended) in the first look; each checkpoint of A first in
    # the look after the sleep that brought it in; a row printed again only for a new partner
    assert {row["look"] for row in printed if row["curve"] == "baseline"} == {1}
    first = {}
    for row in printed:
        first.setdefault((row["curve"], row["step_a"]), row["look"])
    mains = [(k[1], look) for k, look in first.items() if k[0] == "main"]
    assert mains and all(look == held_steps.index(f"step_{s:07d}") + 2 for s, look in mains)
    assert all(row["replaces"] is None or row["replaces"] != row["step_b"] for row in printed)
