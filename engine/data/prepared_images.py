"""Prepared ImageNet: every image decoded and resized once (App. A.2: "resized to 256×256") into
uint8 shards that training reads through a memory map, instead of decoding JPEGs on every step.

    gpctl data prepare imagenet --path SRC --out DIR     (prepare_images(), below)
    data.source = "imagenet", data.path = DIR            (PreparedImages)

DIR holds
    meta.json              format gpctl-images/1: the size, the resize rule, the classes (torchvision
                           ImageFolder's order), and per split its image count, shard size and shards;
                           written last, so a folder with meta.json is complete
    {split}_{k:06d}.npy    uint8 N×S×S×3 (NHWC, the CIFAR-5m layout), memory-mapped by readers
    {split}_labels.npy     int64, one label per image, in ImageFolder's sample order
    prepare.json           what is being prepared (the listing's fingerprint), for resuming

Pixels are the JPEG path's exactly (engine/data/images.py ImageFolderSource with data.resize = S):
both call `load_resized`, PIL's antialiased bilinear resize to S×S. So a run reads the same crops from
either; the prepared one only skips the decode. (The paper resized with OpenCV; its pixels differ
slightly from PIL's, which both of gpctl's paths share.)

Preparing is parallel over processes, one shard per task; each shard is written under a temporary name
and renamed whole, so an interrupted prepare resumes shard by shard when run again with the same
--path and --out. A file that is not an image stops it in one line naming that file.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from engine.errors import DataMissing

FORMAT = "gpctl-images/1"
RESIZE_RULE = "PIL bilinear (antialiased) to SxS, as data.resize on the JPEG folders"
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # ImageFolder's


class PrepareError(Exception):
    """One line naming the file or folder and what is wrong with it."""


def load_resized(path: str, size: int):
    """The image at `path` as RGB, resized to size×size: the one resize both image paths use."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
    return img.resize((size, size), Image.Resampling.BILINEAR)


def listing(split_dir: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """(classes, [(path, label)]) in torchvision ImageFolder's order: class folders sorted by name,
    files walked and sorted within each (the same lists `ImageFolder(split_dir)` builds)."""
    from torchvision.datasets.folder import find_classes, make_dataset

    classes, index = find_classes(str(split_dir))
    return classes, make_dataset(str(split_dir), index, extensions=IMG_EXTENSIONS)


def fingerprint(samples: list[tuple[str, int]], root: Path) -> str:
    """sha256 over each sample's path (relative to root), label and size: a changed listing is noticed."""
    h = hashlib.sha256()
    for path, label in samples:
        try:
            size = os.path.getsize(path)
        except OSError:
            size = -1
        h.update(f"{os.path.relpath(path, root)}\t{label}\t{size}\n".encode())
    return h.hexdigest()[:16]


def shard_name(split: str, k: int) -> str:
    return f"{split}_{k:06d}.npy"


def _write_shard(paths: list[str], size: int, final: str) -> int:
    """Worker: decode and resize `paths` into the shard `final` (temporary name, then renamed)."""
    tmp = final + ".tmp"
    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), size, size, 3))
    try:
        for i, p in enumerate(paths):
            try:
                arr[i] = np.asarray(load_resized(p, size))
            except (OSError, ValueError, SyntaxError) as e:     # PIL's errors for a file it cannot read
                raise PrepareError(f"{p}: not an image PIL can read ({e})") from None
        arr.flush()
    except BaseException:
        arr = None            # the map closed before its file goes
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    arr = None
    os.replace(tmp, final)
    return len(paths)


def _shard_ok(path: Path, n: int, size: int) -> bool:
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return False
    return a.dtype == np.uint8 and a.shape == (n, size, size, 3)


