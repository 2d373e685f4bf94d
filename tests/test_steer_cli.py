import contextlib
import json
import threading
import time

import pytest
from typer.testing import CliRunner

from engine.store.rundir import RunDir
from engine.train.loop import train
from gpctl.cli import app
from tests.conftest import TINY_IMAGES, tiny

runner = CliRunner()


def invoke(home, *args):
    return runner.invoke(app, ["--home", str(home), *args])


@pytest.fixture
def run(home):
    cfg = tiny(TINY_IMAGES, "steps=40", "eval_every=0", "lr=0.05", "batch_size=16", "micro_batch_size=8",
               "checkpoint_every=10")
    rd = RunDir.create(home, cfg)
    rd.write_status(state="running")   # as a worker's job would be; the CLI steers running runs only
    return rd


@contextlib.contextmanager
def training_slowly(home, run, until):
    """Train `run` in a thread, slowed to 50 ms a step, once `until(run)` holds; stop it on the way out."""
    def slow(t):
        time.sleep(0.05)
    th = threading.Thread(target=train, args=(run,), kwargs={"hooks": [slow]})
    th.start()
    try:
        while not until(run):
            time.sleep(0.02)
        yield
    finally:
        invoke(home, "stop", run.id)
        th.join()


def _last_request(rd):
    return json.loads(rd.control_file.read_text().splitlines()[-1])


@pytest.mark.parametrize("args, expect", [
    (["set", "{id}", "lr=0.01", "batch_size=32"], {"set": {"lr": 0.01, "batch_size": 32}}),
    (["set", "{id}", "lr=0.5", "--ramp", "100"], {"set": {"lr": 0.5}, "ramp": 100.0}),
    (["drop", "{id}"], {"set": {"lr": 0.005}}),
    (["drop", "{id}", "--batch-factor", "16"], {"set": {"batch_size": 256}}),
    (["drop", "{id}", "--lr-factor", "4"], {"set": {"lr": 0.0125}}),
    (["raise", "{id}"], {"set": {"lr": 0.5}, "ramp": 100.0}),
    (["raise", "{id}", "--lr-factor", "2", "--ramp", "0"], {"set": {"lr": 0.1}}),
    (["raise", "{id}", "--batch-factor", "2"], {"set": {"batch_size": 8}}),
    (["stop", "{id}"], {"action": "stop"}),
    (["checkpoint", "{id}"], {"action": "checkpoint"}),
])
def test_commands_append_the_right_line(home, run, args, expect):
    res = invoke(home, *[a.format(id=run.id[:-2]) for a in args])
    assert res.exit_code == 0, res.output
    req = _last_request(run)
    assert res.stdout.strip() == req["id"] and len(req["id"]) == 8
    assert {k: v for k, v in req.items() if k not in ("id", "time", "by")} == expect


@pytest.mark.parametrize("args, line", [
    (["set", "{id}", "momentum=0.5"], 'error: expected lr=VALUE, batch_size=VALUE or ramp=N, got "momentum=0.5"'),
    (["raise", "{id}", "--batch-factor", "3"], "error: batch 16 is not divisible by --batch-factor 3"),
    (["drop", "{id}", "--lr-factor", "2", "--batch-factor", "2"], "error: give one of --lr-factor or --batch-factor"),
    (["stop", "nosuchrun"], "error: unknown run 'nosuchrun' in"),
    # issue 11: refused before anything is written
    (["drop", "{id}", "--lr-factor", "0.5"], "error: --lr-factor must be a number > 1, got 0.5 (drop divides the lr by it)"),
    (["raise", "{id}", "--lr-factor", "1"], "error: --lr-factor must be a number > 1, got 1 (raise multiplies the lr by it)"),
    (["drop", "{id}", "--batch-factor", "0"], "error: --batch-factor must be > 1, got 0 (drop multiplies the batch by it)"),
    (["set", "{id}", "lr=0.001,0.002"], "error: run {id} would reject it: 'lr' must be a number, got \"0.001,0.002\""),
    (["set", "{id}", "batch_size=12"], "error: run {id} would reject it: 'batch_size' = 12 is not a multiple of micro_batch_size = 8"),
    (["set", "{id}", "lr=1e9"], "error: run {id} would reject it: 'lr' = 1000000000.0 exceeds the sanity bound 5"),
    (["set", "{id}", "lr=0.1", "--ramp", "-3"], "error: run {id} would reject it: 'ramp' must be a number >= 0, got -3.0"),
])
def test_bad_steering_is_one_line(home, run, args, line):
    res = invoke(home, *[a.format(id=run.id) for a in args])
    assert res.exit_code == 2 and res.stderr.strip().startswith(line.format(id=run.id)), res.output
    assert len(res.stderr.strip().splitlines()) == 1
    assert run.control_file.read_text() == ""


