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
}
TINY_LM = {
    "steps": 6, "lr": 1e-3, "batch_size": 4, "eval_every": 3, "log_every": 2, "device": "cpu",
    "model": {"name": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 16, "vocab_size": 64, "n_positions": 32},
    "data": {"source": "synthetic_tokens", "vocab_size": 64, "seq_len": 16, "eval_samples": 8},
    "optim": {"name": "adamw", "grad_clip": 1.0},
}


def tiny(base: dict = TINY_IMAGES, *overrides: str, name: str = "t", preset: str = "tiny"):
    data = apply_overrides(base, list(overrides))
    data.update(name=name, preset=preset)
    return build(data, "<test>")


@pytest.fixture
def home(tmp_path, monkeypatch):
    h = tmp_path / "home"
    monkeypatch.setenv("GPCTL_HOME", str(h))
    return h


REPO = Path(__file__).resolve().parent.parent
GPT2_TOKENIZER = REPO.parent / "shared" / "data" / "gpt2-tokenizer"
