"""Schedules in the paper's terms, and `gpctl presets check`: a preset is proven before it trains."""
import json
import re

import numpy as np
import pytest
from typer.testing import CliRunner

from engine.config import Change, ConfigError
from engine.plan import plan
from engine.presets import load_preset
from engine.store.rundir import RunDir
from engine.schedule import Schedule
from engine.train.loop import train
from gpctl.cli import app
from tests.conftest import REPO, TINY_IMAGES, tiny

runner = CliRunner()


def hand_stepped(n_steps, lr, lr_ref, horizon, warmup, final_ratio):
    """The App. A.3 schedule written out independently: base lr b, lr_time += b / lr_ref, a linear
    warmup and then a cosine over the LR-normalized horizon."""
    lrs, t, b = [], 0.0, lr
    for _ in range(n_steps):
        if t < warmup:
            shape = min(1.0, (t + b / lr_ref) / warmup)
        else:
            frac = min(1.0, (t - warmup) / (horizon - warmup))
            shape = final_ratio + (1 - final_ratio) * 0.5 * (1 + np.cos(np.pi * frac))
        lrs.append(b * shape)
        t += b / lr_ref
        if t >= horizon - 1e-9 * horizon:
            break
    return np.array(lrs), t


LR_CLOCK = ("lr=0.04", "lr_ref=0.04", "max_lr_time=30.0", "steps=1000", "eval_every=0", "log_every=5",
            'schedule.kind="cosine"', 'schedule.clock="lr_time"', "schedule.warmup_lr_time=4.0",
            "schedule.final_lr_ratio=0.1")


def test_lr_time_clock_cosine_matches_a_hand_stepped_schedule(tmp_path):
    """A 10x lower lr trains 10x the steps over the same LR-normalized horizon, with the same shape."""
    for lr, steps in ((0.04, 30), (0.004, 300)):
        cfg = tiny(TINY_IMAGES, *LR_CLOCK, f"lr={lr}", name=f"lr{lr}")
        rd = RunDir.create(tmp_path, cfg)
        assert train(rd) == "done"
        recs = [r for r in rd.metrics()[0] if "loss" in r]
        want, end = hand_stepped(1000, lr, 0.04, 30.0, 4.0, 0.1)
        assert len(recs) == len(want) == steps
        assert [r["lr"] for r in recs] == pytest.approx(want, rel=1e-12)
        assert recs[-1]["lr_time"] == pytest.approx(30.0) and end == pytest.approx(30.0)
        assert lr * 0.1 <= recs[-1]["lr"] < lr * 0.11                      # annealed to alpha_f
    # negative control: the same arm on the steps clock is not the paper's schedule
    cfg = tiny(TINY_IMAGES, *LR_CLOCK, "lr=0.004", 'schedule.clock="steps"', "schedule.warmup_lr_time=0.0",
               "schedule.warmup_steps=4")
    s, lrs, t = Schedule(cfg), [], 0.0
    for step in range(300):
        lr, base = s.rates(step, t)
        lrs.append(lr)
        t += base / s.lr_ref
    want, _ = hand_stepped(1000, 0.004, 0.04, 30.0, 4.0, 0.1)
    assert not np.allclose(lrs, want, rtol=1e-3)


def test_plan_predicts_the_steps_a_real_run_applies_changes_at(tmp_path):
    cfg = tiny(TINY_IMAGES, *LR_CLOCK, "lr=0.004", name="drop")
    cfg.changes = [Change(at_lr_time=6.0, lr=0.04), Change(at_step=100, batch_size=32),
                   Change(at_lr_time=21.3, lr=0.008)]
    p = plan(cfg)
    rd = RunDir.create(tmp_path, cfg)
    assert train(rd) == "done"
    events = [e for e in rd.events()[0] if e["event"] == "schedule"]
    assert [(e["change"], e["step"], e["lr_time"], e["samples"]) for e in events] == \
        [(f.index, f.step, f.lr_time, f.samples) for f in p.fired]
    last = [r for r in rd.metrics()[0] if "loss" in r][-1]
    assert (last["step"], last["samples"], last["lr_time"], last["lr"]) == (p.steps, p.samples, p.lr_time, p.final_lr)
    # by hand: 60 steps of 0.1 reach lr_time 6 (step 60, within rounding); then 1.0 per step reaches
    # 21.3 at step 76 (lr_time 22); then 0.2 per step: 26.8 at step 100 (the batch change), 30 at step 116
    assert [(f.index, f.step) for f in p.fired] == [(0, 60), (2, 76), (1, 100)]
    assert (p.steps, p.samples) == (116, 100 * 16 + 16 * 32)
    assert p.problems == []


