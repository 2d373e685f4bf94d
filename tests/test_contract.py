"""Issue 23: a preset says what it compares, and `gpctl presets check` refuses any other difference.

Each test writes its own wrong preset (one edit away from a sound one), checks that the check fails
naming the key and the arms, and that the sound preset passes (the negative control)."""
import json

import pytest
from typer.testing import CliRunner

from engine.config import ConfigError
from engine.presets import load_preset
from engine.store.rundir import RunDir
from engine.train.loop import train
from gpctl.cli import app
from tests.conftest import TINY_IMAGES, tiny

runner = CliRunner()

# A batch-size figure (Fig. 7a's shape): high noise dropped to the reference's batch at T0, the
# reference, its seed baseline, and the constant high-noise arm.
BATCH = """
[preset]
figure = "test"
compares = "batch_size"
reference = "bs64"
direction = "drop"
baselines = ["bs64_seed2"]

[base]
steps = 40
lr = 0.05
batch_size = 64
eval_every = 10
device = "cpu"
model.name = "cnn"
model.width = 4
data.source = "synthetic_images"
data.image_size = 8
data.eval_samples = 32

[runs.bs8to64]
batch_size = 8
[[runs.bs8to64.changes]]
at_step = 10
batch_size = 64

[runs.bs8]
batch_size = 8

[runs.bs64]

[runs.bs64_seed2]
seed = 1
"""

# An lr figure (Fig. 7b's shape), compared on LR-normalized steps.
LR = """
[preset]
figure = "test"
compares = "lr"
reference = "lr01"
direction = "drop"

[base]
steps = 400
max_lr_time = 40.0
lr = 0.01
lr_ref = 0.01
batch_size = 16
eval_every = 10
device = "cpu"
model.name = "cnn"
model.width = 4
data.source = "synthetic_images"
data.image_size = 8
data.eval_samples = 32

[runs.lr1to01]
lr = 0.1
[[runs.lr1to01.changes]]
at_step = 2
lr = 0.01

[runs.lr01]
"""

# Online vs offline at two batch sizes (Fig. 3a top's shape), on CIFAR-10's 50,000 train images.
MODE = """
[preset]
figure = "test"
compares = ["mode", "batch_size"]
reference = "online_bs64"

[base]
steps = 400
lr = 0.05
batch_size = 64
device = "cpu"
model.name = "cnn"
data.source = "cifar10"
data.offline_size = 2000

[runs.online_bs16]
batch_size = 16
[runs.offline_bs16]
batch_size = 16
data.mode = "offline"
[runs.online_bs64]
[runs.offline_bs64]
data.mode = "offline"
"""


def check(tmp_path, text, *extra):
    f = tmp_path / "p.toml"
    f.write_text(text)
    res = runner.invoke(app, ["presets", "check", "--json", str(f), *extra])
    report = json.loads(res.stdout)[0]
    return res.exit_code, report


def errors(report):
    return [(f["key"], f["arms"]) for f in report["findings"] if f["level"] == "error"]


@pytest.mark.parametrize("text", [BATCH, LR, MODE])
def test_the_sound_presets_pass(tmp_path, text):
    code, report = check(tmp_path, text)
    assert code == 0, report["problems"]
    assert report["findings"] == [] and report["problems"] == []


