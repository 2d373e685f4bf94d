"""Built-in synthetic streams that need no download, each with a known Bayes loss (the curves' floor).

TeacherImages: CIFAR-shaped images (smooth Gaussian fields), labels sampled from a fixed random
    teacher CNN that is wider than the CPU students (`teacher_width`) and whose logits are scaled by
    `teacher_sharpness`. A teacher no richer or sharper than the student is fitted in tens of steps;
    this one keeps the loss falling for thousands. Bayes loss = mean teacher entropy on the eval set.
MarkovTokens: an order-2 source over `vocab_size` symbols, p(x_t | x_{t-1}, x_{t-2}) ∝
    exp(sharpness · (A[x_{t-1}] + B[x_{t-2}])). Bayes loss = mean exact conditional entropy over the
    eval set's predicted positions (what an LM's loss averages). Sharpness 0 is the uniform source,
    drawn without the per-position loop, on the training device (what the GPT-2 throughput benchmark
    feeds: a step copies nothing from the host).
Samples are generated in chunks seeded by (data_seed, split, chunk), so any position is reproducible.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from engine.config import DataConfig
from engine.data.stream import InMemory, mix_seed

TRAIN, EVAL = 0, 1


class _Chunked:
    chunk = 1024

    def _chunk(self, split: int, c: int):
        key = (split, c)
        if key not in self._cache:
            if len(self._cache) > 4:
                self._cache.pop(next(iter(self._cache)))
            g = torch.Generator().manual_seed(mix_seed(self.data_seed, split, c))
            self._cache[key] = self._make(g, self.chunk)
        return self._cache[key]

    def _read(self, split: int, start: int, n: int):
        xs, ys, pos = [], [], start
        while pos < start + n:
            c, off = divmod(pos, self.chunk)
            take = min(start + n - pos, self.chunk - off)
            x, y = self._chunk(split, c)
            xs.append(x[off:off + take])
            ys.append(y[off:off + take] if y is not None else None)
            pos += take
        return torch.cat(xs), (torch.cat(ys) if ys[0] is not None else None)

    def read(self, start: int, n: int):
        return self._read(TRAIN, start, n)


class TeacherImages(_Chunked):
    kind = "image"

    def __init__(self, dc: DataConfig, num_classes: int, data_seed: int):
        self.data_seed, self.size, self.classes = data_seed, dc.image_size, num_classes
        self.sharpness, self._cache = dc.teacher_sharpness, {}
        g = torch.Generator().manual_seed(mix_seed(data_seed, 99))
        w = dc.teacher_width

        def conv(cin, cout):
            return torch.randn(cout, cin, 3, 3, generator=g) * math.sqrt(2.0 / (cin * 9))

        self.weights = [conv(3, w)] + [conv(w, w) for _ in range(dc.teacher_depth - 1)]
        self.head = torch.randn(num_classes, w, generator=g) / math.sqrt(w)
        self.logit_shift, self.logit_scale = torch.zeros(num_classes), torch.ones(num_classes)
        calib = self._logits(self._images(torch.Generator().manual_seed(mix_seed(data_seed, 98)), 2048))
        # standardize each class's logit (balanced classes, unit spread), then sharpen
        self.logit_shift, self.logit_scale = -calib.mean(0), 1.0 / calib.std(0)
        x, y = self._read(EVAL, 0, dc.eval_samples)
        self.eval_set = InMemory(x, y)
        with torch.no_grad():
            p = F.softmax(self.sharpness * self._logits(x), dim=1)
        self.bayes_loss = float(-(p * p.clamp_min(1e-30).log()).sum(1).mean())

    def _images(self, g: torch.Generator, n: int) -> torch.Tensor:
        s = self.size
        coarse = torch.randn(n, 3, max(1, s // 4), max(1, s // 4), generator=g)
        x = F.interpolate(coarse, size=(s, s), mode="bilinear", align_corners=False)
        x = x + 0.5 * torch.randn(n, 3, s, s, generator=g)
        return x / x.std(dim=(1, 2, 3), keepdim=True)

    @torch.no_grad()
    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for i, w in enumerate(self.weights):  # 3x3 convs, stride 2 on every second layer
            h = F.relu(F.conv2d(h, w, stride=2 if i % 2 else 1, padding=1))
        return (h.mean((2, 3)) @ self.head.T + self.logit_shift) * self.logit_scale

    def _make(self, g: torch.Generator, n: int):
        x = self._images(g, n)
        p = F.softmax(self.sharpness * self._logits(x), dim=1)
        y = torch.multinomial(p, 1, generator=g).squeeze(1)
        return x, y


class MarkovTokens(_Chunked):
    kind = "tokens"
    chunk = 256

    def __init__(self, dc: DataConfig, data_seed: int, device: torch.device | None = None):
        self.data_seed, self.seq_len, self.vocab = data_seed, dc.seq_len, dc.vocab_size
        self.device = device or torch.device("cpu")
        self.sharpness, self._cache = dc.teacher_sharpness, {}
        g = torch.Generator().manual_seed(mix_seed(data_seed, 97))
        v = self.vocab
        if self.sharpness == 0:   # uniform: no V x V tables (50257² floats would be 10 GB), entropy log V
            self.a = self.b = None
        else:
            self.a = torch.randn(v, v, generator=g) / math.sqrt(2)
            self.b = torch.randn(v, v, generator=g) / math.sqrt(2)
        x, _ = self._read(EVAL, 0, dc.eval_samples)
        self.eval_set = InMemory(x, None)
        self.bayes_loss = math.log(v) if self.sharpness == 0 else self._entropy(x)

    def _cond_logits(self, prev1: torch.Tensor, prev2: torch.Tensor) -> torch.Tensor:
        return self.sharpness * (self.a[prev1] + self.b[prev2])

    def _make(self, g: torch.Generator, n: int):
        if self.sharpness == 0:   # uniform tokens (entropy log V): drawn at once, on the device, for throughput runs
            if self.device.type != "cpu":
                g = torch.Generator(self.device).manual_seed(g.initial_seed())
            return torch.randint(0, self.vocab, (n, self.seq_len), generator=g, dtype=torch.int32,
                                 device=self.device), None
        x = torch.empty(n, self.seq_len, dtype=torch.int32)
        x[:, 0] = torch.randint(0, self.vocab, (n,), generator=g)
        for t in range(1, self.seq_len):
            p = F.softmax(self._cond_logits(x[:, t - 1].long(), x[:, max(t - 2, 0)].long()), dim=1)
            x[:, t] = torch.multinomial(p, 1, generator=g).squeeze(1)
        return x, None

    @torch.no_grad()
    def _entropy(self, x: torch.Tensor) -> float:
        total, count = 0.0, 0
        for t in range(1, self.seq_len):
            logp = F.log_softmax(self._cond_logits(x[:, t - 1].long(), x[:, max(t - 2, 0)].long()), dim=1)
            total += float(-(logp.exp() * logp).sum(1).sum())
            count += x.shape[0]
        return total / count