def test_finished_run_refuses_requests(home):
    rd = RunDir.create(home, tiny(TINY_IMAGES, "steps=2", "eval_every=0"))
    assert train(rd) == "done"
    res = invoke(home, "drop", rd.id)
    assert res.exit_code == 2
    assert res.stderr.strip() == f"error: run {rd.id} is done: it takes no more requests (fork it: gpctl fork {rd.id})"


def test_wait_prints_where_it_took_effect(home, run):
    with training_slowly(home, run, until=lambda r: r.status().get("state") == "running"):
        res = invoke(home, "set", run.id, "batch_size=32", "--wait", "--timeout", "30")
        bad = invoke(home, "set", run.id, "batch_size=12", "--wait", "--timeout", "30")
    assert res.exit_code == 0, res.output
    sent, applied = res.stdout.strip().splitlines()
    rid = sent.split(":")[0]
    assert sent == f"{rid}: sent to {run.id}; waiting up to 30s for it to apply at the run's next step boundary"
    ack = next(e for e in run.events()[0] if e.get("id") == rid)
    samples = f"{ack['samples']:,}".replace(",", " ")
    assert applied == (f"{run.id}: batch 16 → 32 at step {ack['step']} (lr_time {ack['lr_time']:.1f}, "
                       f"samples {samples})")
    assert bad.exit_code == 2   # refused before it is written (issue 11), not answered by the run
    assert bad.stderr.strip() == (f"error: run {run.id} would reject it: 'batch_size' = 12 is not a multiple of "
                                  f"micro_batch_size = 8")


def test_fork_cli_links_parent_and_child(home):
    parent = RunDir.create(home, tiny(TINY_IMAGES, "steps=6", "eval_every=0", "checkpoint_every=3"))
    assert train(parent) == "done"
    res = invoke(home, "fork", parent.id, "--step", "3", "--set", "lr=0.005", "--name", "low", "--no-start")
    assert res.exit_code == 0, res.output
    child_id = res.stdout.strip()
    assert child_id.startswith("tiny-low-")
    shown = json.loads(invoke(home, "show", parent.id, "--json").stdout)
    assert shown["children"] == [child_id]
    child = json.loads(invoke(home, "show", child_id, "--json").stdout)
    assert child["parent"] == parent.id
    res = invoke(home, "resume", child_id, "--foreground")   # a fork that never ran starts from its parent's checkpoint
    assert res.exit_code == 0, res.output
    from engine.store.rundir import resolve
    recs = [r for r in resolve(home, child_id).metrics()[0] if "loss" in r]
    assert [r["step"] for r in recs] == [4, 5, 6] and {r["lr"] for r in recs} == {0.005}


def test_fork_queue_enqueues_the_child(home, monkeypatch):
    from engine.store.jobs import JobStore
    from gpctl import queue
    started = []
    monkeypatch.setattr(queue, "ensure_worker", lambda *a, **k: started.append(1) or True)
    parent = RunDir.create(home, tiny(TINY_IMAGES, "steps=6", "eval_every=0", "checkpoint_every=3"))
    assert train(parent) == "done"
    res = invoke(home, "fork", parent.id, "--step", "3", "--name", "branch")   # queued: the default
    assert res.exit_code == 0, res.output
    child_id, started_line = res.stdout.strip().splitlines()
    assert started_line.startswith("started a worker")
    store = JobStore(home)
    job = store.get(child_id)
    store.close()
    assert job.state == "queued" and started == [1]
    assert RunDir(home / "runs" / child_id).status()["state"] == "created"   # not trained here