@pytest.mark.parametrize("old, new, key, arms", [
    ("[runs.bs8]\nbatch_size = 8", "[runs.bs8]\nbatch_size = 8\nlr = 0.04", "lr", ["bs8", "bs64"]),
    ("[runs.bs8]\nbatch_size = 8", "[runs.bs8]\nbatch_size = 8\nmodel.width = 8", "model.width", ["bs8", "bs64"]),
    ("[runs.bs8to64]\nbatch_size = 8", "[runs.bs8to64]\nbatch_size = 8\noptim.momentum = 0.5",
     "optim.momentum", ["bs8to64", "bs64"]),
    ("[runs.bs8]\nbatch_size = 8", '[runs.bs8]\nbatch_size = 8\ndata.augment = ["flip"]', "data.augment", ["bs8", "bs64"]),
    ("[runs.bs64_seed2]\nseed = 1", "[runs.bs64_seed2]\nseed = 1\ndata_seed = 3", "data_seed", ["bs64_seed2", "bs64"]),
])
def test_arms_of_a_batch_figure_that_differ_in_another_key_fail(tmp_path, old, new, key, arms):
    code, report = check(tmp_path, BATCH.replace(old, new))
    assert code == 1
    assert (key, arms) in errors(report)
    f = next(f for f in report["findings"] if f["key"] == key)
    assert f["values"][1] == {"lr": 0.05, "model.width": 4, "optim.momentum": 0.9, "data.augment": [],
                              "data_seed": 0}[key]
    assert f"differs from {arms[1]} in '{key}'" in f["message"]


def test_a_drop_that_lands_on_another_noise_than_the_reference_fails(tmp_path):
    code, report = check(tmp_path, LR.replace("at_step = 2\nlr = 0.01", "at_step = 2\nlr = 0.005"))
    assert code == 1
    f = next(f for f in report["findings"] if f["key"] == "lr")
    assert f["arms"] == ["lr1to01", "lr01"] and f["values"] == [0.005, 0.01]
    assert f["message"].startswith("lr1to01 ends at lr 0.005, not at the reference lr01's 0.01")
    code, report = check(tmp_path, BATCH.replace("at_step = 10\nbatch_size = 64", "at_step = 10\nbatch_size = 32"))
    assert ("batch_size", ["bs8to64", "bs64"]) in errors(report)


def test_a_change_in_the_wrong_direction_and_one_that_changes_nothing_fail(tmp_path):
    code, report = check(tmp_path, BATCH.replace('direction = "drop"', 'direction = "raise"'))
    assert code == 1
    assert ("changes[0].batch_size", ["bs8to64"]) in errors(report)
    assert "lowers the noise on a \"raise\" figure" in report["problems"][0]
    code, report = check(tmp_path, BATCH.replace("[runs.bs8to64]\nbatch_size = 8", "[runs.bs8to64]\nbatch_size = 64"))
    assert code == 1
    assert any("changes[0] (at_step 10) changes nothing: lr 0.05 and batch 64 are already in force at step 10" in p
               for p in report["problems"])
    # a batch figure whose change also moves the lr
    code, report = check(tmp_path, BATCH.replace("at_step = 10\nbatch_size = 64", "at_step = 10\nbatch_size = 64\nlr = 0.02"))
    assert ("changes[0].lr", ["bs8to64"]) in errors(report)


def test_an_lr_figure_without_lr_ref_fails_and_the_clock_it_would_count(tmp_path):
    code, report = check(tmp_path, LR.replace("lr_ref = 0.01\n", ""))
    assert code == 1
    assert ("lr_ref", ["lr1to01", "lr01"]) in errors(report)
    # why: each arm's clock counts in its own lr, so "40" means other work: the drop arm's 2 steps
    # at 0.1 count 2, then 0.01 / 0.1 = 0.1 per step: 2 + 38 / 0.1 = 382 steps, against lr01's 40
    arms = {a["arm"]: a for a in report["arms"]}
    assert arms["lr1to01"]["steps"] == 382 and arms["lr01"]["steps"] == 40
    assert check(tmp_path, LR)[1]["arms"][0]["steps"] == 2 + 20   # with lr_ref = 0.01: 2 steps count 20, then 1 each


