import json

import pytest
import torch

from engine.train import checkpoint as ckpt
from engine.store.rundir import RunDir
from engine.train.loop import train
from tests.conftest import TINY_IMAGES, TINY_LM, tiny


def _records(rd):
    return [{k: v for k, v in r.items() if k != "wall"} for r in rd.metrics()[0]]


class Crash(RuntimeError):
    pass


def _crash_at(step):
    def hook(trainer):
        if trainer.step == step:
            raise Crash(f"simulated crash at step {step}")
    return hook


@pytest.mark.parametrize("base, extra", [
    (TINY_IMAGES, ["data.augment=[\"crop\", \"flip\"]"]),
    (TINY_LM, ["steps=8", "micro_batch_size=2"]),
])
def test_resume_after_a_crash_is_exact(tmp_path, base, extra):
    cfg = tiny(base, "checkpoint_every=4", "eval_every=3", *extra)
    cfg.changes = []
    full = RunDir.create(tmp_path, cfg, run_id="full")
    assert train(full) == "done"
    broken = RunDir.create(tmp_path, cfg, run_id="broken")
    assert train(broken, hooks=[_crash_at(7)]) == "failed"
    assert "simulated crash at step 7" in broken.status()["error"]
    assert train(broken, resume=True) == "done"
    assert _records(broken) == _records(full)
    resumed = [e for e in broken.events()[0] if e["event"] == "resume"]
    assert (resumed[0]["step"], resumed[0]["checkpoint"]) == (4, "step_0000004.safetensors")
    w_full, _ = ckpt.load_weights(full.list_checkpoints()[-1][1])
    w_res, _ = ckpt.load_weights(broken.list_checkpoints()[-1][1])
    assert all(torch.equal(w_full[k], w_res[k]) for k in w_full)


def test_checkpoint_round_trip_with_metadata(tmp_path):
    cfg = tiny(TINY_IMAGES, "steps=6", "eval_every=0", "checkpoint_at_steps=[2]", "checkpoint_at_lr_times=[2.5]",
               "lr=0.05")
    rd = RunDir.create(tmp_path, cfg)
    assert train(rd) == "done"
    steps = [s for s, _ in rd.list_checkpoints()]
    assert steps == [2, 3, 6]                  # listed step, lr_time 2.5 crossed by step 3, the end
    weights, meta = ckpt.load_weights(rd.checkpoint_path(3))
    assert (meta["step"], meta["samples"], meta["model"], meta["run"]) == (3, 48, "resnet18", rd.id)
    assert meta["lr_time"] == pytest.approx(3.0)
    assert meta["model_config"]["width"] == 2
    evals = {r["step"]: r["eval_loss"] for r in rd.metrics()[0] if "eval_loss" in r}
    assert meta["eval_loss"] == evals[3]        # every checkpoint is evaluated (TV matching needs it)
    from engine.models import build_model
    model = build_model(cfg.model)
    ckpt.load_weights_into(model, weights, rd.checkpoint_path(3))
    assert all(torch.equal(model.state_dict()[k], weights[k]) for k in weights)


def test_corrupt_checkpoint_is_one_clear_line(tmp_path):
    bad = tmp_path / "step_0000001.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.load_weights(bad)
    assert str(e.value).startswith(f"{bad}: not a readable safetensors checkpoint")
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(bad))
    with pytest.raises(ckpt.CheckpointError, match="not a gpctl checkpoint"):
        ckpt.read_meta(bad)


def test_state_file_holds_no_pickle(tmp_path):
    cfg = tiny(TINY_LM, "steps=2", "eval_every=0")
    rd = RunDir.create(tmp_path, cfg)
    assert train(rd) == "done"
    path = rd.checkpoint_path(2)
    tensors, state = ckpt.load_state(path)
    assert state["loop"]["step"] == 2 and state["stream"]["position"] == 8
    assert {"rng.cpu", "optim.0.exp_avg", "optim.0.exp_avg_sq", "optim.0.step"} <= set(tensors)
    json.dumps(state)  # plain JSON through and through


