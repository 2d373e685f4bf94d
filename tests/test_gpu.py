"""GPU paths: bf16 autocast, channels_last, GPU-resident CIFAR with on-device crop/flip, fused
optimizers, torch.compile, SDPA GPT-2. Skipped cleanly without CUDA; run by benchmarks/gpu_check.sh."""
import numpy as np
import pytest
import torch

from engine.rundir import RunDir
from engine.train import Trainer, train
from tests.conftest import TINY_IMAGES, TINY_LM, tiny

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


def _parts(folder, n=256):
    folder.mkdir()
    rng = np.random.default_rng(0)
    np.savez(folder / "part0.npz", X=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), Y=rng.integers(0, 10, n))
    return folder


def test_bf16_channels_last_gpu_resident_cifar(tmp_path):
    folder = _parts(tmp_path / "c5m")
    cfg = tiny(TINY_IMAGES, "device=\"cuda\"", "data.source=\"cifar5m\"", f"data.path=\"{folder}\"",
               "data.image_size=32", "data.augment=[\"crop\", \"flip\"]", "data.eval_samples=32")
    rd = RunDir.create(tmp_path / "h", cfg)
    t = Trainer(rd, cfg)
    t.setup(resume=False)
    assert t.precision == "bf16" and t.channels_last
    assert t.stream.source.x.device.type == "cuda" and t.stream.source.x.dtype == torch.uint8
    assert all(g.get("fused") for g in t.optimizer.param_groups)
    assert t.run() == "done"
    losses = [r["loss"] for r in rd.metrics()[0] if "loss" in r]
    assert len(losses) == cfg.steps and all(np.isfinite(losses))


def test_compile_and_sdpa_gpt2(tmp_path):
    cfg = tiny(TINY_LM, "device=\"cuda\"", "compile=true", "steps=4")
    rd = RunDir.create(tmp_path, cfg)
    assert train(rd) == "done", rd.log_file.read_text()
    t = Trainer(rd, cfg)
    t.setup(resume=False)
    assert t.model.hf.config._attn_implementation == "sdpa"


def test_gpu_resume_is_exact_in_fp32(tmp_path):
    cfg = tiny(TINY_LM, "device=\"cuda\"", "precision=\"fp32\"", "steps=6", "checkpoint_every=3")
    full = RunDir.create(tmp_path, cfg, run_id="full")
    assert train(full) == "done"
    part = RunDir.create(tmp_path, cfg, run_id="part")

    def crash(t):
        if t.step == 4:
            raise RuntimeError("crash")
    assert train(part, hooks=[crash]) == "failed"
    assert train(part, resume=True) == "done"
    strip = lambda rd: [{k: v for k, v in r.items() if k != "wall"} for r in rd.metrics()[0]]
    assert strip(part) == strip(full)


def test_tv_on_gpu_matches_cpu(tmp_path):
    from engine.tv import tv_curve
    rds = []
    for name, extra in (("a", ["batch_size=4"]), ("b", [])):
        cfg = tiny(TINY_IMAGES, "steps=4", "checkpoint_every=2", "eval_every=0", "precision=\"fp32\"", *extra,
                   name=name)
        rd = RunDir.create(tmp_path / "h", cfg, run_id=name)
        assert train(rd) == "done"
        rds.append(rd)
    cpu = tv_curve(rds[0], rds[1], "step", device="cpu")
    rds[0].tv_cache_file.unlink()
    gpu = tv_curve(rds[0], rds[1], "step", device="cuda")
    assert [r["tv"] for r in gpu] == pytest.approx([r["tv"] for r in cpu], abs=1e-4)


def test_ddp_on_one_gpu_under_torchrun(tmp_path):
    import subprocess
    import sys
    cfg = tiny(TINY_LM, "device=\"cuda\"", "steps=4", "batch_size=8")
    rd = RunDir.create(tmp_path, cfg)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                          "-m", "engine", "train", str(rd.path)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert rd.status()["state"] == "done" and rd.status()["device"].startswith("cuda")