@pytest.mark.parametrize("old, new, key, message", [
    ("[base]\n", '[base]\nschedule.warmup_steps = 60\n', "schedule.warmup_steps",
     "'schedule.warmup_steps' = 60 steps does not end inside the run (it ends at step 40, lr_time 40.0)"),
    ("[base]\n", '[base]\nschedule.warmup_steps = 20\n', "schedule.warmup_steps",
     "'schedule.warmup_steps' = 20 steps runs past T0: changes[0] fires at step 10 (lr_time 10.0), the warmup ends at step 20"),
])
def test_warmups_that_outlast_the_run_or_t0_fail(tmp_path, old, new, key, message):
    code, report = check(tmp_path, BATCH.replace(old, new, 1))
    assert code == 1
    assert any(message in p for p in report["problems"]), report["problems"]
    assert key in [k for k, _ in errors(report)]


def test_a_ramp_longer_than_the_run_fails(tmp_path):
    up = (LR.replace('direction = "drop"', 'direction = "raise"').replace('reference = "lr01"', 'reference = "lr1"')
          .replace("[runs.lr1to01]\nlr = 0.1\n[[runs.lr1to01.changes]]\nat_step = 2\nlr = 0.01",
                   "[runs.lr01to1]\n[[runs.lr01to1.changes]]\nat_lr_time = 10.0\nlr = 0.1\nramp = 20.0")
          .replace("[runs.lr01]\n", "[runs.lr1]\nlr = 0.1\n"))
    code, report = check(tmp_path, up)
    assert code == 0, report["problems"]                 # 20 LR-normalized steps from lr_time 10 end by 40
    code, report = check(tmp_path, up.replace("ramp = 20.0", "ramp = 45.0"))
    assert code == 1
    # the last step at 0.1 / 0.01 = 10 per step overshoots the horizon: 42.2
    assert any("changes[0].ramp = 45 LR-normalized steps does not end inside the run: it starts at lr_time 10.0, "
               "the run ends at 42.2" in p for p in report["problems"]), report["problems"]


def test_arms_with_different_cosine_floors_fail(tmp_path):
    text = BATCH.replace("[base]\n", '[base]\nschedule.kind = "cosine"\n', 1)
    assert check(tmp_path, text)[0] == 0
    code, report = check(tmp_path, text.replace("[runs.bs8]\nbatch_size = 8", "[runs.bs8]\nbatch_size = 8\nschedule.final_lr_ratio = 0.0"))
    assert code == 1
    f = next(f for f in report["findings"] if f["key"] == "schedule.final_lr_ratio")
    assert f["arms"] == ["bs8", "bs64"] and f["values"] == [0.0, 0.1]


def test_offline_subsets_too_big_seen_once_or_unequal_fail(tmp_path):
    code, report = check(tmp_path, MODE.replace("data.offline_size = 2000", "data.offline_size = 60000"))
    assert code == 1
    assert any("'data.offline_size' = 60,000 samples is more than the data set holds: 50,000 (CIFAR-10 train)" in p
               for p in report["problems"]), report["problems"]
    # 200 steps x 16 = 3,200 samples of a 2,000 subset: 1.6 passes, not "repeated epochs"
    code, report = check(tmp_path, MODE.replace("steps = 400", "steps = 200"))
    assert code == 1
    assert any("offline_bs16: the offline arm sees its subset 1.60 times: offline means repeated epochs (at least 2)"
               in p for p in report["problems"]), report["problems"]
    code, report = check(tmp_path, MODE.replace('[runs.offline_bs64]\ndata.mode = "offline"',
                                                '[runs.offline_bs64]\ndata.mode = "offline"\ndata.offline_size = 1000'))
    assert code == 1
    f = next(f for f in report["findings"] if f["key"] == "data.offline_size")
    assert set(f["arms"]) == {"offline_bs16", "offline_bs64"} and sorted(f["values"]) == [1000, 2000]


