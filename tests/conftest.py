import json
import os
from pathlib import Path

import pytest
import torch

from engine.config import apply_overrides, build

torch.set_num_threads(2)
os.environ["GPCTL_WORKER_IDLE_EXIT"] = "3"   # workers that tests start go away soon after

TINY_IMAGES = {
    "steps": 12, "lr": 0.05, "batch_size": 16, "eval_every": 6, "log_every": 4, "device": "cpu",
    "model": {"name": "resnet18", "width": 2},
    "data": {"source": "synthetic_images", "image_size": 8, "eval_samples": 64, "teacher_width": 8},
    "control": {"poll_ms": 0},   # hooks write control lines at a step and expect them read at that step
}
TINY_LM = {
    "steps": 6, "lr": 1e-3, "batch_size": 4, "eval_every": 3, "log_every": 2, "device": "cpu",
    "model": {"name": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 16, "vocab_size": 64, "n_positions": 32},
    "data": {"source": "synthetic_tokens", "vocab_size": 64, "seq_len": 16, "eval_samples": 8},
    "optim": {"name": "adamw", "grad_clip": 1.0},
    "control": {"poll_ms": 0},
}


@pytest.fixture(autouse=True)
def _own_cache(tmp_path_factory, monkeypatch):
    """The TUI keeps its view in $XDG_CACHE_HOME: each test its own, never the user's ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))


def tiny(base: dict = TINY_IMAGES, *overrides: str, name: str = "t", preset: str = "tiny"):
    data = apply_overrides(base, list(overrides))
    data.update(name=name, preset=preset)
    return build(data, "<test>")


@pytest.fixture
def home(tmp_path, monkeypatch):
    h = tmp_path / "home"
    monkeypatch.setenv("GPCTL_HOME", str(h))
    return h


@pytest.fixture
def tokenizer_dir(tmp_path):
    """A tiny GPT-2 (byte-level BPE) tokenizer folder, trained here with `tokenizers`."""
    from tokenizers import ByteLevelBPETokenizer

    folder = tmp_path / "tok"
    folder.mkdir()
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["the cat sat on a mat while dogs ran in the park and birds sang songs"] * 20,
                            vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"])
    bpe.save_model(str(folder))
    return folder


REPO = Path(__file__).resolve().parent.parent
GPT2_TOKENIZER = REPO.parent / "shared" / "data" / "gpt2-tokenizer"


T_FIXED = 1_800_000_000.0   # 2027-01-15 08:00 UTC: the fixed clock of fixed_runs


FIXED_PROVENANCE = {"created": T_FIXED, "code": {"version": "0.1.0", "root": "/src/gpctl", "git": {
    "commit": "0123456789abcdef0123456789abcdef01234567", "dirty": False, "diff_bytes": 0, "diff_sha256": None,
    "untracked": [], "untracked_count": 0}}, "environment": {"python": "3.11.2", "platform": "Linux", "host": "gpubox",
                                                              "torch": "2.5.1", "executable": "/usr/bin/python3"}}


def fixed_runs(home: Path) -> list:
    """The demo's three arms as finished runs with fixed ids, times and loss curves (no training):
    input for the TUI's snapshot tests and the README's capture, identical on every machine."""
    import math

    from engine.presets import load_preset
    from engine.store.rundir import RunDir

    out = []
    for k, cfg in enumerate(load_preset("demo").configs()):
        rd = RunDir.create(home, cfg, run_id=f"demo-{cfg.name}-00000{k}")
        t0 = T_FIXED + 300 * k
        recs, events = [], [{"event": "start", "time": t0, "step": 0, "lr_time": 0.0, "device": "cpu"}]
        for s in range(1, cfg.steps + 1):
            batch = cfg.changes[0].batch_size if cfg.changes and s > cfg.changes[0].at_step else cfg.batch_size
            wiggle = 0.04 * math.sin(1.7 * s + k) * (4.0 if batch == 32 else 1.0)
            if batch == 32:        # high noise: a slower curve; after the drop, batch 512's curve 30 steps later
                loss = 0.95 + 1.6 * math.exp(-s / 140) + wiggle
            else:
                loss = 0.7 + 1.6 * math.exp(-(s - (30 if cfg.changes else 0)) / 70) + wiggle
            recs.append({"step": s, "samples": s * batch, "lr_time": float(s), "wall": 0.5 * s, "lr": cfg.lr,
                         "batch_size": batch, "loss": round(loss, 6)})
            if s % cfg.eval_every == 0:
                recs.append({"step": s, "samples": s * batch, "lr_time": float(s), "wall": 0.5 * s,
                             "eval_loss": round(loss - wiggle + 0.02, 6), "eval_error": 0.3})
            if cfg.changes and s == cfg.changes[0].at_step:
                events.append({"event": "schedule", "time": t0 + 0.5 * s, "source": "preset", "change": 0, "step": s, "samples": s * 32,
                               "lr_time": float(s), "changed": {"batch_size": [32, 512]}})
            if s % cfg.checkpoint_every == 0:
                events.append({"event": "checkpoint", "time": t0 + 0.5 * s, "step": s, "lr_time": float(s)})
        events.append({"event": "end", "time": t0 + 0.5 * cfg.steps, "state": "done", "step": cfg.steps})
        rd.append_metrics(recs)
        with open(rd.events_file, "a") as f:
            f.write("".join(json.dumps(e) + "\n" for e in events))
        rd.write_status(state="done", device="cpu", created=t0, started=t0, step=cfg.steps)
        (rd.path / "provenance.json").write_text(json.dumps(FIXED_PROVENANCE))   # not this checkout's commit
        (rd.path / "code.diff").unlink(missing_ok=True)
        out.append(rd)
    return out
