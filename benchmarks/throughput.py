"""Training throughput of the engine's real presets on this machine's accelerator.

    python benchmarks/throughput.py resnet   # ResNet-18, CIFAR-5m-shaped parts held on the GPU, batch 512, bf16
    python benchmarks/throughput.py gpt2     # GPT-2 124M, seq 2048, synthetic tokens, bf16, SDPA
    ... --compile  --steps N  --device cpu --small   (a quick CPU smoke run of the same path)

Prints img/s or tok/s over the timed steps (after warm-up) and the model FLOP utilization against
the goal in the README (3.33 GFLOP/img, 0.98 GFLOP/token; H100 dense bf16 peak 989 TFLOP/s).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.config import build  # noqa: E402
from engine.rundir import RunDir  # noqa: E402
from engine.train import Trainer  # noqa: E402

PEAK_BF16 = 989e12
FLOPS = {"resnet": 3.33e9, "gpt2": 0.98e9}   # fwd+bwd per image / per token, at full size


def make_parts(folder: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(2):
        np.savez(folder / f"part{i}.npz", X=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                 Y=rng.integers(0, 10, n))


def config(which: str, tmp: Path, args) -> dict:
    common = {"name": which, "preset": "throughput", "steps": args.steps, "eval_every": 0,
              "log_every": 10, "device": args.device, "compile": args.compile}
    if which == "resnet":
        folder = tmp / "c5m"
        folder.mkdir()
        make_parts(folder, 4096 if args.small else 65536)
        return {**common, "lr": 0.05, "batch_size": 32 if args.small else 512,
                "model": {"name": "resnet18", "width": 8 if args.small else 64},
                "data": {"source": "cifar5m", "path": str(folder), "eval_samples": 64, "on_device": True}}
    small = {"n_layer": 2, "n_head": 2, "n_embd": 64, "vocab_size": 512, "n_positions": 128}
    full = {"n_layer": 12, "n_head": 12, "n_embd": 768, "vocab_size": 50257, "n_positions": 2048}
    seq = 128 if args.small else 2048
    return {**common, "lr": 6e-4, "batch_size": 4 if args.small else 64, "micro_batch_size": 4 if args.small else 16,
            "model": {"name": "gpt2", **(small if args.small else full)},
            # uniform tokens (teacher_sharpness 0) over the model's vocabulary: drawn at once, so the
            # benchmark measures the model, not the Markov generator's per-position Python loop
            "data": {"source": "synthetic_tokens", "vocab_size": (small if args.small else full)["vocab_size"],
                     "teacher_sharpness": 0.0, "seq_len": seq, "eval_samples": 4},
            "optim": {"name": "adamw", "grad_clip": 1.0}}


def measure(which: str, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = build(config(which, Path(tmp), args), "throughput")
        rd = RunDir.create(Path(tmp) / "home", cfg)
        t = Trainer(rd, cfg)
        t.setup(resume=False)
        t.save_checkpoint = lambda: None
        t.evaluate = lambda: {}
        t.run()
        recs = [r for r in rd.metrics()[0] if "loss" in r]
        a, b = recs[args.warmup - 1], recs[-1]
        per_s = (b["samples"] - a["samples"]) / (b["wall"] - a["wall"])
        unit = "img/s" if which == "resnet" else "tok/s"
        mfu = None if args.small else round(per_s * FLOPS[which] / PEAK_BF16, 4)
        return {"bench": which, "device": str(t.device), "precision": t.precision, "compile": cfg.compile,
                "rate": round(per_s, 1), "unit": unit, "mfu_vs_h100_bf16": mfu,
                "final_loss": b["loss"], "steps_timed": b["step"] - a["step"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("which", choices=["resnet", "gpt2"])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--small", action="store_true", help="tiny sizes: a CPU smoke run of the same path")
    args = ap.parse_args()
    if args.steps <= args.warmup + args.warmup % 10 or args.steps % 10:
        ap.error(f"--steps must be a multiple of 10 (the flush interval) above --warmup ({args.warmup})")
    print(json.dumps(measure(args.which, args)))


if __name__ == "__main__":
    main()
