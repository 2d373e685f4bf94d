"""Real image data: CIFAR-5m (.npz parts), CIFAR-10 (torchvision folder), ImageNet (image folder, or\nshards prepared once: engine/data/prepared_images.py).

CIFAR sets are held whole as uint8 NHWC (no DataLoader; crop/flip on the device, airbench style):
on the training device, or in host memory (HostImages: .npy parts memory-mapped, each batch
gathered into pinned memory), as `data.hold` says. The held-out set of CIFAR-5m is the last
`eval_samples` images of its last part, never trained on.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from engine.config import DataConfig
from engine.data.stream import IMAGENET_MEAN, IMAGENET_STD, DataMissing, InMemory



def _folder(dc: DataConfig, default: str) -> Path:
    return Path(os.path.expanduser(dc.path or default))


AUTO_DEVICE_BYTES = 2 << 30   # data.hold = "auto": sets up to this size go on the device


def _on_device(dc: DataConfig, device: torch.device, nbytes: int) -> bool:
    """Whether an in-memory set of `nbytes` is held on the training device (data.hold; on a CPU run
    "device" holds torch tensors, "host" and "auto" the numpy parts, so both paths run in tests)."""
    if dc.hold == "auto":
        return device.type != "cpu" and nbytes <= AUTO_DEVICE_BYTES
    return dc.hold == "device"


class HostImages:
    """uint8 NHWC images [lo, hi) of the concatenated `parts` (numpy arrays: memory maps of .npy parts,
    whose pages every job on the box shares, or arrays loaded from .npz), held in host memory.
    `get(idx)` gathers a batch into one tensor, pinned when `pin` (a CUDA run), so the stream's
    `.to(device, non_blocking=True)` overlaps with the step; the bytes equal the device-held set's."""
    kind = "image"

    def __init__(self, parts: list[np.ndarray], labels: torch.Tensor, lo: int, hi: int, pin: bool):
        self.parts, self.lo, self.pin = parts, lo, pin
        self.starts = np.cumsum([0] + [len(p) for p in parts])
        self.labels = labels[lo:hi]
        self.length = hi - lo
        self.shape = parts[0].shape[1:]

    def get(self, idx: torch.Tensor):
        g = idx.cpu().numpy().astype(np.int64) + self.lo
        out = torch.empty((len(g), *self.shape), dtype=torch.uint8, pin_memory=self.pin)
        o = out.numpy()
        which = np.searchsorted(self.starts, g, side="right") - 1
        for k in np.unique(which):
            sel = which == k
            o[sel] = self.parts[k][g[sel] - self.starts[k]]
        return out, self.labels[idx.cpu()]

    def slice(self, lo: int, hi: int):
        return self.get(torch.arange(lo, hi))


class _Indexed(InMemory):
    kind = "image"

    def __init__(self, x, y, eval_set: InMemory):
        super().__init__(x, y)
        self.eval_set = eval_set


def _cifar5m_parts(root: Path) -> list[Path]:
    """The parts in part order: partK.X.npy where it and partK.Y.npy exist (memory-mapped), else partK.npz."""
    def number(p: Path) -> int:
        digits = p.name[4:].split(".")[0]
        return int(digits) if digits.isdigit() else 0
    out = {}
    for p in root.glob("part*.npz"):
        out[number(p)] = p
    for p in root.glob("part*.X.npy"):
        if p.with_name(p.name.replace(".X.npy", ".Y.npy")).exists():
            out[number(p)] = p
    return [out[k] for k in sorted(out)]


def cifar5m(dc: DataConfig, device: torch.device) -> _Indexed:
    root = _folder(dc, "~/data/cifar5m")
    parts = _cifar5m_parts(root)
    if not parts:
        raise DataMissing(f"CIFAR-5m not found: no part0.npz … part5.npz in {root} (point data.path at the folder; "
                          f"`gpctl data get cifar5m --out {root}` downloads it, ~18 GB)")
    arrays = []
    for p in parts:
        try:
            if p.suffix == ".npz":
                with np.load(p, allow_pickle=False) as z:
                    x, y = z["X"], z["Y"]
            else:                    # partK.X.npy + partK.Y.npy (gpctl data get --npy): memory-mapped
                x = np.load(p, mmap_mode="r", allow_pickle=False)
                y = np.load(p.with_name(p.name.replace(".X.npy", ".Y.npy")), allow_pickle=False)
        except (KeyError, ValueError, OSError) as e:
            raise DataMissing(f"{p}: not a CIFAR-5m part (arrays X uint8 N×32×32×3 and Y): {e}") from None
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3) or len(y) != len(x):
            raise DataMissing(f"{p}: X must be uint8 N×32×32×3 with one Y per image, got {x.dtype} {x.shape}")
        arrays.append((x, y.astype(np.int64)))
    total = sum(len(x) for x, _ in arrays)
    n_eval = dc.eval_samples
    if n_eval >= total:
        raise DataMissing(f"CIFAR-5m in {root}: {total} images, fewer than data.eval_samples = {n_eval} + 1")
    if not _on_device(dc, device, total * 32 * 32 * 3):
        labels = torch.from_numpy(np.concatenate([y for _, y in arrays]))
        parts, pin = [x for x, _ in arrays], device.type == "cuda"
        cut = total - n_eval
        src = HostImages(parts, labels, 0, cut, pin)
        src.eval_set = HostImages(parts, labels, cut, total, pin)
        return src
    hold = device
    X = torch.empty((total, 32, 32, 3), dtype=torch.uint8, device=hold)
    Y = torch.empty(total, dtype=torch.int64, device=hold)
    at = 0
    for x, y in arrays:  # copy part by part, 64k images at a time: never two copies of the whole set
        for i in range(0, len(x), 1 << 16):   # (a memory-mapped part is read here, never whole in RAM)
            chunk = np.array(x[i:i + (1 << 16)])
            X[at + i:at + i + len(chunk)] = torch.from_numpy(chunk).to(hold)
        Y[at:at + len(x)] = torch.from_numpy(y).to(hold)
        at += len(x)
    cut = total - n_eval
    return _Indexed(X[:cut], Y[:cut], InMemory(X[cut:], Y[cut:]))