def test_a_baseline_with_the_reference_seed_fails(tmp_path):
    code, report = check(tmp_path, BATCH.replace("[runs.bs64_seed2]\nseed = 1", "[runs.bs64_seed2]\nseed = 0"))
    assert code == 1
    assert ("seed", ["bs64_seed2", "bs64"]) in errors(report)
    # a baseline that differs in more than its seed
    code, report = check(tmp_path, BATCH.replace("[runs.bs64_seed2]\nseed = 1", "[runs.bs64_seed2]\nseed = 1\nbatch_size = 32"))
    assert ("batch_size", ["bs64_seed2", "bs64"]) in errors(report)


def test_a_preset_that_does_not_say_what_it_compares_fails(tmp_path):
    text = BATCH.replace('compares = "batch_size"\nreference = "bs64"\ndirection = "drop"\nbaselines = ["bs64_seed2"]\n', "")
    code, report = check(tmp_path, text)
    assert code == 1 and errors(report) == [("preset.compares", ["bs8to64", "bs8", "bs64", "bs64_seed2"])]
    for bad, line in (('compares = "width"', "'preset.compares' = 'width' is not one of batch_size, lr, mode"),
                      ('reference = "bs65"', "'preset.reference' = 'bs65' is not an arm (runs: bs8to64, bs8, bs64, bs64_seed2)"),
                      ('direction = "down"', "'preset.direction' = 'down' is not one of drop, raise")):
        key = bad.split(" = ")[0]
        f = tmp_path / "bad.toml"
        f.write_text("\n".join(bad if line_.startswith(key + " =") else line_ for line_ in BATCH.splitlines()))
        res = runner.invoke(app, ["presets", "check", str(f)])
        assert res.exit_code == 2 and res.stderr.strip() == f"error: {f}: {line}"


def test_a_declared_departure_is_printed_not_refused_but_the_comparison_cannot_be_excused(tmp_path):
    text = BATCH.replace("[runs.bs8]\nbatch_size = 8", "[runs.bs8]\nbatch_size = 8\nlr = 0.04")
    declared = text.replace("[base]\n", '[preset.departs]\nlr = "tuned per batch size, as in our lab"\n\n[base]\n', 1)
    code, report = check(tmp_path, declared)
    assert code == 0, report["problems"]
    f = next(f for f in report["findings"] if f["key"] == "lr")
    assert (f["level"], f["reason"]) == ("declared", "tuned per batch size, as in our lab")
    res = runner.invoke(app, ["presets", "check", str(tmp_path / "p.toml")])
    assert "DEPARTS p: bs8 differs from bs64 in 'lr': 0.04 vs 0.05, not only in batch_size (declared: tuned per " \
           "batch size, as in our lab)" in " ".join(res.stdout.split())
    # where the changed arm lands is the comparison itself: no departure excuses it
    wrong = BATCH.replace("at_step = 10\nbatch_size = 64", "at_step = 10\nbatch_size = 32").replace(
        "[base]\n", '[preset.departs]\nbatch_size = "no reason"\n\n[base]\n', 1)
    assert check(tmp_path, wrong)[0] == 1


def test_run_preset_refuses_a_wrong_preset_and_creates_nothing(tmp_path):
    f = tmp_path / "wrong.toml"
    f.write_text(BATCH.replace("[runs.bs8]\nbatch_size = 8", "[runs.bs8]\nbatch_size = 8\nmodel.width = 8"))
    home = tmp_path / "home"
    res = runner.invoke(app, ["--home", str(home), "run", "preset", str(f), "--no-worker"])
    assert res.exit_code == 2
    assert res.stderr.strip() == (f"error: {f}: bs8 differs from bs64 in 'model.width': 8 vs 4, not only in batch_size")
    assert not (home / "runs").exists() or not any((home / "runs").iterdir())
    with pytest.raises(ConfigError, match="differs from bs64 in 'model.width'"):
        load_preset(str(f))
    # the arms that are not run are not refused for their own plans, but a wrong comparison is
    assert len(load_preset(str(tmp_path / "wrong.toml"), check=False).configs(arms=["bs64"])) == 1
    with pytest.raises(ConfigError, match="'model.width'"):
        load_preset(str(f), check=False).configs(arms=["bs8"])


