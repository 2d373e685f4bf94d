"""Issue 24: checkpoints at matched losses (`checkpoint_at_losses`, engine/levels.py)."""
import json

import pytest

from engine.store.ckptmeta import read_meta
from engine.config import ConfigError
from engine.levels import LossLevels
from engine.store.rundir import RunDir
from engine.train.loop import train
from tests.conftest import TINY_IMAGES, tiny


def drive(levels: LossLevels, loss, steps: int, eval_every: int):
    """The trainer's use of LossLevels, on a loss curve given as a function of the step."""
    evals, reached = [], []
    reached += levels.crossed(0, loss(0))
    evals.append(0)
    for step in range(1, steps + 1):
        if step % eval_every == 0 or levels.eval_due(step):
            evals.append(step)
            reached += [dict(r, step=step) for r in levels.crossed(step, loss(step))]
    return evals, reached


def test_a_steady_fall_is_checkpointed_within_the_tolerance_of_each_level():
    # 3 - 0.001 * step: level 2.5 is reached at step 500 and 2.0 at step 1000, by hand
    lv = LossLevels([2.5, 2.0], tol=0.01, eval_every=400)
    evals, reached = drive(lv, lambda s: 3 - 0.001 * s, 1200, 400)
    assert [r["level"] for r in reached] == [2.5, 2.0]
    for r in reached:
        assert r["within"] and -0.01 * r["level"] <= r["gap"] <= 0
    steps = {r["level"]: r["step"] for r in reached}
    assert 500 <= steps[2.5] <= 525 and 1000 <= steps[2.0] <= 1020   # at most tol x level / 0.001 late
    assert len(evals) < 40                                          # not an eval every step
    # negative control: the run's own cadence alone lands far from the levels
    plain = [s for s in range(0, 1201, 400)]
    first_below = {v: next(s for s in plain if 3 - 0.001 * s <= v) for v in (2.5, 2.0)}
    assert abs((3 - 0.001 * first_below[2.5]) - 2.5) > 0.01 * 2.5


def test_levels_already_below_are_not_crossed_and_a_jump_is_recorded_with_its_gap():
    lv = LossLevels([3.5, 2.5, 2.4], tol=0.01, eval_every=10)
    assert lv.crossed(0, 3.0) == []                    # started below 3.5: never reached from above
    out = lv.crossed(10, 2.3)                           # one eval past two levels at once
    assert [(r["level"], round(r["gap"], 9), r["within"]) for r in out] == [(2.5, -0.2, False), (2.4, -0.1, False)]
    assert lv.pending() == [3.5] and lv.crossed(20, 1.0) == []
    # the state a checkpoint keeps gives the same decisions after a resume
    again = LossLevels([3.5, 2.5, 2.4], tol=0.01, eval_every=10)
    again.load_state_dict(json.loads(json.dumps(lv.state_dict())))
    assert (again.taken, again.last, again.next_eval) == (lv.taken, lv.last, lv.next_eval)


SMOOTH = ("steps=150", "eval_every=25", 'model.name="cnn"', "model.width=8", "lr=0.02", "batch_size=128")
LEVELS = "checkpoint_at_losses=[2.25, 2.2, 2.15, 2.1, 2.05]"


def ckpts(rd):
    return {s: read_meta(p) for s, p in rd.list_checkpoints()}


def test_a_run_checkpoints_within_tolerance_of_every_level_it_crosses_and_trains_the_same(tmp_path):
    rd = RunDir.create(tmp_path, tiny(TINY_IMAGES, *SMOOTH, LEVELS, name="lv"))
    assert train(rd) == "done"
    found = {tuple(m["loss_levels"]): m["eval_loss"] for m in ckpts(rd).values() if "loss_levels" in m}
    assert sorted(v for k in found for v in k) == [2.05, 2.1, 2.15, 2.2, 2.25]
    for levels, loss in found.items():
        for v in levels:
            assert v - 0.01 * v <= loss <= v, (v, loss)      # within 1 % of its level, and reached
    # each checkpoint's eval loss is the eval record at its step (read independently)
    evals = {r["step"]: r["eval_loss"] for r in rd.metrics()[0] if "eval_loss" in r}
    for s, m in ckpts(rd).items():
        assert m["eval_loss"] == evals[s]
    events = [e for e in rd.events()[0] if e["event"] == "checkpoint" and "loss_levels" in e]
    assert [r["level"] for e in events for r in e["loss_levels"]] == [2.25, 2.2, 2.15, 2.1, 2.05]
    # the extra evals do not change the training: the train losses equal a run without levels
    plain = RunDir.create(tmp_path, tiny(TINY_IMAGES, *SMOOTH, name="plain"))
    assert train(plain) == "done"
    train_loss = lambda r: [(x["step"], x["loss"]) for x in r.metrics()[0] if "loss" in x]
    assert train_loss(rd) == train_loss(plain)
    assert not any("loss_levels" in m for m in ckpts(plain).values())     # negative control


def test_a_stopped_and_resumed_run_takes_the_same_levels_at_the_same_steps(tmp_path):
    whole = RunDir.create(tmp_path, tiny(TINY_IMAGES, *SMOOTH, LEVELS, name="whole"))
    assert train(whole) == "done"
    cut = RunDir.create(tmp_path, tiny(TINY_IMAGES, *SMOOTH, LEVELS, name="cut"))

    def stop_at_95(t):
        t.stop_requested = t.stop_requested or t.step == 95
    assert train(cut, hooks=[stop_at_95]) == "stopped"
    assert train(cut, resume=True) == "done"
    taken = lambda rd: {s: (m.get("loss_levels"), m["eval_loss"]) for s, m in ckpts(rd).items() if "loss_levels" in m}
    assert taken(cut) == taken(whole) and len(taken(whole)) >= 4
    recs = lambda rd: [{k: v for k, v in r.items() if k != "wall"} for r in rd.metrics()[0]]
    assert recs(cut) == recs(whole)


def test_bad_levels_are_one_line():
    for item, line in (("checkpoint_at_losses=[2.0, -1.0]", "'checkpoint_at_losses' entries must be held-out "
                                                             "losses > 0 (nats), got -1.0"),
                       ("checkpoint_loss_tol=1.5", "'checkpoint_loss_tol' must be in (0, 1), got 1.5")):
        with pytest.raises(ConfigError) as e:
            tiny(TINY_IMAGES, item)
        assert str(e.value) == f"<test>: {line}"