def cifar10(dc: DataConfig, device: torch.device) -> _Indexed:
    from torchvision.datasets import CIFAR10

    root = _folder(dc, "~/data")
    try:
        train = CIFAR10(str(root), train=True, download=False)
        test = CIFAR10(str(root), train=False, download=False)
    except RuntimeError:
        raise DataMissing(f"CIFAR-10 not found: no cifar-10-batches-py in {root} (point data.path at its parent)") from None
    hold = device if _on_device(dc, device, train.data.nbytes + test.data.nbytes) else torch.device("cpu")

    def tensors(ds):
        return torch.from_numpy(ds.data).to(hold), torch.tensor(ds.targets, device=hold)

    x, y = tensors(train)
    ex, ey = tensors(test)
    n = min(dc.eval_samples, len(ey))
    return _Indexed(x, y, InMemory(ex[:n], ey[:n]))


class ImageFolderSource:
    """ImageNet-style folder (class subfolders of JPEGs), decoded by a thread pool into uint8 NCHW.

    Each image is resized to `resize` x `resize` once it is decoded (App. A.2: "resized to 256×256");
    RandomCrop(image_size) + RandomHorizontalFlip then happen in the Stream, on the device, and eval
    images are centre-cropped there. With resize = 0 the shorter side goes to `image_size` and the
    image is centre-cropped at decode time.
    """
    kind = "image"
    mean, std = IMAGENET_MEAN, IMAGENET_STD

    def __init__(self, folder: Path, size: int, workers: int, resize: int = 0):
        from torchvision.datasets import ImageFolder

        self.ds = ImageFolder(str(folder))
        self.size, self.resize, self.length = size, resize, len(self.ds)
        self.labels = torch.tensor(self.ds.targets)
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers))

    def _load(self, i: int) -> torch.Tensor:
        from torchvision.transforms.functional import center_crop, pil_to_tensor, resize

        from engine.data.prepared_images import load_resized

        if self.resize:   # the resize `gpctl data prepare imagenet` stores: the same pixels either way
            return pil_to_tensor(load_resized(self.ds.samples[i][0], self.resize))
        img = self.ds.loader(self.ds.samples[i][0]).convert("RGB")
        return pil_to_tensor(center_crop(resize(img, self.size), [self.size, self.size]))

    def slice(self, lo: int, hi: int):
        return self.get(torch.arange(lo, hi))

    def get(self, idx: torch.Tensor):
        idx = idx.tolist()
        x = torch.stack(list(self.pool.map(self._load, idx)))
        return x, self.labels[idx]


def imagenet(dc: DataConfig, device: torch.device):
    """Prepared shards (`gpctl data prepare imagenet`, meta.json) when data.path holds them, else the
    train/ and val/ JPEG folders, decoded as they are drawn."""
    from engine.data.prepared_images import is_prepared_images, prepared_imagenet

    root = _folder(dc, "~/data/imagenet")
    if is_prepared_images(root):
        return prepared_imagenet(root, dc, pin=device.type == "cuda")
    if not (root / "train").is_dir() or not (root / "val").is_dir():
        raise DataMissing(f"ImageNet not found: no train/ and val/ class folders and no prepared shards "
                          f"(meta.json) in {root} (point data.path at it)")
    src = ImageFolderSource(root / "train", dc.image_size, dc.workers, dc.resize)
    ev = ImageFolderSource(root / "val", dc.image_size, dc.workers, dc.resize)
    if dc.eval_samples < ev.length:  # a fixed, class-spread subset of val
        keep = torch.linspace(0, ev.length - 1, dc.eval_samples).long()
        ev.ds.samples = [ev.ds.samples[i] for i in keep]
        ev.labels, ev.length = ev.labels[keep], dc.eval_samples
    src.eval_set = ev
    return src