def test_a_change_at_exactly_the_paper_lr_time_fires_on_its_step():
    """28800 steps of 6e-5 / 6e-4 sum to 2879.99999999x in floats; the raise must fire at 28800."""
    p = plan(load_preset("c4_lr_up").configs()[0])
    assert [(f.step, round(f.lr_time, 6)) for f in p.fired] == [(28800, 2880.0)]


def test_c4_presets_train_every_arm_for_4800_lr_normalized_steps_as_app_a3():
    """App. A.3: 6e-4 for 4800 steps, 6e-5 for 48000; changes after 2880 LR-normalized steps (60 %)."""
    for name, want_steps, want_fired in (
            ("c4_lr_down", {"lr6e4to6e5": 2880 + 19200, "lr6e5": 48000}, {"lr6e4to6e5": 2880}),
            ("c4_lr_up", {"lr6e4": 4800}, {"lr6e5to6e4": 28800}),
            ("c4_online_offline_lr", {"online_lr6e4": 4800, "offline_lr6e5": 48000}, {}),
            ("c4_tv_lr", {"lr6e5": 48000, "lr6e5_seed2": 48000}, {"lr6e4to6e5": 2880})):
        plans = {c.name: plan(c) for c in load_preset(name).configs()}
        assert all(p.lr_time == pytest.approx(4800.0, abs=0.11) for p in plans.values()), name
        assert all(p.problems == [] for p in plans.values()), name
        for arm, steps in want_steps.items():
            assert plans[arm].steps == steps, (name, arm)
        for arm, step in want_fired.items():
            assert [f.step for f in plans[arm].fired] == [step], (name, arm)
    # cosine presets anneal every arm to alpha_f = 0.1 of its lr; Fig. 8's ground truth is constant 6e-5
    p = {c.name: plan(c) for c in load_preset("c4_online_offline_lr").configs()}
    assert p["online_lr6e4"].final_lr == pytest.approx(6e-5, rel=1e-3)
    assert p["online_lr6e5"].final_lr == pytest.approx(6e-6, rel=1e-3)
    assert plan(load_preset("c4_tv_lr").configs()[1]).final_lr == 6e-5


def test_cifar_online_arms_take_at_most_one_pass():
    for name in ("cifar_bs32_512", "cifar_bs_up", "cifar_lr_down", "cifar_online_offline_bs",
                 "cifar_online_offline_lr", "cifar_lr05_005"):
        for cfg in load_preset(name).configs():
            p = plan(cfg)
            if cfg.data.mode == "online":
                assert p.samples <= 6_002_688 - cfg.data.eval_samples, (name, cfg.name)
                assert 0 < p.epochs <= 1.0


BROKEN = """
[preset]
figure = "test"
compares = "batch_size"
reference = "plain"
direction = "drop"

[base]
steps = 100
lr = 0.05
device = "cpu"
model.name = "cnn"
data.source = "synthetic_images"

[runs.late]
batch_size = 256
[[runs.late.changes]]
at_step = 150
batch_size = 512

[runs.plain]
"""


def test_a_change_that_cannot_fire_fails_check_and_load(tmp_path):
    f = tmp_path / "broken.toml"
    f.write_text(BROKEN)
    res = runner.invoke(app, ["presets", "check", str(f)])
    assert res.exit_code == 1
    assert "FAIL broken: late: changes[0] (at_step 150) never fires: the run ends at step 100, lr_time 100.0" in res.stdout
    assert "0 of 1 presets pass; 1 fail" in res.stdout
    with pytest.raises(ConfigError, match=r"\[runs.late\]: changes\[0\] \(at_step 150\) never fires"):
        load_preset(str(f))
    home = tmp_path / "home"
    res = runner.invoke(app, ["--home", str(home), "run", "preset", str(f), "--no-worker"])
    assert res.exit_code == 2
    assert res.stderr.strip().startswith("error: ") and "never fires" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not (home / "runs").exists() or not any((home / "runs").iterdir())
    # the same preset, long enough: passes
    res = runner.invoke(app, ["presets", "check", "--json", str(f)])
    assert res.exit_code == 1
    f.write_text(BROKEN.replace("steps = 100", "steps = 200"))
    res = runner.invoke(app, ["presets", "check", "--json", str(f)])
    assert res.exit_code == 0, res.stdout
    arms = {a["arm"]: a for a in json.loads(res.stdout)[0]["arms"]}
    assert arms["late"]["changes"] == [{"change": 0, "step": 150, "lr_time": 150.0, "samples": 150 * 256,
                                        "changed": {"batch_size": [256, 512]}}]


