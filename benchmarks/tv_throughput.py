"""TV throughput vs two plain forward passes of the same models on the same data.

    python benchmarks/tv_throughput.py [--width 16] [--n 4096] [--repeats 5] [--device auto]

Both sides see the same EvalSet batches (CIFAR-shaped, ResNet-18). "Plain" runs model_a(x) and
model_b(x) under no_grad and nothing else; "TV" is engine.analysis.tv.compare_models (softmaxes, TV, losses,
errors). The goal: TV rate ≥ 0.9 × the plain rate.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.config import build  # noqa: E402
from engine.models import build_model  # noqa: E402
from engine.train.loop import pick_device  # noqa: E402
from engine.analysis.tv import EvalSet, autocast_for, compare_models  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    device = pick_device(args.device)
    cfg = build({"model": {"name": "resnet18", "width": args.width}, "batch_size": 512, "device": str(device),
                 "data": {"source": "synthetic_images", "image_size": 32, "eval_samples": args.n}}, "bench")
    ev = EvalSet(cfg, device, args.n)
    torch.manual_seed(0)
    a, b = build_model(cfg.model).to(device).eval(), build_model(cfg.model).to(device).eval()
    if device.type == "cuda":
        a, b = a.to(memory_format=torch.channels_last), b.to(memory_format=torch.channels_last)
    ac = autocast_for(cfg, device)

    @torch.no_grad()
    def plain():
        with ac or torch.autocast("cpu", enabled=False):
            for x, _ in ev.batches:
                a(x)
                b(x)

    def tv():
        compare_models(a, b, ev, ac)

    plain(), tv()  # warm-up
    tp, tt = [], []
    for _ in range(args.repeats):
        for fn, acc in ((plain, tp), (tv, tt)):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            acc.append(time.perf_counter() - t0)
    rate_plain, rate_tv = ev.size / min(tp), ev.size / min(tt)
    print(f"device {device}; {ev.size} examples; plain (2 forwards) {rate_plain:.0f} ex/s, TV {rate_tv:.0f} ex/s")
    print(f"TV / plain throughput (best of {args.repeats}): {rate_tv / rate_plain:.3f}  "
          f"(median {statistics.median(tp) / statistics.median(tt):.3f}; goal >= 0.9)")


if __name__ == "__main__":
    main()