def test_gpt2_checkpoint_loads_in_transformers(tmp_path):
    from transformers import GPT2LMHeadModel

    cfg = tiny(TINY_LM, "steps=2", "eval_every=0")
    rd = RunDir.create(tmp_path, cfg)
    assert train(rd) == "done"
    folder = ckpt.export_hf(rd.checkpoint_path(2), tmp_path / "hf")
    hf = GPT2LMHeadModel.from_pretrained(str(folder)).eval()
    from engine.models import build_model
    ours = build_model(cfg.model)
    weights, _ = ckpt.load_weights(rd.checkpoint_path(2))
    ckpt.load_weights_into(ours, weights, rd.checkpoint_path(2))
    tokens = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        assert torch.allclose(hf(input_ids=tokens).logits, ours.eval()(tokens), atol=1e-5)
    assert hf.config.n_layer == 1 and hf.config.vocab_size == 64


def test_nan_loss_ends_the_run_as_diverged(tmp_path):
    cfg = tiny(TINY_LM, "steps=30", "lr=1e6", "optim.grad_clip=0.0", "log_every=1", "eval_every=0")
    rd = RunDir.create(tmp_path, cfg)
    assert train(rd) == "diverged"
    st = rd.status()
    assert st["state"] == "diverged" and st["error"].startswith("loss is nan at step")
    ev = [e for e in rd.events()[0] if e["event"] == "diverged"]
    assert len(ev) == 1 and ev[0]["step"] < 30


def test_plain_cnn_student_shapes_and_parameters():
    """The reproduction's student: 3x3 convs 3->8, 8->16 (stride 2), 16->16, mean pool, linear."""
    from engine.config import ModelConfig
    from engine.models import build_model
    model = build_model(ModelConfig(name="cnn", width=8, depth=3))
    assert sum(p.numel() for p in model.parameters()) == (3 * 8 * 9 + 8) + (8 * 16 * 9 + 16) + (16 * 16 * 9 + 16) + (16 * 10 + 10)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    x = torch.randn(4, 3, 16, 16)
    assert model(x).shape == (4, 10)
    assert torch.equal(model.train()(x), model.eval()(x))   # no batch statistics: one function


@pytest.mark.parametrize("stop_at", [5, 6])   # between evals, and at an eval step
def test_sigterm_then_resume_leaves_the_records_of_an_uninterrupted_run(tmp_path, stop_at):
    """Issue 12: a SIGTERMed run that was resumed had one extra eval record (at the stop step)."""
    import os
    import signal
    cfg = tiny(TINY_IMAGES, "steps=9", "checkpoint_every=0", "eval_every=3")
    cfg.changes = []
    full = RunDir.create(tmp_path, cfg, run_id="full")
    assert train(full) == "done"
    cut = RunDir.create(tmp_path, cfg, run_id="cut")

    def term(trainer):
        if trainer.step == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)
    assert train(cut, hooks=[term]) == "stopped"
    assert cut.list_checkpoints()[-1][0] in (stop_at, stop_at + 1)
    assert train(cut, resume=True) == "done"
    assert _records(cut) == _records(full)
    evals = [r["step"] for r in _records(cut) if "eval_loss" in r]
    assert evals == [3, 6, 9]