def test_steering_a_run_that_is_not_running_is_refused_unless_asked(home):
    """Issue 11: `drop` on a queued baseline used to change the experiment silently at step 0."""
    from gpctl.common import State
    from gpctl.queue import enqueue
    rd = RunDir.create(home, tiny(TINY_IMAGES, "steps=6", "eval_every=0", "lr=0.05"))
    State.home = home
    enqueue([rd])
    res = invoke(home, "drop", rd.id)
    assert res.exit_code == 2
    assert res.stderr.strip() == (f"error: run {rd.id} is queued, not running: give it at creation (--set) or fork "
                                  f"it (gpctl fork {rd.id} --set …); --queued-ok sends it anyway, to apply at its "
                                  f"first step boundary")
    assert rd.control_file.read_text() == ""
    assert invoke(home, "stop", rd.id).exit_code == 0      # an action is no change of the experiment
    rd.control_file.write_text("")
    res = invoke(home, "drop", rd.id, "--queued-ok")
    assert res.exit_code == 0, res.output
    assert _last_request(rd)["queued_ok"] is True
    assert train(rd) == "done"
    (ack,) = [e for e in rd.events()[0] if e["event"] == "control"]
    assert (ack["status"], ack["step"], ack["queued_ok"], ack["changed"]["lr"]) == ("applied", 0, True, [0.05, 0.005])
    # cancelled in the queue: refused outright, even with --queued-ok
    rd2 = RunDir.create(home, tiny(TINY_IMAGES, "steps=6", "eval_every=0"))
    enqueue([rd2])
    assert invoke(home, "cancel", rd2.id).exit_code == 0
    res = invoke(home, "drop", rd2.id, "--queued-ok")
    assert res.exit_code == 2 and "is cancelled: it takes no more requests" in res.stderr
    assert rd2.control_file.read_text() == ""


def test_conditional_requests_wait_and_apply_at_the_exact_step(home):
    """Issue 11: drop at a step, at an lr_time, or when the (EMA) loss reaches a value; exact steps."""
    cfg = tiny(TINY_IMAGES, "steps=30", "eval_every=5", "log_every=1", "lr=0.05", "batch_size=16")
    rd = RunDir.create(home, cfg)
    rd.write_status(state="running")
    assert invoke(home, "drop", rd.id, "--at-step", "7").exit_code == 0
    assert invoke(home, "raise", rd.id, "--batch-factor", "2", "--at-lr-time", "12.5").exit_code == 0
    assert invoke(home, "checkpoint", rd.id, "--when", "eval_loss<99").exit_code == 0
    assert invoke(home, "stop", rd.id, "--when", "loss>1e9").exit_code == 0          # never holds
    bad = invoke(home, "drop", rd.id, "--when", "accuracy>0.5")
    assert bad.exit_code == 2 and "'when' must compare loss or eval_loss or noise_scale or grad_norm with a number" in bad.stderr
    two = invoke(home, "drop", rd.id, "--at-step", "3", "--when", "loss<1")
    assert two.exit_code == 2 and two.stderr.strip() == "error: give one of --at-step, --at-lr-time or --when"
    assert train(rd) == "done"
    acks = [e for e in rd.events()[0] if e["event"] == "control"]
    waiting = [a for a in acks if a["status"] == "waiting"]
    applied = {a["line"]: a for a in acks if a["status"] == "applied"}
    assert [(a["line"], a["step"]) for a in waiting] == [(1, 0), (2, 0), (3, 0), (4, 0)]
    # lr 0.05 until step 7, then 0.005: lr_time 7 at step 7, then +0.1 per step reaches 12.5 at step 62
    # -- beyond the run's 30 steps, so the batch raise never applies; the eval at step 5 meets eval_loss<99
    assert applied[1]["step"] == 7 and applied[1]["met"] == {"at_step": 7, "step": 7}
    assert applied[1]["changed"]["lr"] == [0.05, 0.005]
    assert applied[3]["step"] == 5 and applied[3]["action"] == "checkpoint"
    assert applied[3]["met"]["when"] == "eval_loss<99" and applied[3]["met"]["eval_loss"] < 99
    assert set(applied) == {1, 3}
    recs = [r for r in rd.metrics()[0] if "loss" in r]
    assert [r["lr"] for r in recs] == [0.05] * 7 + [0.005] * 23
    assert 5 in [s for s, _ in rd.list_checkpoints()]