def test_online_arms_are_counted_on_the_prepared_c4_shards_and_imagenet_folders(tmp_path):
    from engine.plan import plan
    shards = tmp_path / "c4"
    shards.mkdir()
    (shards / "meta.json").write_text(json.dumps({"format": "gpctl-tokens/1", "splits": {"train": {"tokens": 1_000_000,
                                                                                                   "shards": []}}}))
    cfg = load_preset("c4_lr_down", check=False).configs(check=False, overrides=[f'data.path="{shards}"'])[1]
    p = plan(cfg)
    assert p.data_size == (1_000_000 // 2048) * 2048 and p.data_note == f"the prepared shards in {shards}"
    assert any("the online arm repeats data: 25,165,824,000 tokens from 999,424" in m for m in p.problems)
    # negative control: without prepared shards, the published size (and the note says so)
    cfg = load_preset("c4_lr_down", check=False).configs(check=False, overrides=[f'data.path="{tmp_path}/none"'])[1]
    assert plan(cfg).data_note == "C4 en train's published size, ~156B tokens" and plan(cfg).problems == []
    train_dir = tmp_path / "imagenet" / "train"
    for cls in ("n01", "n02"):
        (train_dir / cls).mkdir(parents=True)
        for i in range(3):
            (train_dir / cls / f"{i}.JPEG").write_bytes(b"")
    (train_dir / "n02" / "notes.txt").write_text("not an image")
    cfg = load_preset("imagenet_online_offline", check=False).configs(
        check=False, overrides=[f'data.path="{tmp_path / "imagenet"}"'])[0]
    assert plan(cfg).data_size == 6 and plan(cfg).data_note == "the train folders on disk"


def test_a_fork_that_sets_a_new_lr_keeps_its_parents_clock(tmp_path):
    """lr_ref is resolved when the config is built (config.toml records it): a fork at step 6 with
    lr 0.01 of a parent at 0.05 adds 0.01 / 0.05 = 0.2 LR-normalized steps per step, by hand."""
    from engine.store.fork import fork
    parent = RunDir.create(tmp_path, tiny(TINY_IMAGES, "steps=12", "eval_every=0", "checkpoint_every=6"))
    assert parent.config().lr_ref == 0.05 and "lr_ref = 0.05" in parent.config_file.read_text()
    assert train(parent) == "done"
    child = fork(tmp_path, parent, step=6, overrides=["lr=0.01"])
    assert child.config().lr_ref == 0.05
    assert train(child) == "done"
    recs = [r for r in child.metrics()[0] if "loss" in r]
    assert [r["step"] for r in recs][-1] == 12
    assert recs[-1]["lr_time"] == pytest.approx(6 + 6 * 0.2, rel=1e-12)    # 7.2, not 12
    par = [r for r in parent.metrics()[0] if "loss" in r]
    assert par[-1]["lr_time"] == pytest.approx(12.0)


def test_noise_measuring_keys_differ_freely_except_noise_micro_on_a_batchnorm_model(tmp_path):
    """Issue 30: `noise_scale` only records; `noise_micro` cuts the flush steps' batches, which is
    exact for a model without BatchNorm (the cnn) and changes what a ResNet trains on those steps."""
    edit = ("[runs.bs8]\nbatch_size = 8", "[runs.bs8]\nbatch_size = 8\nnoise_micro = 4\nnoise_scale = false")
    code, report = check(tmp_path, BATCH.replace(*edit))
    assert code == 0 and report["findings"] == [], report
    resnet = BATCH.replace('model.name = "cnn"', 'model.name = "resnet18"')
    code, report = check(tmp_path, resnet)
    assert code == 0 and report["findings"] == [], report            # the ResNet preset itself is sound
    code, report = check(tmp_path, resnet.replace(*edit))
    assert code == 1 and errors(report) == [("noise_micro", ["bs8", "bs64"])]