def prepare_images(src: Path, out: Path, size: int = 256, shard_images: int = 10_000, workers: int = 0,
                   splits: tuple[str, ...] = ("train", "val"),
                   progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Resize every image of src/<split>/<class>/ once into out's shards; returns meta.json's content.

    workers: processes (0: every core). Shards already written by an interrupted run of the same
    listing are kept. Raises PrepareError (one line) for a missing split, an unreadable image, a
    folder prepared from something else, or too little free disk."""
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
    from multiprocessing import get_context

    if size < 1 or shard_images < 1:
        raise PrepareError(f"size and shard_images must be at least 1, got {size} and {shard_images}")
    if (out / "meta.json").exists():
        raise PrepareError(f"{out}: already holds a prepared data set (meta.json); choose another --out")
    lists = {}
    for split in splits:
        d = src / split
        if not d.is_dir():
            raise PrepareError(f"{d}: no such folder (ImageNet's {split}/ of class folders)")
        try:
            classes, samples = listing(d)
        except (FileNotFoundError, OSError) as e:
            raise PrepareError(f"{d}: {e}") from None
        if not samples:
            raise PrepareError(f"{d}: no images in its class folders ({', '.join(IMG_EXTENSIONS)})")
        lists[split] = (classes, samples)
    classes = lists[splits[0]][0]
    for split, (cl, _) in lists.items():
        if cl != classes:
            raise PrepareError(f"{src / split}: its classes differ from {src / splits[0]}'s "
                               f"({len(cl)} vs {len(classes)} folders)")
    plan = {"format": FORMAT, "size": size, "source": str(src), "splits": {}}
    for split, (_, samples) in lists.items():
        plan["splits"][split] = {"count": len(samples), "shard_images": shard_images,
                                 "fingerprint": fingerprint(samples, src / split)}
    out.mkdir(parents=True, exist_ok=True)
    started = out / "prepare.json"
    if started.exists():
        try:
            before = json.loads(started.read_text())
        except (OSError, ValueError):
            before = None
        if before != plan:
            raise PrepareError(f"{out}: holds an unfinished preparation of other images or another size "
                               f"({started}); choose another --out, or remove it to start again")
    elif any(out.iterdir()):
        raise PrepareError(f"{out}: not empty and not a preparation gpctl started; choose an empty --out")
    _write_json(started, plan)

    todo, done_n = [], 0                     # (split, k, paths, final path)
    for split, (_, samples) in lists.items():
        labels = np.array([lab for _, lab in samples], dtype=np.int64)
        np.save(out / f"{split}_labels.npy", labels)
        for k in range(0, len(samples), shard_images):
            paths = [p for p, _ in samples[k:k + shard_images]]
            final = out / shard_name(split, k // shard_images)
            if _shard_ok(final, len(paths), size):
                done_n += len(paths)
            else:
                todo.append((split, paths, str(final)))
    need = sum(len(p) for _, p, _ in todo) * size * size * 3
    free = shutil.disk_usage(out).free
    if need > free:
        raise PrepareError(f"{out}: the shards need {need / 1e9:.1f} GB, {free / 1e9:.1f} GB free")
    total = sum(len(s) for _, s in lists.values())
    workers = workers or os.cpu_count() or 1
    if todo:
        # spawn, not fork: the caller may hold threads (torch's, a progress bar's); a worker imports the
        # caller's main module (gpctl's CLI: typer, not torch) and this one
        with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=get_context("spawn")) as pool:
            pending = {pool.submit(_write_shard, paths, size, final): split for split, paths, final in todo}
            while pending:
                finished, _ = wait(pending, return_when=FIRST_EXCEPTION)
                for f in finished:
                    split = pending.pop(f)
                    if f.exception() is not None:
                        pool.shutdown(wait=True, cancel_futures=True)   # the shards being written finish
                        raise f.exception()
                    done_n += f.result()
                    if progress:
                        progress(split, done_n, total)
    meta = {"format": FORMAT, "size": size, "resize": RESIZE_RULE, "source": str(src), "classes": classes,
            "splits": {}}
    for split, (_, samples) in lists.items():
        n_shards = -(-len(samples) // shard_images)
        meta["splits"][split] = {"count": len(samples), "shard_images": shard_images,
                                 "fingerprint": plan["splits"][split]["fingerprint"],
                                 "labels": f"{split}_labels.npy",
                                 "shards": [shard_name(split, k) for k in range(n_shards)]}
    _write_json(out / "meta.json", meta)
    started.unlink()
    return meta


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def is_prepared_images(folder: Path) -> bool:
    try:
        return json.loads((folder / "meta.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_meta(folder: Path) -> dict:
    """meta.json, checked: its size, and one shard named per shard_images of each split's count (the
    shards themselves are opened and checked by PreparedImages)."""
    where = folder / "meta.json"
    try:
        meta = json.loads(where.read_text())
        int(meta["size"])
        for split, e in meta["splits"].items():
            per, count = int(e["shard_images"]), int(e["count"])
            if len(e["shards"]) != -(-count // per):
                raise ValueError(f"split {split}: {len(e['shards'])} shards for {count} images of {per}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataMissing(f"{where}: not a prepared ImageNet ({FORMAT}): {e}") from None
    if meta.get("format") != FORMAT:
        raise DataMissing(f"{where}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


class PreparedImages:
    """One split of a prepared folder: `get(idx)` gathers uint8 NHWC images from the memory-mapped
    shards (into pinned memory when `pin`, so the stream's copy to the GPU does not block), with
    `labels`, `length` and `slice` like the other indexed sources. `keep` selects a fixed subset (the
    held-out set's class-spread subset of val)."""
    kind = "image"

    def __init__(self, folder: Path, split: str, meta: dict, threads: int = 4, pin: bool = False,
                 keep: np.ndarray | None = None):
        import torch

        from engine.data.stream import IMAGENET_MEAN, IMAGENET_STD

        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        e = meta["splits"][split]
        self.size, self.per = int(meta["size"]), int(e["shard_images"])
        self.shards = []
        for k, name in enumerate(e["shards"]):
            p = folder / name
            n = min(self.per, int(e["count"]) - k * self.per)
            try:
                a = np.load(p, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as err:
                raise DataMissing(f"{p}: a shard of the prepared ImageNet cannot be read: {err}") from None
            if a.dtype != np.uint8 or a.shape != (n, self.size, self.size, 3):
                raise DataMissing(f"{p}: expected uint8 {n}×{self.size}×{self.size}×3, found {a.dtype} {a.shape}")
            self.shards.append(a)
        try:
            labels = np.load(folder / e["labels"], allow_pickle=False)
        except (OSError, ValueError) as err:
            raise DataMissing(f"{folder / e['labels']}: labels cannot be read: {err}") from None
        if labels.shape != (int(e["count"]),):
            raise DataMissing(f"{folder / e['labels']}: {labels.shape[0]} labels for {e['count']} images")
        self.keep = None if keep is None else np.asarray(keep, dtype=np.int64)
        if self.keep is not None:
            labels = labels[self.keep]
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.length = len(self.labels)
        self.pin = pin
        self.threads = max(1, threads)
        self._pool = None

    def get(self, idx):
        import torch

        i = idx.cpu().numpy().astype(np.int64)
        labels = self.labels[torch.from_numpy(i)]
        if self.keep is not None:
            i = self.keep[i]
        shard, off = np.divmod(i, self.per)
        out = torch.empty((len(i), self.size, self.size, 3), dtype=torch.uint8, pin_memory=self.pin)
        o = out.numpy()

        def fill(lo: int, hi: int) -> None:
            for j in range(lo, hi):
                o[j] = self.shards[shard[j]][off[j]]

        if self.threads == 1 or len(i) < 2 * self.threads:
            fill(0, len(i))
        else:
            from concurrent.futures import ThreadPoolExecutor
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.threads)
            cuts = np.linspace(0, len(i), self.threads + 1).astype(int)
            list(self._pool.map(fill, cuts[:-1], cuts[1:]))
        return out, labels

    def slice(self, lo: int, hi: int):
        import torch
        return self.get(torch.arange(lo, hi))


def prepared_imagenet(folder: Path, dc, pin: bool) -> PreparedImages:
    """The train split as the source, val's class-spread subset of eval_samples as its eval_set (the
    same subset the JPEG path keeps)."""
    meta = read_meta(folder)
    if dc.resize != meta["size"]:
        raise DataMissing(f"{folder}: prepared at {meta['size']}×{meta['size']} but data.resize = {dc.resize} "
                          f"(set data.resize={meta['size']}, or prepare again with --size {dc.resize or dc.image_size})")
    for split in ("train", "val"):
        if split not in meta["splits"]:
            raise DataMissing(f"{folder / 'meta.json'}: no {split} split")
    src = PreparedImages(folder, "train", meta, dc.workers, pin)
    n_val = int(meta["splits"]["val"]["count"])
    keep = None
    if dc.eval_samples < n_val:     # the JPEG path's subset, computed the same way (float32 linspace)
        import torch
        keep = torch.linspace(0, n_val - 1, dc.eval_samples).long().numpy()
    src.eval_set = PreparedImages(folder, "val", meta, dc.workers, pin, keep)
    return src