def test_a_waiting_request_survives_a_resume(home):
    cfg = tiny(TINY_IMAGES, "steps=12", "eval_every=0", "lr=0.05", "checkpoint_every=4")
    rd = RunDir.create(home, cfg)
    rd.write_status(state="running")
    assert invoke(home, "drop", rd.id, "--at-step", "9").exit_code == 0
    assert invoke(home, "stop", rd.id, "--at-step", "5").exit_code == 0
    assert train(rd) == "stopped"
    assert [r["step"] for r in rd.metrics()[0] if "loss" in r][-1] == 5
    rd.write_status(state="running")
    assert train(rd, resume=True) == "done"
    recs = [r for r in rd.metrics()[0] if "loss" in r]
    assert [r["lr"] for r in recs] == [0.05] * 9 + [0.005] * 3
    applied = [(a["line"], a["step"]) for a in rd.events()[0] if a["event"] == "control" and a["status"] == "applied"]
    assert applied == [(2, 5), (1, 9)]


def test_preset_from_run_replays_a_steered_run_bit_for_bit(home, tmp_path):
    """Issue 11: the applied requests become planned changes; trained again, the records are equal."""
    from engine.presets import load_preset
    from tests.test_control import _write_at
    cfg = tiny(TINY_IMAGES, "steps=14", "eval_every=5", "lr=0.05", "lr_ref=0.05", "batch_size=16",
               "micro_batch_size=8", 'schedule.kind="cosine"', "schedule.warmup_steps=2")
    steered = RunDir.create(home, cfg, run_id="tiny-t-steered")
    lines = ['{"set": {"lr": 0.02}}\n', '{"set": {"batch_size": 32, "lr": 0.04}, "ramp": 0.5}\n',
             '{"action": "checkpoint"}\n', '{"set": {"lr": -1}}\n', '{"set": {"batch_size": 8}}\n']
    hooks = [_write_at(2, lines[0]), _write_at(5, lines[1]), _write_at(7, lines[2]), _write_at(9, lines[3] + lines[4])]
    assert train(steered, hooks=hooks) == "done"
    out_file = tmp_path / "replay.toml"
    res = invoke(home, "preset", "from-run", steered.id, "--out", str(out_file))
    assert res.exit_code == 0, res.output
    preset = load_preset(str(out_file))
    (rcfg,) = preset.configs()
    assert [(c.at_step, c.lr, c.batch_size, c.ramp, c.manual) for c in rcfg.changes] == [
        (3, 0.02, 0, 0.0, True), (6, 0.04, 32, 0.5, True), (10, 0.0, 8, 0.0, True)]
    assert rcfg.checkpoint_at_steps == [8]
    replay = RunDir.create(home, rcfg, run_id="tiny-t-replay")
    assert train(replay) == "done"
    strip = lambda rd: [{k: v for k, v in r.items() if k != "wall"} for r in rd.metrics()[0]]
    assert strip(replay) == strip(steered)
    assert [s for s, _ in replay.list_checkpoints()] == [s for s, _ in steered.list_checkpoints()]
    # negative control: the same config without the replayed changes is another run
    plain = RunDir.create(home, tiny(TINY_IMAGES, "steps=14", "eval_every=5", "lr=0.05", "lr_ref=0.05",
                                     "batch_size=16", "micro_batch_size=8", 'schedule.kind="cosine"',
                                     "schedule.warmup_steps=2"), run_id="tiny-t-plain")
    assert train(plain) == "done"
    assert strip(plain) != strip(steered)