@pytest.mark.parametrize("edit, message", [
    (('data.source = "synthetic_images"', 'data.source = "cifar5m"\ndata.path = "/nonexistent"'),
     "plain: the online arm repeats data: 102,400 samples"),   # 200 x 512 of a stand-in size below
    (("[runs.plain]", "[runs.plain]\nlr = 0.1"), "arms meant to be compared end at different LR-normalized times"),
    (("steps = 200", "steps = 200\nmax_lr_time = 400.0"), "the horizon is not reached"),
    (("steps = 200", 'steps = 200\nmax_lr_time = 120.0\nschedule.kind = "cosine"'), "the cosine over 'steps' = 200 is cut"),
])
def test_check_fails_each_kind_of_wrong_experiment(tmp_path, monkeypatch, edit, message):
    from engine import plan as plan_mod
    monkeypatch.setitem(plan_mod.KNOWN_SIZES, "cifar5m", 60_000)   # so 102,400 samples is > 1 epoch
    f = tmp_path / "p.toml"
    base = BROKEN.replace("steps = 100", "steps = 200").replace("lr = 0.05\n", "lr = 0.05\nlr_ref = 0.05\n")
    f.write_text(base.replace(*edit))
    res = runner.invoke(app, ["presets", "check", str(f)])
    assert res.exit_code == 1, res.stdout
    assert message in " ".join(res.stdout.split())
    # the negative control: the unedited preset passes
    f.write_text(base)
    assert runner.invoke(app, ["presets", "check", str(f)]).exit_code == 0


def test_every_shipped_preset_passes_check():
    res = runner.invoke(app, ["presets", "check"])
    assert res.exit_code == 0, res.stdout
    n = len(list((REPO / "presets").glob("*.toml")))
    assert f"{n} of {n} presets pass" in res.stdout


def test_imagenet_is_resized_to_256_then_randomly_cropped_to_224_without_padding(tmp_path):
    """App. A.2 at a small scale: resize 20x20, RandomCrop 16 (no padding) + flip; eval = centre 16."""
    import torch
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor, resize

    from engine.data import build_stream
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("n01", "n02"):
            d = tmp_path / "im" / split / cls
            d.mkdir(parents=True)
            Image.fromarray(rng.integers(0, 256, (30, 41, 3), dtype=np.uint8)).save(d / "0.png")
    cfg = tiny(TINY_IMAGES, 'data.source="imagenet"', f'data.path="{tmp_path / "im"}"', "data.image_size=16",
               "data.resize=20", "data.crop_padding=0", 'data.augment=["crop"]', "data.eval_samples=2",
               "data.normalize=false", "data.workers=1")
    s = build_stream(cfg, torch.device("cpu"))
    ref = {}   # the resized images, computed independently with torchvision on the PIL image
    for i, (path, label) in enumerate(s.source.ds.samples):
        ref[i] = pil_to_tensor(resize(Image.open(path).convert("RGB"), [20, 20])).float() / 255
    windows = {(i, dy, dx): ref[i][:, dy:dy + 16, dx:dx + 16] for i in ref for dy in range(5) for dx in range(5)}
    seen = set()
    for _ in range(6):
        x, _ = s.next_batch(2)
        assert x.shape == (2, 3, 16, 16)
        for img in x:
            match = [k for k, w in windows.items() if torch.equal(w, img)]
            assert len(match) == 1          # a real 16x16 window of the 20x20 image: no zero padding
            seen.add(match[0][1:])
    assert len(seen) > 3                    # and the offsets vary
    ev = torch.cat([x for x, _ in s.eval_batches(2)])
    val = [pil_to_tensor(resize(Image.open(p).convert("RGB"), [20, 20])).float() / 255 for p, _ in
           s.source.eval_set.ds.samples]
    assert torch.equal(ev, torch.stack([v[:, 2:18, 2:18] for v in val]))
    # negative control: the old path (shorter side to 16, centre crop, zero-padded crop) is not a window
    old = tiny(TINY_IMAGES, 'data.source="imagenet"', f'data.path="{tmp_path / "im"}"', "data.image_size=16",
               "data.crop_padding=2", 'data.augment=["crop"]', "data.eval_samples=2", "data.normalize=false",
               "data.workers=1")
    x, _ = build_stream(old, torch.device("cpu")).next_batch(2)
    assert not all(any(torch.equal(w, img) for w in windows.values()) for img in x)


