"""Data streams: batches of a requested size, online or offline, plus a fixed held-out set.

    stream = build_stream(cfg, device)
    x, y = stream.next_batch(n)          # n may change between calls (batch-size changes)
    for x, y in stream.eval_batches(b):  # the same examples every time
    stream.state_dict() / load_state_dict()   # exact position, JSON

Sources:  synthetic_images (teacher CNN), synthetic_tokens (order-2 Markov), cifar5m (.npz parts),
          cifar10 (torchvision folder), c4 (prepared uint16 shards, engine/data/tokens.py; or raw text
          through 🤗 datasets, hub or local c4-*.json.gz, tokenized as it streams: slower), imagenet (folder).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from engine.config import Config
from engine.errors import DataMissing

if TYPE_CHECKING:  # torch is imported by the streams, not by `import engine.data` (the CLI starts without it)
    import torch

    from engine.data.stream import Stream


def build_stream(cfg: Config, device: "torch.device") -> "Stream":
    from engine.data.stream import Stream

    dc = cfg.data
    if dc.source == "synthetic_images":
        from engine.data.synthetic import TeacherImages
        src = TeacherImages(dc, cfg.model.num_classes, cfg.data_seed)
    elif dc.source == "synthetic_tokens":
        from engine.data.synthetic import MarkovTokens
        src = MarkovTokens(dc, cfg.data_seed, device)
    elif dc.source == "cifar5m":
        from engine.data.images import cifar5m
        src = cifar5m(dc, device)
    elif dc.source == "cifar10":
        from engine.data.images import cifar10
        src = cifar10(dc, device)
    elif dc.source == "imagenet":
        from engine.data.images import imagenet
        src = imagenet(dc, device)
    elif dc.source == "c4":
        from engine.data.c4 import C4, prepared_c4
        src = prepared_c4(dc, device) or C4(dc)
    else:
        raise ValueError(dc.source)
    return Stream(src, dc, seed=cfg.seed, device=device)


__all__ = ["build_stream", "Stream", "DataMissing"]


def __getattr__(name: str):
    if name == "Stream":
        from engine.data.stream import Stream
        return Stream
    raise AttributeError(name)


def preflight(cfg: Config) -> None:
    """Raise DataMissing (one line: what, where it looked, which key) if real data is absent.

    Cheap: looks for files, loads nothing. Synthetic sources always pass.
    """
    import os
    from pathlib import Path

    dc = cfg.data
    root = Path(os.path.expanduser(dc.path)) if dc.path else None
    if dc.source == "cifar5m":
        root = root or Path(os.path.expanduser("~/data/cifar5m"))
        if not list(root.glob("part*.npz")) and not list(root.glob("part*.X.npy")):
            raise DataMissing(f"CIFAR-5m not found: no part0.npz … part5.npz in {root} (set data.path=DIR, or "
                              f"download it: gpctl data get cifar5m --out {root}, ~18 GB)")
    elif dc.source == "cifar10":
        root = root or Path(os.path.expanduser("~/data"))
        if not (root / "cifar-10-batches-py").is_dir():
            raise DataMissing(f"CIFAR-10 not found: no cifar-10-batches-py in {root} (set data.path=DIR)")
    elif dc.source == "imagenet":
        root = root or Path(os.path.expanduser("~/data/imagenet"))
        if (root / "meta.json").is_file():
            from engine.data.prepared_images import read_meta
            size = read_meta(root)["size"]
            if dc.resize != size:
                raise DataMissing(f"{root}: prepared at {size}×{size} but data.resize = {dc.resize} (set data.resize={size})")
        elif not (root / "train").is_dir() or not (root / "val").is_dir():
            raise DataMissing(f"ImageNet not found: no train/ and val/ and no prepared shards (meta.json) in {root} "
                              f"(set data.path=DIR; gpctl data prepare imagenet --path DIR --out DIR2 resizes it once)")
    elif dc.source == "c4" and root is not None:
        if not list(root.glob("c4-train*.json*")) and not (root / "meta.json").is_file():
            raise DataMissing(f"C4 not found: no c4-train.*.json.gz and no prepared shards (meta.json) in {root} "
                              f"(set data.path=DIR, or data.path='' to stream {dc.hf_name} from the hub)")
