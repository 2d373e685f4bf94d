"""DDP under torchrun: process group, per-rank data shards, agreement on control decisions.

Every rank draws the same global batch from its own (identical) stream and trains on its slice
`[rank·B/W, (rank+1)·B/W)`; DDP averages the gradients, so a step equals the single-process step
on the whole batch (up to reduction order; BatchNorm sees per-rank statistics, as in any DDP run).
Rank 0 alone writes the run directory. Control requests and stop signals are agreed on at flush
boundaries (every `log_every` steps): rank 0 reads control.jsonl and broadcasts the lines as JSON
bytes, never pickle; a stop on any rank stops all.
"""
from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist


class Dist:
    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.active = "RANK" in os.environ and "WORLD_SIZE" in os.environ   # launched by torchrun
        self.device = torch.device("cpu")

    def init(self, want_cuda: bool) -> torch.device | None:
        """Join the process group; returns this rank's device (None when not distributed)."""
        if not self.active:
            return None
        cuda = want_cuda and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
        return self.device

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            t = t.clone()
            dist.all_reduce(t)
            t /= self.world
        return t

    def average_grads(self, params) -> None:
        """Average .grad over the ranks in place: what DDP's backward does, for a step whose last
        micro-batch ran under no_sync (a noise-scale step reads each rank's own gradient first)."""
        grads = [p.grad for p in params if p.grad is not None]
        if not self.active or not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        k = 0
        for g in grads:
            g.copy_(flat[k:k + g.numel()].view_as(g))
            k += g.numel()

    def any(self, flag: bool) -> bool:
        if not self.active:
            return flag
        t = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def broadcast_json(self, obj) -> object:
        """Rank 0's `obj` on every rank, as JSON bytes."""
        if not self.active:
            return obj
        data = json.dumps(obj).encode() if self.leader else b""
        n = torch.tensor([len(data)], device=self.device, dtype=torch.int64)
        dist.broadcast(n, 0)
        buf = torch.zeros(int(n.item()), dtype=torch.uint8, device=self.device)
        if self.leader:
            buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        dist.broadcast(buf, 0)
        return json.loads(bytes(buf.cpu().tolist()).decode())

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()