NAME_NUMBERS = re.compile(r"ResNet-18|GPT-2|CIFAR-5m|ConvNeXt-T|Fig\. ?\d+[a-z]?|c4_\w+|cifar_\w+|imagenet_\w+")


def description_numbers(text: str) -> list[float]:
    """The numbers a preset description states (model and data names like ResNet-18 are not claims)."""
    out = []
    for m in re.finditer(r"(\d+(?:\.\d+)?(?:e-?\d+)?)([kM]?)", NAME_NUMBERS.sub(" ", text)):
        out.append(float(m.group(1)) * {"": 1, "k": 1e3, "M": 1e6}[m.group(2)])
    return out


def config_numbers(preset) -> list[float]:
    from engine.config import to_dict
    nums = []

    def walk(v):
        if isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            nums.append(float(v))
    for cfg in preset.configs(check=False):
        d = to_dict(cfg)
        walk(d)
        nums.append(float(cfg.data.offline_size * cfg.data.seq_len))   # an offline subset in tokens
        nums.append(float(cfg.data.online_epochs))
    return nums


def test_every_preset_description_states_its_own_values():
    """Issue 15: the CPU twins described the real experiment's values (c4_lr_down_tiny said
    "batch 256, lr 6e-4→6e-5 at 2880"; its config is lr 3e-3, batch 32)."""
    from engine.presets import list_presets
    wrong = []
    for p in list_presets():
        have = config_numbers(p)
        for n in description_numbers(p.description):
            if not any(abs(n - h) <= 0.02 * max(abs(h), 1e-12) for h in have):
                wrong.append(f"{p.name}: {n:g} is not in its config ({p.description})")
    assert wrong == []
    # negative control: a twin described with the real experiment's values fails the check
    real = next(p for p in list_presets() if p.name == "c4_lr_down_tiny")
    stale = "GPT-2 small / C4, batch 256: lr 6e-4->6e-5 at 2880 LR-normalized steps vs 6e-5"
    assert [n for n in description_numbers(stale)
            if not any(abs(n - h) <= 0.02 * max(abs(h), 1e-12) for h in config_numbers(real))] == [256, 6e-4, 6e-5, 2880, 6e-5]


def _loop_sum(x, inc, k):
    for _ in range(k):
        x += inc
    return x


@pytest.mark.parametrize("x, inc, k", [
    (0.0, 0.1, 300_000), (0.0, 6e-5 / 6e-4, 200_000), (12.5, 1e-4, 400_000), (0.0, 0.25, 100_000),
    (3.0, 1 / 3, 250_000), (1e6, 0.7, 100_000), (0.0, 0.01 / 0.04, 120_000)])
