"""Issue 28: `gpctl presets check --cost`: each arm's wall time and GPU-hours from a step time
measured on this machine (a probe per model and batch, cached in the home), summed over the arm's
stretches at one batch size. The arithmetic is checked by hand against a stubbed probe; the probe
itself is real and runs here, on the CPU."""
import json

import pytest
from typer.testing import CliRunner

from engine.analysis import cost as costmod
from engine.plan import plan
from engine.presets import load_preset
from gpctl.cli import app


def stub(cfg, batch, device):
    return 0.001 * batch + 0.01, ""      # seconds per step: a made-up linear cost


def test_an_arms_cost_is_its_stretches_times_their_step_times(tmp_path):
    arms = {c.name: c for c in load_preset("demo").configs()}
    pl = plan(arms["bs32to512"])
    # demo: 200 steps, batch 32 until step 50, then 512 (presets/demo.toml)
    assert costmod.stretches(pl) == [(32, 50), (512, 150)]
    c = costmod.cost(pl, "cpu", tmp_path, measure=stub)
    assert c.seconds == pytest.approx(50 * (0.032 + 0.01) + 150 * (0.512 + 0.01))      # 2.1 + 78.3 = 80.4 s
    assert c.seconds == pytest.approx(80.4) and c.gpu_hours == pytest.approx(80.4 / 3600) and c.gpus == 1
    assert costmod.stretches(plan(arms["bs512"])) == [(512, 200)]
    # negative control: without the change the arm costs what 200 steps at 32 cost
    flat = plan(load_preset("demo").configs(["changes=[]"], arms=["bs32to512"])[0])
    assert costmod.cost(flat, "cpu", tmp_path, measure=stub).seconds == pytest.approx(200 * 0.042)


def test_presets_check_cost_prints_each_arm_and_caches_what_it_measured(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(costmod, "probe", lambda cfg, b, d: calls.append(b) or stub(cfg, b, d))
    home = tmp_path / "home"
    r = CliRunner()
    res = r.invoke(app, ["--home", str(home), "presets", "check", "demo", "--cost", "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    (rep,) = json.loads(res.stdout)
    by = {c["arm"]: c for c in rep["cost"]}
    assert by["bs32to512"]["seconds"] == pytest.approx(80.4)
    assert by["bs512"]["seconds"] == pytest.approx(200 * 0.522)
    assert [(s["batch_size"], s["steps"]) for s in by["bs32to512"]["stretches"]] == [(32, 50), (512, 150)]
    assert sorted(calls) == [32, 512]      # bs512 and its seed share the (model, batch) probe with bs32to512's
    cache = json.loads((home / "cache" / "step_times.json").read_text())
    assert sorted(v["batch"] for v in cache.values()) == [32, 512]
    res = r.invoke(app, ["--home", str(home), "presets", "check", "demo", "--cost", "--device", "cpu"])
    assert res.exit_code == 0 and sorted(calls) == [32, 512]          # the second time: from the cache
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("  COST demo bs32to512:"))
    assert line.startswith("  COST demo bs32to512: 1.34 min, 0.0223 GPU-h on 1 GPU(s) (50 steps at batch 32 × 42 ms, "
                           "150 steps at batch 512 × 522 ms; cached probe on cpu")
    res = r.invoke(app, ["--home", str(home), "presets", "check", "demo", "--cost", "--device", "tpu"])
    assert res.exit_code == 2 and "--device 'tpu' is not one of auto, cpu, cuda, cuda:N" in res.stderr


def test_the_probe_trains_the_arm_here_and_times_its_steps(tmp_path):
    """The real probe, on the CPU: the demo's arm at batch 32, eight steps of the engine's own loop."""
    cfg = load_preset("demo").configs()[0]
    sec, note = costmod.probe(cfg, 32, "cpu")
    assert 0 < sec < 5 and note == ""
    # a real preset whose data is not here: probed on synthetic data of the same shape, and said so
    real = load_preset("cifar_bs32_512").configs(["data.path='/nonexistent'", "model.width=4"])[0]
    c, note = costmod._probe_config(real, 32, "cpu")
    assert c.data.source == "synthetic_images" and c.data.image_size == 32 and "synthetic data of the same shape" in note
    assert (c.steps, c.batch_size, c.changes, c.eval_every) == (costmod.PROBE_STEPS, 32, [], 0)


def test_a_finished_run_keeps_its_step_times_and_the_queue_estimates_from_them(tmp_path):
    """Issue 28: an earlier run of the same model and batch is a step-time source: the worker keeps what
    a finished run measured (median seconds per step per batch, warm-up left out, by hand here); the
    queue's `est. time` of a queued run of that model is its planned steps × that, by hand; a model
    with no step time known says `?` (never a probe from `gpctl queue`)."""
    import statistics

    from typer.testing import CliRunner

    from engine.analysis.cost import WARM, record_run, run_step_times, step_times
    from engine.store.jobs import JobStore
    from engine.store.rundir import RunDir
    from gpctl.cli import app
    from tests.conftest import TINY_IMAGES, tiny
    home = tmp_path / "home"
    cfg = tiny(TINY_IMAGES, "steps=60", "log_every=1", "eval_every=0", "checkpoint_every=0")
    RunDir.create(home, cfg, run_id="done")
    # records by hand: 0.1 s a step, a slow first attempt start, a resume (wall restarts), a batch change
    recs, wall = [], 0.0
    for step in range(1, 61):
        bs = 16 if step <= 40 else 32
        if step == 21:
            wall = 0.0                                   # the resumed attempt's clock
        wall += 0.5 if step in (1, 2, 21) else (0.1 if bs == 16 else 0.3)
        recs.append({"step": step, "samples": step * bs, "lr_time": float(step), "wall": wall, "lr": 0.05,
                     "batch_size": bs, "loss": 2.0})
    got = run_step_times(recs)
    assert got == pytest.approx({16: 0.1, 32: 0.3})
    # by hand: the median of the consecutive differences, WARM left out after each restart and batch change
    diffs = [b["wall"] - a["wall"] for a, b in zip(recs, recs[1:]) if b["wall"] > a["wall"]]
    assert statistics.median(diffs) == pytest.approx(0.1) and WARM == 3
    kept = record_run(home, cfg, recs, "cpu", "done")
    assert kept == got
    hit = step_times(cfg, [16], "cpu", home, measure=False)
    assert hit == {16: (pytest.approx(0.1), "recorded by run done on cpu")}
    # a queued run of the same model: 60 steps at batch 16 (its own plan) -> 6 s
    q = RunDir.create(home, tiny(TINY_IMAGES, "steps=60", "device=cpu", name="q"), run_id="queued")
    other = RunDir.create(home, tiny(TINY_IMAGES, "steps=60", "device=cpu", "model.width=3", name="o"), run_id="other")
    store = JobStore(home)
    for rd in (q, other):
        store.enqueue(rd.id, rd.path)
    store.close()
    res = CliRunner().invoke(app, ["--home", str(home), "queue"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    row = next(line for line in lines if " queued " in line and line.split()[1] == "queued")
    assert row.split()[-1] == "0m06s"
    assert next(line for line in lines if line.split()[1:2] == ["other"]).split()[-1] == "?"
    assert "from recorded by run done on cpu" in res.stdout and "?: no step time known" in res.stdout
    data = __import__("json").loads(CliRunner().invoke(app, ["--home", str(home), "queue", "--json"]).stdout)
    by = {r["id"]: r for r in data}
    assert by["queued"]["eta"] == pytest.approx(6.0) and by["other"]["eta"] is None
