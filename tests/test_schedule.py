import math

import pytest

from engine.config import Change
from engine.store.rundir import RunDir
from engine.schedule import Schedule
from engine.train.loop import train
from tests.conftest import TINY_IMAGES, tiny


def test_lr_time_sums_lr_over_reference_under_changing_lr(tmp_path):
    cfg = tiny(TINY_IMAGES, "steps=8", "lr=0.1", "lr_ref=0.05", "eval_every=0")
    cfg.changes = [Change(at_step=3, lr=0.025), Change(at_lr_time=5.0, lr=0.2)]
    rd = RunDir.create(tmp_path, cfg)
    assert train(rd) == "done"
    recs = [r for r in rd.metrics()[0] if "loss" in r]
    lrs = [r["lr"] for r in recs]
    # steps 0-2 at 0.1 (lr_time 2,4,6) -> change at step 3 to 0.025 (6.5, 7.0 ...); the lr_time>=5
    # change was already due at step 3, so both apply there in order: 0.025 then 0.2.
    assert lrs == [0.1, 0.1, 0.1, 0.2, 0.2, 0.2, 0.2, 0.2]
    assert [r["lr_time"] for r in recs] == pytest.approx([2, 4, 6, 10, 14, 18, 22, 26])
    events = [e for e in rd.events()[0] if e["event"] == "schedule"]
    assert [(e["change"], e["step"], e["lr_time"]) for e in events] == [(0, 3, 6.0), (1, 3, 6.0)]


def test_at_lr_time_change_fires_at_first_boundary_past_it():
    cfg = tiny(TINY_IMAGES, "lr=0.1", "lr_ref=0.1")
    cfg.changes = [Change(at_lr_time=2.5, lr=0.01)]
    s, lr_time, lrs = Schedule(cfg), 0.0, []
    for step in range(6):
        s.due(step, lr_time)
        lr = s.lr(step, lr_time)
        lrs.append(lr)
        lr_time += lr / s.lr_ref
    assert lrs == [0.1, 0.1, 0.1, 0.01, 0.01, 0.01]
    assert lr_time == pytest.approx(3.3)


def test_ramp_is_linear_in_lr_time():
    cfg = tiny(TINY_IMAGES, "lr=0.01", "lr_ref=0.01")
    s = Schedule(cfg)
    s.set(step=0, lr_time=10.0, lr=0.03, ramp=4.0)
    assert [s.lr(0, t) for t in (10.0, 11.0, 12.0, 13.0, 14.0, 20.0)] == pytest.approx(
        [0.01, 0.015, 0.02, 0.025, 0.03, 0.03])


def test_cosine_with_warmup_ends_at_final_ratio():
    cfg = tiny(TINY_IMAGES, "steps=110", "lr=1.0", "schedule.kind=\"cosine\"", "schedule.warmup_steps=10",
               "schedule.final_lr_ratio=0.1")
    s = Schedule(cfg)
    assert s.lr(0, 0) == pytest.approx(0.1)
    assert s.lr(9, 0) == pytest.approx(1.0)
    assert s.lr(10, 0) == pytest.approx(1.0)
    assert s.lr(60, 0) == pytest.approx(0.55)
    assert s.lr(110, 0) == pytest.approx(0.1)


def test_batch_change_lands_at_the_step_boundary_with_accumulation(tmp_path):
    cfg = tiny(TINY_IMAGES, "steps=6", "batch_size=8", "micro_batch_size=4", "eval_every=0")
    cfg.changes = [Change(at_step=4, batch_size=16)]
    rd = RunDir.create(tmp_path, cfg)
    assert train(rd) == "done"
    recs = [r for r in rd.metrics()[0] if "loss" in r]
    assert [r["batch_size"] for r in recs] == [8, 8, 8, 8, 16, 16]
    assert [r["samples"] for r in recs] == [8, 16, 24, 32, 48, 64]
    ev = next(e for e in rd.events()[0] if e["event"] == "schedule")
    assert (ev["step"], ev["samples"], ev["changed"]) == (4, 32, {"batch_size": [8, 16]})


def test_accumulated_gradient_equals_full_batch_gradient(tmp_path):
    """Micro-batching is invisible to the optimizer (no BatchNorm: a GPT-2 twin)."""
    from tests.conftest import TINY_LM
    losses = {}
    for micro in (0, 2):
        cfg = tiny(TINY_LM, "steps=3", f"micro_batch_size={micro}", "eval_every=0", name=f"m{micro}")
        rd = RunDir.create(tmp_path, cfg)
        assert train(rd) == "done"
        losses[micro] = [r["loss"] for r in rd.metrics()[0] if "loss" in r]
    assert losses[0] == pytest.approx(losses[2], rel=1e-5)
    assert all(math.isfinite(x) for x in losses[0])
