"""Engine step loop vs a bare PyTorch loop: same model, same data stream, batch 32, CPU.

The control file is watched (one stat() per step), as in every run.
Both loops draw from the same kind of Stream (CIFAR-5m-shaped uint8 parts in a temp folder, held in
memory, normalized like the real thing), train the same CIFAR ResNet-18 (width --width) with SGD
m=0.9, and are timed over the same steps after a warm-up. The bare loop is what a researcher
would write by hand (forward, loss, backward, step, zero_grad; no logging). The engine loop is
`Trainer.run()` with everything a run does: schedule, hooks, buffered records, status, flushes.
Runs alternate (A B A B ...); it prints the median of per-pair ratios and the ratio of the best
times (the least disturbed run of each: the steadier number on a shared VM).

    python benchmarks/overhead.py [--steps 200] [--pairs 5] [--width 16] [--micro 8 | --noise-micro 8]

--micro M: both loops accumulate gradients over micro-batches of M (the bare one as a hand-written
loop does: loss × M/B, backward per micro-batch); the engine then also records the gradient noise
scale at every flush step (noise_scale, on by default where accumulation makes it free).
--noise-micro M: the bare loop trains whole batches; the engine opts in to the noise scale where it is
not free (`noise_micro = M`: each flush step, one in log_every = 20, cut into micro-batches of M): the
cost of measuring SGD noise in a run that does not accumulate.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.config import build  # noqa: E402
from engine.data import build_stream  # noqa: E402
from engine.models import build_model  # noqa: E402
from engine.store.rundir import RunDir  # noqa: E402
from engine.train.loop import Trainer  # noqa: E402


def make_parts(folder: Path, n: int = 8192) -> None:
    rng = np.random.default_rng(0)
    for i in range(2):
        np.savez(folder / f"part{i}.npz", X=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                 Y=rng.integers(0, 10, n))


def config(folder: Path, steps: int, width: int, micro: int = 0, noise_micro: int = 0):
    return build({"name": "bench", "preset": "overhead", "steps": steps, "lr": 0.05, "batch_size": 32,
                  "micro_batch_size": micro, "noise_micro": noise_micro, "eval_every": 0, "log_every": 20, "device": "cpu",
                  "model": {"name": "resnet18", "width": width},
                  "data": {"source": "cifar5m", "path": str(folder), "eval_samples": 32}}, "overhead")


def bare(cfg, warmup: int) -> float:
    torch.manual_seed(cfg.seed)
    stream = build_stream(cfg, torch.device("cpu"))
    model = build_model(cfg.model)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)
    model.train()
    for step in range(cfg.steps):
        if step == warmup:
            t0 = time.perf_counter()
        x, y = stream.next_batch(cfg.batch_size)
        micro = cfg.micro_batch_size or cfg.batch_size
        for i in range(0, cfg.batch_size, micro):
            loss = F.cross_entropy(model(x[i:i + micro]), y[i:i + micro]) * (micro / cfg.batch_size)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    loss.item()
    return time.perf_counter() - t0


def engine(cfg, warmup: int, root: Path) -> float:
    rd = RunDir.create(root, cfg)
    trainer = Trainer(rd, cfg)
    trainer.setup(resume=False)
    marks = {}
    trainer.hooks.append(lambda t: marks.setdefault(t.step, time.perf_counter()))
    trainer.cfg.eval_every = 0
    # time the step loop only: stop before the final eval/checkpoint by ending at `steps`
    trainer.save_checkpoint = lambda: None
    trainer.evaluate = lambda: {}
    trainer.run()
    end = time.perf_counter()
    return end - marks[warmup]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--micro", type=int, default=0, help="micro-batch size (0: the whole batch of 32)")
    ap.add_argument("--noise-micro", type=int, default=0,
                    help="the engine measures the noise scale on flush steps in micro-batches of this size")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "c5m"
        folder.mkdir()
        make_parts(folder)
        cfg = config(folder, args.steps, args.width, args.micro)
        ecfg = config(folder, args.steps, args.width, args.micro, args.noise_micro)   # the bare loop ignores it
        ratios, tb, te = [], [], []
        for i in range(args.pairs):
            b = bare(cfg, args.warmup)
            e = engine(ecfg, args.warmup, Path(tmp) / f"home{i}")
            tb.append(b)
            te.append(e)
            ratios.append(e / b)
            print(f"pair {i}: bare {b:.3f}s  engine {e:.3f}s  ratio {e / b:.4f}", flush=True)
        n = args.steps - args.warmup
        print(f"steps timed per loop: {n}; bare median {statistics.median(tb) / n * 1e3:.2f} ms/step, "
              f"engine median {statistics.median(te) / n * 1e3:.2f} ms/step")
        print(f"engine/bare ratio, median of {args.pairs} pairs: {statistics.median(ratios):.4f}; "
              f"best engine / best bare: {min(te) / min(tb):.4f}  (goal <= 1.02)")


if __name__ == "__main__":
    main()
