"""Sources, samplers and the Stream the training loop draws from.

A source is either
  - sequential: endless or too big to hold (synthetic streams, C4); `read(start, n)` in order; or
  - indexed:    `get(idx)` for a finite set (CIFAR-5m in memory, ImageNet files), with `labels`.
Online:  sequential sources are read in order; indexed ones in a fresh permutation each pass.
Offline: a fixed subset of `offline_size` samples (class-balanced when labels are known),
         reshuffled every epoch.
The position (samples drawn) is the whole stream state, so resume is exact.

No host sync in a step (airbench's rule for small models that are dispatch-bound): an epoch's
permutation is drawn once on the CPU (the same on every device) and kept where the data is; a step
slices it there. Crop offsets and flips come from a counter-based hash of (seed, sample position)
computed on the data's device (`hash31`): the same bits on the CPU and the GPU, no generator state,
nothing copied from the host.
"""
from __future__ import annotations

from typing import Iterator

import torch

from engine.config import DataConfig
from engine.errors import DataMissing  # noqa: F401  (re-exported)

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from several integers (SplitMix64 finalizer), so streams never collide."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (p & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class InMemory:
    """An indexed source over tensors already in memory (on the training device when asked)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor | None):
        self.x, self.y = x, y
        self.length = x.shape[0]
        self.labels = y

    @property
    def device(self) -> torch.device:
        return self.x.device

    def get(self, idx: torch.Tensor):
        idx = idx.to(self.x.device)
        return self.x[idx], (self.y[idx] if self.y is not None else None)

    def slice(self, lo: int, hi: int):
        return self.x[lo:hi], (self.y[lo:hi] if self.y is not None else None)


def balanced_subset(labels: torch.Tensor | None, length: int, k: int, seed: int) -> torch.Tensor:
    """k indices out of `length`, the same count per class where labels are known."""
    g = torch.Generator().manual_seed(seed)
    if k > length:
        raise ValueError(f"offline_size {k} exceeds the {length} samples available")
    if labels is None:
        return torch.randperm(length, generator=g)[:k].sort().values
    labels = labels.cpu()
    classes = labels.unique()
    per, extra = divmod(k, len(classes))
    picks = []
    for i, c in enumerate(classes):
        pool = (labels == c).nonzero().flatten()
        want = per + (1 if i < extra else 0)
        if want > len(pool):
            raise ValueError(f"class {int(c)} has only {len(pool)} samples, {want} needed for a balanced subset")
        picks.append(pool[torch.randperm(len(pool), generator=g)[:want]])
    return torch.cat(picks).sort().values


class Stream:
    def __init__(self, source, dc: DataConfig, seed: int, device: torch.device):
        self.source, self.dc, self.seed, self.device = source, dc, seed, device
        self.kind = source.kind                    # "image" | "tokens"
        self.position = 0                          # samples drawn so far
        self.bayes_loss = getattr(source, "bayes_loss", None)
        self._perm_epoch, self._perm = -1, None
        self._pool = None                          # indexed source the sampler draws from
        if dc.mode == "offline":
            if hasattr(source, "get"):
                self._subset = balanced_subset(source.labels, source.length, dc.offline_size, mix_seed(seed, 7))
                self._pool_len = dc.offline_size
            else:  # sequential: the subset is its first offline_size samples, held in memory
                x, y = source.read(0, dc.offline_size)
                self._pool, self._subset, self._pool_len = InMemory(x, y), None, dc.offline_size
        else:
            self._subset = None
            self._pool_len = getattr(source, "length", None)
        holder = self._pool if self._pool is not None else source
        self._index_device = getattr(holder, "device", torch.device("cpu"))   # where the indices are used
        if self._subset is not None:
            self._subset = self._subset.to(self._index_device)
        if self.kind == "image":
            self._norm = _normalizer(source, dc, device)

    # ------------------------------------------------------------ drawing
    @property
    def epoch(self) -> int:
        return self.position // self._pool_len if self._pool_len else 0

    @property
    def unique_seen(self) -> int:
        return min(self.position, self._pool_len) if self._pool_len else self.position

    def _epoch_perm(self, epoch: int) -> torch.Tensor:
        """The epoch's order: drawn on the CPU (device-independent), copied to the data's device once."""
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(mix_seed(self.seed, 11, epoch))
            self._perm = torch.randperm(self._pool_len, generator=g).to(self._index_device)
            self._perm_epoch = epoch
        return self._perm

    def _indices(self, start: int, n: int) -> torch.Tensor:
        """Pool indices of samples start .. start+n-1 (may cross an epoch boundary)."""
        out, pos = [], start
        while pos < start + n:
            epoch, off = divmod(pos, self._pool_len)
            take = min(start + n - pos, self._pool_len - off)
            out.append(self._epoch_perm(epoch)[off:off + take])
            pos += take
        idx = torch.cat(out) if len(out) > 1 else out[0]
        return self._subset[idx] if self._subset is not None else idx

    def next_batch(self, n: int, part: tuple[int, int] = (0, 1)):
        """The next n samples of the stream; with part = (rank, world), only this rank's n // world of
        them (samples rank*n/world ..), so a DDP rank reads and copies its own slice alone."""
        rank, world = part
        if n % world:
            raise ValueError(f"batch of {n} does not divide among {world} ranks")
        per = n // world
        start = self.position + rank * per
        if self._pool is not None:
            x, y = self._pool.get(self._indices(start, per))
        elif self._pool_len is None:
            x, y = self.source.read(start, per)
        else:
            x, y = self.source.get(self._indices(start, per))
        self.position += n
        return self._prepare(x, y, train=True, start=start)

    def eval_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        ev = self.source.eval_set
        for i in range(0, ev.length, batch_size):
            x, y = ev.slice(i, min(i + batch_size, ev.length))
            yield self._prepare(x, y, train=False, start=0)

    @property
    def eval_size(self) -> int:
        return self.source.eval_set.length

    # ------------------------------------------------------------ transforms
    def _prepare(self, x: torch.Tensor, y, train: bool, start: int):
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True) if y is not None else None
        if self.kind == "tokens":
            return x.long(), None
        if x.dtype == torch.uint8 and x.shape[-1] == 3:   # NHWC bytes (CIFAR-5m layout) -> NCHW
            x = x.permute(0, 3, 1, 2)
        if train and self.dc.augment:
            x = augment(x, self.dc.augment, self.dc.crop_padding, mix_seed(self.seed, 13), self.dc.image_size, start)
        if x.shape[-1] > self.dc.image_size:   # stored larger (ImageNet at 256): eval / no-crop take the centre
            x = center_crop(x, self.dc.image_size)
        return self._norm(x), y

    # ------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        d = {"position": self.position}
        if hasattr(self.source, "state_dict"):
            d["source"] = self.source.state_dict()
        return d

    def load_state_dict(self, d: dict) -> None:
        self.position = int(d["position"])
        if "source" in d:
            self.source.load_state_dict(d["source"])


def _normalizer(source, dc: DataConfig, device: torch.device):
    mean = torch.tensor(getattr(source, "mean", CIFAR_MEAN), device=device).view(1, 3, 1, 1)
    std = torch.tensor(getattr(source, "std", CIFAR_STD), device=device).view(1, 3, 1, 1)

    def norm(x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float().div_(255)
            return (x - mean) / std if dc.normalize else x
        return x  # synthetic images are generated already standardized

    return norm


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """The centre size x size of an NCHW batch (torchvision's CenterCrop offsets)."""
    h, w = x.shape[-2:]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return x[..., top:top + size, left:left + size]


M31 = 2**31 - 1   # hash31 works modulo this prime: every product stays below 2**62 in int64


def hash31(seed: int, positions: torch.Tensor, stream: int) -> torch.Tensor:
    """Pseudo-random integers in [0, 2**31 - 1) for each position, from (seed, position, stream) alone:
    three rounds of a multiply-add modulo 2**31 - 1 with a xor-shift. Integer ops only, so the CPU and
    the GPU give the same bits; nothing is drawn on or copied from the host."""
    h = (positions % M31 + (mix_seed(seed, stream) % M31)) % M31
    for a, b in ((1103515245, 12345), (48271, 2147483629), (69621, 1013904223)):
        h = (h * a + b) % M31
        h = h ^ (h >> 13)
    return h


def augment(x: torch.Tensor, which: list[str], pad: int, seed: int, size: int = 0, start: int = 0) -> torch.Tensor:
    """RandomCrop(size, padding=pad) and RandomHorizontalFlip on a whole NCHW batch, on its device.

    size: the crop (0 or >= the image: the image's own size). CIFAR: 32 of 32 padded by 4;
    ImageNet (App. A.2): 224 of 256, no padding, so every crop is real image.
    Sample i's offsets and flip come from hash31(seed, start + i): the stream position, so a resumed
    run, a DDP rank's slice and a GPU run crop exactly as the CPU does, with no host copy.
    """
    n, c, h, w = x.shape
    out_h, out_w = (min(size, h), min(size, w)) if size else (h, w)
    pos = torch.arange(start, start + n, device=x.device)
    if "crop" in which and (pad > 0 or (out_h, out_w) != (h, w)):
        dy = hash31(seed, pos, 1) % (h + 2 * pad - out_h + 1)
        dx = hash31(seed, pos, 2) % (w + 2 * pad - out_w + 1)
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad)) if pad else x
        rows = (dy[:, None] + torch.arange(out_h, device=x.device))[:, :, None]      # n,h,1
        cols = (dx[:, None] + torch.arange(out_w, device=x.device))[:, None, :]      # n,1,w
        bidx = torch.arange(n, device=x.device)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[bidx, rows, cols].permute(0, 3, 1, 2)   # n,c,h,w
    if "flip" in which:
        flip = (hash31(seed, pos, 3) >> 11) & 1 == 1
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x.contiguous()