def test_drop_at_matched_loss_with_a_twin(home):
    """Issue 11's worked example: `gpctl drop RUN --when 'eval_loss<X' --twin`. The drop applies at the
    first eval that meets X (the step an unsteered run predicts); the loop checkpoints there and names
    the twin, writing nothing outside its run directory (issue 25); the launcher forks and queues it,
    once however often it looks, and the twin continues exactly as the unsteered run."""
    from engine.launch.twins import fork_owed
    from engine.store.jobs import JobStore
    args = ("steps=20", "eval_every=5", "log_every=1", "lr=0.02", "batch_size=16", "checkpoint_every=0")
    plain = RunDir.create(home, tiny(TINY_IMAGES, *args), run_id="tiny-t-plain")
    assert train(plain) == "done"
    evals = [r for r in plain.metrics()[0] if "eval_loss" in r][:-1]
    best = min(evals, key=lambda r: r["eval_loss"])     # the first eval that gets below `target`
    target, at = best["eval_loss"] + 1e-12, best["step"]
    assert all(r["eval_loss"] >= target for r in evals if r["step"] < at) and 0 < at < 20
    rd = RunDir.create(home, tiny(TINY_IMAGES, *args), run_id="tiny-t-steered")
    rd.write_status(state="running")
    res = invoke(home, "drop", rd.id, "--when", f"eval_loss<{target!r}", "--twin")
    assert res.exit_code == 0, res.output
    before = sorted(p.name for p in (home / "runs").iterdir())
    assert train(rd) == "done"
    assert sorted(p.name for p in (home / "runs").iterdir()) == before    # the loop forked nothing
    (ack,) = [e for e in rd.events()[0] if e["event"] == "control" and e["status"] == "applied"]
    assert ack["step"] == at and ack["met"]["eval_loss"] == best["eval_loss"] and ack["changed"]["lr"] == [0.02, 0.002]
    assert ack["twin_checkpoint"] == f"step_{at:07d}.safetensors" and (rd.checkpoints / ack["twin_checkpoint"]).exists()
    store = JobStore(home)
    assert fork_owed(store, rd) == [ack["twin"]]
    assert fork_owed(store, rd) == []                   # once: a second look (another launcher) forks nothing
    twin = RunDir(home / "runs" / ack["twin"])
    assert twin.config().parent == rd.id and twin.config().parent_overrides == []
    assert twin.config().name == f"{rd.config().name}-twin{at}"
    assert store.get(twin.id).state == "queued"
    store.close()
    assert train(twin) == "done"
    strip = lambda recs: [{k: v for k, v in r.items() if k != "wall"} for r in recs if "loss" in r]
    assert strip(twin.metrics()[0]) == strip(plain.metrics()[0])[at:]       # the control: no intervention
    assert strip(rd.metrics()[0])[:at] == strip(plain.metrics()[0])[:at]   # the shared prefix
    assert strip(rd.metrics()[0])[at:] != strip(plain.metrics()[0])[at:]   # and the drop after it
    from engine.control import describe
    assert describe(ack, rd.id).endswith(f"; unsteered twin {twin.id} (from step_{at:07d}.safetensors, "
                                         "queued by the launcher)")