def test_the_lm_loss_is_transformers_own():
    """Issue 13: the LM loss no longer slices a copy of the logits; checked against GPT2LMHeadModel's
    own shifted loss (labels=tokens), and a negative control without the shift."""
    import torch.nn.functional as F

    from engine.models import build_model
    from engine.train.loop import loss_fn
    cfg = tiny(TINY_LM)
    model = build_model(cfg.model).eval()
    x = torch.randint(0, cfg.model.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(x)
        ours = loss_fn(logits, x, None)
        theirs = model.hf(input_ids=x, labels=x.long()).loss
        unshifted = F.cross_entropy(logits.flatten(0, 1), x.flatten().long())
    assert float(ours) == pytest.approx(float(theirs), rel=1e-6)
    assert float(unshifted) != pytest.approx(float(theirs), rel=1e-3)
    total = loss_fn(logits, x, None, reduction="sum")
    assert float(total) == pytest.approx(float(ours) * 3 * 15, rel=1e-6)       # 15 predicted positions each


def test_a_run_lost_before_its_first_checkpoint_starts_again_exactly(tmp_path):
    """Issue 26: a job killed before its first checkpoint could never resume (every retry failed with
    `cannot resume: no checkpoint`). It now starts again from step 0, its records dropped, and ends with
    the records and weights of an uninterrupted run; the event says so. A run that took control
    requests before it was lost is refused (a restart would apply them at other steps), records kept."""
    from typer.testing import CliRunner

    from engine.control import append_request, event_text
    from gpctl.cli import app
    cfg = tiny(TINY_IMAGES, "checkpoint_every=100", "eval_every=3")
    cfg.changes = []
    full = RunDir.create(tmp_path, cfg, run_id="full")
    assert train(full) == "done"
    lost = RunDir.create(tmp_path, cfg, run_id="lost")
    assert train(lost, hooks=[_crash_at(7)]) == "failed"
    assert lost.list_checkpoints() == [] and len(_records(lost)) > 0
    res = CliRunner().invoke(app, ["--home", str(tmp_path), "resume", lost.id, "--foreground"])
    assert res.exit_code == 0, res.output
    assert lost.status()["state"] == "done"
    assert _records(lost) == _records(full)
    (restart,) = [e for e in lost.events()[0] if e["event"] == "resume"]
    assert restart["step"] == 0 and restart["checkpoint"] is None
    assert event_text(restart).startswith("restarted at step 0: no checkpoint yet: started again from step 0")
    w_full, _ = ckpt.load_weights(full.list_checkpoints()[-1][1])
    w_res, _ = ckpt.load_weights(lost.list_checkpoints()[-1][1])
    assert all(torch.equal(w_full[k], w_res[k]) for k in w_full)
    # negative control: steered before it was lost -> refused by the engine and the CLI, records kept
    steered = RunDir.create(tmp_path, cfg, run_id="steered")
    append_request(steered, {"set": {"lr": 0.01}, "queued_ok": True})
    assert train(steered, hooks=[_crash_at(7)]) == "failed"
    before = steered.metrics_file.read_bytes()
    assert train(steered, resume=True) == "failed"
    assert "took 1 control request(s)" in steered.status()["error"]
    res = CliRunner().invoke(app, ["--home", str(tmp_path), "resume", steered.id])
    assert res.exit_code == 2 and "took 1 control request(s)" in res.stderr
    assert steered.metrics_file.read_bytes() == before


def test_temp_files_of_killed_writers_are_swept_at_start(tmp_path):
    """Issue 26: `.status.json.PID.tmp` and `.step_*.tmp` of a writer killed between write and rename
    were never removed. At start the trainer removes those of dead processes older than a minute,
    and keeps a live writer's and a fresh one's."""
    import os
    import subprocess
    import time
    rd = RunDir.create(tmp_path, tiny(TINY_IMAGES, "steps=2"))
    dead = subprocess.Popen(["true"])
    dead.wait()
    old = time.time() - 3600
    names = {"stale": rd.path / f".status.json.{dead.pid}.tmp",
             "stale_ckpt": rd.checkpoints / f".step_0000004.safetensors.{dead.pid}.tmp",
             "live": rd.path / f".status.json.{os.getppid()}.tmp",
             "fresh": rd.checkpoints / f".step_0000008.safetensors.{dead.pid + 1000000}.tmp",
             "other": rd.path / ".notes.tmp"}
    for key, p in names.items():
        p.write_text("x")
        if key != "fresh":
            os.utime(p, (old, old))
    assert train(rd) == "done"
    assert not names["stale"].exists() and not names["stale_ckpt"].exists()
    assert names["live"].exists() and names["fresh"].exists() and names["other"].exists()
    assert "removed 2 temp file(s) of unfinished writes" in rd.log_file.read_text()
