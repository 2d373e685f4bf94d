"""How fast ImageNet reaches the training step: JPEGs decoded per step vs shards prepared once (issue 28).

    python benchmarks/imagenet_stream.py [--images 512] [--batch 128] [--batches 8] [--threads N] [--json]

The benchmark writes `--images` synthetic JPEGs (ImageNet's typical 500×375, smooth colour fields with
texture and noise, ~100 kB each at quality 90) in 10 class folders, then measures on this machine's CPU:

  jpeg      the stream over the JPEG folders (data.resize = 256: decode + resize on `--threads` threads),
            images/s of `source.get` (what the host must deliver per step);
  prepare   `gpctl data prepare imagenet` on every core, run as a user runs it (CLI start, listing and
            worker start included, which a set this small does not amortize), and one worker's own
            decode + resize + write rate, what a full ImageNet runs at per core;
  prepared  the stream over the prepared shards: images/s of `source.get` (memory-map gather into
            one uint8 batch; warm page cache), with 1 and `--threads` threads;
  crop      RandomCrop(224) + flip + normalize of one batch on the CPU (on a GPU run this runs on the
            device), for scale.

Every measurement is repeated on the same batches from both paths and they are checked equal.
The ratio prepared/jpeg is the number to read; the absolute rates are this machine's.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.config import build  # noqa: E402
from engine.data import build_stream  # noqa: E402
from engine.data.prepared_images import _write_shard, listing  # noqa: E402


def make_jpegs(root: Path, n: int, classes: int = 10) -> int:
    from PIL import Image

    rng = np.random.default_rng(0)
    total = 0
    for i in range(n):
        d = root / "train" / f"n{i % classes:08d}"
        d.mkdir(parents=True, exist_ok=True)
        low = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(low).resize((500, 375), Image.Resampling.BICUBIC)).astype(np.int16)
        img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        p = d / f"img_{i:06d}.JPEG"
        Image.fromarray(img).save(p, quality=90)
        total += p.stat().st_size
    for c in range(classes):        # a small val split, which the stream needs
        d = root / "val" / f"n{c:08d}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(d / "v.JPEG", quality=90)
    return total


def config(path: Path, threads: int):
    return build({"name": "bench", "preset": "bench", "steps": 1, "lr": 0.1, "batch_size": 32, "device": "cpu",
                  "model": {"name": "resnet18", "width": 2},
                  "data": {"source": "imagenet", "path": str(path), "image_size": 224, "resize": 256,
                           "crop_padding": 0, "augment": ["crop", "flip"], "eval_samples": 10,
                           "workers": threads}}, "<benchmark>")


def rate(get, batches: list[torch.Tensor], repeat: int = 2) -> tuple[float, list]:
    """Images/s of get(idx) over the batches, best of `repeat` passes (the first warms the cache)."""
    best, outs = float("inf"), []
    for _ in range(repeat):
        t0 = time.perf_counter()
        outs = [get(idx)[0] for idx in batches]
        best = min(best, time.perf_counter() - t0)
    return sum(len(b) for b in batches) / best, outs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="imnet-bench-"))
    jpeg_bytes = make_jpegs(tmp / "jpeg", args.images)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, args.images, (args.batch,), generator=g) for _ in range(args.batches)]

    jpeg = build_stream(config(tmp / "jpeg", args.threads), torch.device("cpu")).source
    jpeg_rate, jpeg_out = rate(jpeg.get, batches)
    t0 = time.perf_counter()                # as a user runs it: the CLI, its start and its workers' included
    subprocess.run([sys.executable, "-m", "gpctl", "data", "prepare", "imagenet", "--path", str(tmp / "jpeg"),
                    "--out", str(tmp / "prep"), "--shard-images", str(max(1, args.images // (2 * args.threads))),
                    "--workers", str(args.threads)], check=True, stdout=subprocess.DEVNULL)
    prepare_rate = (args.images + 10) / (time.perf_counter() - t0)
    paths = [p for p, _ in listing(tmp / "jpeg" / "train")[1][:100]]
    t0 = time.perf_counter()                # one worker's own rate, no start-up: what a big set runs at
    _write_shard(paths, 256, str(tmp / "one.npy"))
    per_worker = len(paths) / (time.perf_counter() - t0)
    res = {"images": args.images, "batch": args.batch, "threads": args.threads, "cpus": os.cpu_count(),
           "jpeg_kB_per_image": round(jpeg_bytes / args.images / 1e3, 1), "jpeg_img_s": round(jpeg_rate),
           "prepare_img_s": round(prepare_rate), "prepare_img_s_per_worker": round(per_worker)}
    for t in sorted({1, args.threads}):
        prep = build_stream(config(tmp / "prep", t), torch.device("cpu")).source
        r, out = rate(prep.get, batches)
        assert all(torch.equal(a.permute(0, 3, 1, 2), b) for a, b in zip(out, jpeg_out)), "paths differ"
        res[f"prepared_img_s_{t}thread"] = round(r)
    stream = build_stream(config(tmp / "prep", args.threads), torch.device("cpu"))
    stream.next_batch(args.batch)
    t0 = time.perf_counter()
    for _ in range(args.batches):
        stream.next_batch(args.batch)
    res["prepared_stream_cpu_crop_img_s"] = round(args.batch * args.batches / (time.perf_counter() - t0))
    best = max(v for k, v in res.items() if k.startswith("prepared_img_s"))
    res["prepared_over_jpeg"] = round(best / jpeg_rate, 1)
    res["bytes_per_image_prepared"] = 256 * 256 * 3
    if args.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:34s} {v}")


if __name__ == "__main__":
    main()