def test_the_worker_forks_and_queues_a_twin_its_job_asks_for(home):
    """The local launcher's half of issue 25's rule: a worker running a job reads the job's new events
    and queues the twin its acknowledgement names (here the job ends right after it, so the worker's
    last look at an ended job is what finds it); a twin whose checkpoint was deleted is reported once
    in the parent's events, never crashing the worker."""
    from engine.launch.worker import Worker
    from engine.store.jobs import JobStore
    rd = RunDir.create(home, tiny(TINY_IMAGES, "steps=6", "eval_every=0", "checkpoint_every=0"), run_id="tiny-t-w")
    rd.write_status(state="running")
    assert invoke(home, "drop", rd.id, "--lr-factor", "2", "--at-step", "3", "--twin").exit_code == 0
    rd.write_status(state="created")
    store = JobStore(home)
    store.enqueue(rd.id, rd.path, gpus=0)
    w = Worker(home, cpu_slots=1, poll=0.05)
    deadline = time.monotonic() + 120
    w.fill()
    while w.running and time.monotonic() < deadline:
        w.reap()
        time.sleep(0.05)
    (ack,) = [e for e in rd.events()[0] if e["event"] == "control" and e["status"] == "applied"]
    assert store.get(rd.id).state == "done" and ack["step"] == 3
    assert store.get(ack["twin"]).state == "queued"
    assert RunDir(home / "runs" / ack["twin"]).config().parent_checkpoint.endswith("step_0000003.safetensors")
    # negative control: the ack of a twin whose checkpoint is gone
    from engine.launch.twins import fork_owed
    gone = dict(ack, twin="tiny-t-w-twin-gone", step=5)
    assert fork_owed(store, rd, [gone]) == []
    assert [e["reason"] for e in rd.events()[0] if e["event"] == "twin_failed"] == [
        "run tiny-t-w has no checkpoint at step 5 (checkpoints: 3, 6)"]
    w.store.close()
    store.close()


def test_fork_now_asks_the_running_job_for_a_checkpoint_and_forks_there(home, run):
    """Issue 11: `--latest` on a young run found no checkpoint; `--now` makes one where the job is."""
    with training_slowly(home, run, until=lambda r: any("loss" in x for x in r.metrics()[0])):
        res = invoke(home, "fork", run.id, "--now", "--no-start", "--name", "now", "--timeout", "30")
    assert res.exit_code == 0, res.output
    child = RunDir(home / "runs" / res.stdout.strip())
    ack = next(e for e in run.events()[0] if e["event"] == "control" and e.get("action") == "checkpoint")
    assert ack["status"] == "applied" and 0 < ack["step"] < 40
    assert child.config().parent_checkpoint.endswith(f"step_{ack['step']:07d}.safetensors")
    res = invoke(home, "fork", run.id, "--now")          # the run has stopped: --now needs a running job
    assert res.exit_code == 2 and "not running: --now needs a running job" in res.stderr


def test_at_lr_time_applies_on_the_exact_step(home):
    cfg = tiny(TINY_IMAGES, "steps=12", "eval_every=0", "lr=0.05", "lr_ref=0.1")
    rd = RunDir.create(home, cfg)
    rd.write_status(state="running")
    assert invoke(home, "drop", rd.id, "--lr-factor", "5", "--at-lr-time", "3.5").exit_code == 0
    assert train(rd) == "done"
    (ack,) = [e for e in rd.events()[0] if e["event"] == "control" and e["status"] == "applied"]
    # 0.5 LR-normalized steps per step: lr_time 3.5 is reached at step 7 (by hand)
    assert (ack["step"], ack["lr_time"], ack["met"]["at_lr_time"]) == (7, 3.5, 3.5)
    assert [r["lr"] for r in rd.metrics()[0] if "loss" in r] == [0.05] * 7 + [0.01] * 5


def test_stop_wait_says_stopped_only_once_the_run_recorded_it(home, run):
    """Issue 31: `stop --wait` printed "stopped" when the stop was applied, before the run had
    checkpointed and ended (once, it failed after). It now waits for the run's own end."""
    def slow(t):
        time.sleep(0.05)
    th = threading.Thread(target=train, args=(run,), kwargs={"hooks": [slow]})
    th.start()
    try:
        while run.status().get("pid") is None:
            time.sleep(0.02)
        res = invoke(home, "stop", run.id, "--wait", "--timeout", "30")
    finally:
        th.join()
    assert res.exit_code == 0, res.output
    sent, applied, ended = res.stdout.strip().splitlines()
    st = run.status()
    assert st["state"] == "stopped" and applied.startswith(f"{run.id}: stopped at step ")
    assert ended == (f"{run.id}: stopped at step {st['step']} (step_{st['step']:07d}.safetensors; "
                     f"gpctl resume {run.id} continues it)")