def test_advance_adds_exactly_as_the_float_loop(x, inc, k):
    """Issue 31: a plan jumps quiet stretches; its lr_time must still be the trainer's float sum
    bit for bit (engine.schedule.advance), which x + k * inc is not (the negative control)."""
    from engine.schedule import advance
    want = _loop_sum(x, inc, k)
    assert advance(x, inc, k) == want
    for cut in (1, 2, 3, 17, k // 3):
        assert advance(advance(x, inc, cut), inc, k - cut) == want


def test_the_negative_control_of_advance_is_inexact():
    assert any(x + k * inc != _loop_sum(x, inc, k)
               for x, inc, k in [(0.0, 0.1, 300_000), (12.5, 1e-4, 400_000), (3.0, 1 / 3, 250_000)])


def _fields(p):
    return (p.steps, p.samples, p.lr_time, p.final_lr, p.last_increment, p.ended_by, p.warmup_end, p.unfired,
            [(f.index, f.step, f.lr_time, f.samples, f.changed, f.before, f.after) for f in p.fired], p.problems)


LONG = [   # plans of 10^5 steps and more: quiet stretches jumped, events met where the stepped loop meets them
    ("lr=0.04", "lr_ref=0.04", "max_lr_time=100000.0", "steps=400000", 'schedule.kind="cosine"',
     'schedule.clock="lr_time"', "schedule.warmup_lr_time=400.0", "schedule.final_lr_ratio=0.1"),
    ("lr=0.004", "lr_ref=0.04", "steps=300000", "schedule.warmup_steps=1000", 'schedule.kind="cosine"'),
    ("lr=0.004", "lr_ref=0.04", "max_lr_time=12345.6", "steps=10000000"),
]
CHANGES = [Change(at_lr_time=600.0, lr=0.04), Change(at_step=150_000, batch_size=32),
           Change(at_lr_time=2880.0, lr=0.008, ramp=100.0), Change(at_step=150_000, lr=0.002),
           Change(at_lr_time=2880.0000000001, batch_size=64), Change(at_step=10 ** 8, lr=0.01)]


@pytest.mark.parametrize("i", range(len(LONG)))
def test_a_jumped_plan_equals_the_stepped_plan(monkeypatch, i):
    import engine.plan as planmod
    cfg = tiny(TINY_IMAGES, "eval_every=0", *LONG[i])
    cfg.changes = list(CHANGES)
    fast = planmod._plan(cfg)
    monkeypatch.setattr(planmod, "JUMP", 10 ** 18)          # every step iterated: the old loop
    slow = planmod._plan(cfg)
    assert _fields(fast) == _fields(slow)
    assert len(fast.fired) >= 3 and fast.steps > 10_000


def test_the_negative_control_of_jumping_misses_events(monkeypatch):
    """Jumping without the margin and the tolerance of `reached` lands changes at other steps."""
    import engine.plan as planmod
    cfg = tiny(TINY_IMAGES, "eval_every=0", *LONG[0])
    cfg.changes = list(CHANGES)
    monkeypatch.setattr(planmod, "JUMP", 10 ** 18)
    stepped = planmod._plan(cfg)
    monkeypatch.setattr(planmod, "JUMP", 8)
    real = planmod._quiet
    monkeypatch.setattr(planmod, "_quiet", lambda *a: real(*a) + 5 if real(*a) else 0)
    assert _fields(planmod._plan(cfg)) != _fields(stepped)


def test_a_billion_steps_and_twenty_thousand_changes_are_planned(tmp_path):
    """`presets check` and `run --dry-run` at 10^9 steps (they hung) and with 20,000 changes (128 s):
    the numbers are the closed form's (the time is measured in benchmarks/plan_speed.py)."""
    from engine.schedule import advance
    p = tmp_path / "big.toml"
    p.write_text((REPO / "presets" / "demo.toml").read_text().replace("steps = 200 ", "steps = 1000000000 ", 1)
                 .replace("at_step = 50", "at_step = 500000000"))
    res = runner.invoke(app, ["--home", str(tmp_path / "h"), "run", "preset", str(p), "--dry-run"])
    assert res.exit_code == 0 and res.stdout.strip().endswith("3 run(s); nothing created (--dry-run)"), res.output
    res = runner.invoke(app, ["presets", "check", str(p), "--json"])
    assert res.exit_code in (0, 1), res.output          # 1: the data repeat (the synthetic stream does not)
    cfg = load_preset(str(p), check=False).configs(check=False)[0]
    pl = plan(cfg)
    assert cfg.name == "bs32to512" and [(f.step, f.samples) for f in pl.fired] == [(5 * 10 ** 8, 32 * 5 * 10 ** 8)]
    assert (pl.steps, pl.samples) == (10 ** 9, 32 * 5 * 10 ** 8 + 512 * 5 * 10 ** 8)
    assert pl.lr_time == advance(0.0, cfg.lr / cfg.reference_lr, 10 ** 9)
    cfg.steps = 10 ** 6
    cfg.changes = [Change(at_step=50 * (i + 1), lr=0.05 if i % 2 else 0.01) for i in range(20_000)]
    pl = plan(cfg)
    assert len(pl.fired) == 19_999 and pl.fired[-1].step == 999_950 and pl.unfired == [19_999]
    assert pl.problems == ["changes[19999] (at_step 1000000) never fires: the run ends at step 1000000, "
                           "lr_time 600000.0"]
