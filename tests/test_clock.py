"""The Clock value (issue 25): one step advances step, samples and lr_time together, and a run's
records spell exactly what it holds."""
import numpy as np
import pytest

from engine.clock import Clock
from engine.store.rundir import RunDir
from engine.train.loop import train
from tests.conftest import TINY_IMAGES, tiny


def test_tick_against_a_hand_sum():
    rng = np.random.default_rng(0)
    batches, lrs = rng.integers(1, 512, 1000), rng.uniform(1e-4, 0.1, 1000)
    c = Clock()
    befores = [c.tick(int(b), float(lr / 0.05)) for b, lr in zip(batches, lrs)]
    assert c.step == 1000 and c.samples == int(batches.sum())
    assert c.lr_time == pytest.approx(float(np.sum(lrs / 0.05)), rel=1e-12)
    assert befores[0] == 0.0 and befores[-1] == pytest.approx(float(np.sum(lrs[:-1] / 0.05)), rel=1e-12)
    assert Clock.of(c.as_dict()) == c
    with pytest.raises(KeyError, match="samples"):
        Clock.of({"step": 1, "lr_time": 1.0})


def test_records_events_and_checkpoints_spell_the_runs_clock(home):
    cfg = tiny(TINY_IMAGES, "steps=8", "eval_every=4", "log_every=1", "lr=0.02", "lr_ref=0.04", "batch_size=16",
               "checkpoint_every=4")
    rd = RunDir.create(home, cfg)
    assert train(rd) == "done"
    recs = rd.train_records()
    c = Clock()
    for r in recs:                    # an independent clock stepped by the records' own lr and batch
        c.tick(r["batch_size"], r["lr"] / 0.04)
        assert Clock.of(r) == Clock(c.step, c.samples, pytest.approx(c.lr_time, rel=1e-12))
    assert (c.step, c.samples) == (8, 128) and c.lr_time == pytest.approx(4.0, rel=1e-12)
    evals = {r["step"]: Clock.of(r) for r in rd.eval_records()}
    ckpts = {e["step"]: Clock.of(e) for e in rd.events()[0] if e["event"] == "checkpoint"}
    assert evals == ckpts == {4: Clock.of(recs[3]), 8: Clock.of(recs[7])}