def test_fork_now_that_meets_a_stop_forks_the_stop_checkpoint_and_leaves_no_request(home, run, monkeypatch):
    """Issue 26: `fork --now` racing a stop answered "no answer within 60s" though the run had
    stopped, and its checkpoint request fired on the next resume. Here the stop is applied first and
    the run's final checkpoint is slowed, so --now's request arrives while the run is still `running`
    and is never read by that attempt."""
    from engine.control import append_request, wait_for_ack
    from engine.train.loop import Trainer
    save = Trainer.save_checkpoint

    def slow_save(self, *a, **k):
        if self.stop_requested:
            time.sleep(1.5)     # the stop's checkpoint: --now's request lands meanwhile
        return save(self, *a, **k)
    monkeypatch.setattr(Trainer, "save_checkpoint", slow_save)
    th = threading.Thread(target=train, args=(run,), kwargs={"hooks": [lambda t: time.sleep(0.05)]})
    th.start()
    try:
        while run.status().get("pid") is None:
            time.sleep(0.02)
        assert wait_for_ack(run, append_request(run, {"action": "stop"}), 30)["status"] == "applied"
        res = invoke(home, "fork", run.id, "--now", "--no-start", "--name", "late", "--timeout", "30")
    finally:
        th.join()
    assert res.exit_code == 0, res.output
    st = run.status()
    assert st["state"] == "stopped"
    msg, child_id = res.stdout.strip().splitlines()
    assert msg == (f"run {run.id} stopped before it took the checkpoint request: forking its stop checkpoint "
                   f"(step {st['step']}); the request expires unused")
    child = RunDir(home / "runs" / child_id)
    assert child.config().parent_checkpoint.endswith(f"step_{st['step']:07d}.safetensors")
    # the resume reads the request and rejects it: no checkpoint at its first boundary
    monkeypatch.setattr(Trainer, "save_checkpoint", save)
    before = [s for s, _ in run.list_checkpoints()]
    cp = next(e for e in run.events()[0] if e["event"] == "control" and e.get("action") == "stop")
    assert train(run, resume=True) == "done"
    late = [e for e in run.events()[0] if e["event"] == "control" and e["line"] == cp["line"] + 1]
    assert [e["status"] for e in late] == ["rejected"] and "earlier attempt" in late[0]["reason"]
    steps = [s for s, _ in run.list_checkpoints()]
    assert steps[: len(before)] == before and all(s % 10 == 0 for s in steps[len(before):])
    # negative control: the attempt rule rejects only another attempt's request
    t = Trainer.__new__(Trainer)
    t.attempt = 1.0
    assert t._other_attempt({"action": "checkpoint", "attempt": 1.0}) is None
    assert t._other_attempt({"action": "checkpoint"}) is None
    assert "earlier attempt" in t._other_attempt({"action": "checkpoint", "attempt": 2.0})


def test_a_request_past_its_until_is_rejected_as_expired():
    from engine.control import expired, validate
    assert expired({"until": 100.0}, now=100.0) is None and expired({}, now=1e12) is None
    assert expired({"until": 100.0}, now=160.0).startswith("expired: not taken before its 'until'")
    assert expired({"until": 100.0}, now=160.0).endswith("60 s ago)")
    kw = dict(base_lr=0.1, micro_batch=0, max_lr_factor=100, max_batch=65536)
    assert validate({"action": "checkpoint", "until": "soon"}, **kw).startswith("'until' must be a number")
    assert validate({"action": "checkpoint", "attempt": None}, **kw).startswith("'attempt' must be a number")
    assert validate({"action": "checkpoint", "until": 1.0, "attempt": 2.0}, **kw) is None
