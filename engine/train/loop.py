"""The training loop: one place a reader can hold in their head.

    setup      config -> device, model, optimizer, stream, schedule; resume from the last checkpoint
    loop:
      before_step   planned changes due at this boundary, then control-file requests, then hooks
      step          lr and batch from the schedule; micro-batches; clip; optimizer.step()
      record        one buffered record per step; every `log_every` steps the window's losses are copied
                    to pinned memory without waiting, and written at the next flush (no sync on CUDA)
      eval          every `eval_every` steps, at each checkpoint, and more often near a loss level
      checkpoint    every `checkpoint_every` steps, at listed steps / lr_times, where the held-out loss
                    first reaches a listed level (engine/levels.py), on stop, at the end
    end        final eval and checkpoint; status done / stopped / diverged / failed

Every record carries all clocks: step, samples (tokens for LMs), lr_time, wall.
"""
from __future__ import annotations

import math
import os
import platform
import signal
import sys
import time
import traceback
from contextlib import nullcontext
from typing import Callable

import torch
import torch.nn.functional as F

from engine.train import checkpoint as ckpt
from engine.errors import CheckpointError
from engine.clock import Clock
from engine.config import Config
from engine.control import (LOSS_EMA, MAX_WAITING, ControlReader, Line, Request, expired, kept, request_id,
                            run_dir_untrusted)
from engine.train.distributed import Dist
from engine.data import DataMissing, build_stream
from engine.levels import LossLevels
from engine.models import build_model, hf_config_dict
from engine.store.rundir import RunDir, disk_full, free_bytes
from engine.schedule import Schedule, ended, reached


_now = time.monotonic   # the control file's polling clock (a test steps it by hand)


class RunDirReplaced(RuntimeError):
    """The run's folder is no longer the one the job started in (renamed away, swapped by someone who
    could write the folder above it): the job stops writing at once, and writes nothing into it."""


class Diverged(RuntimeError):
    pass


class _Follower(RunDir):
    """A DDP rank other than 0: reads the run directory, never writes it."""

    def append_metrics(self, records): pass
    def append_event(self, kind, **fields): return {}
    def write_status(self, durable=True, **fields): return {}
    def mark_running(self, device): return {}
    def log(self, line): print(f"[rank {os.environ.get('RANK', '?')}] {line}", file=sys.stderr, flush=True)
    def truncate_metrics(self, size): return 0
    def write_tv_cache(self, cache): pass
    def sweep_temp_files(self, older_than=60.0): return []


def cuda_flags(precision: str, device_type: str) -> dict[str, bool]:
    """The CUDA backend policy: cuDNN picks the fastest kernels for the (few) shapes a run has, and
    fp32 matmuls/convs may use TF32 unless the config asked for exact fp32 (`precision = "fp32"`).
    Nothing on the CPU."""
    if device_type != "cuda":
        return {}
    return {"cudnn_benchmark": True, "tf32": precision != "fp32"}


def compile_policy(cfg: Config) -> dict:
    """How `compile = true` compiles, so that noise changes do not thrash the compiler:
    - static shapes (`dynamic=False`): one graph per batch (micro-batch) size, each as fast as a
      hand-specialised one; a preset's batch sizes are few (bs 32 -> 512 is two graphs);
    - the recompile limit covers every batch size the config plans, plus room for steering requests;
    - evaluation runs the eager module (its ragged last batch never reaches the compiler);
    - every shape still planned is compiled before step 1 (Trainer.prewarm), not at the noise drop;
    - `compile_mode = "reduce-overhead"` adds CUDA graphs: a small model's step is no longer bound by
      the CPU launching its kernels (ResNet-18 bs 512 on an H200: 43.8k img/s eager, 36.4k compiled,
      80.8k compiled with CUDA graphs).
    The count of graphs is recorded at the end (event `end`, field `graphs`)."""
    sizes = {cfg.batch_size} | {c.batch_size for c in cfg.changes if c.batch_size}
    micro = {min(cfg.micro_batch_size, b) if cfg.micro_batch_size else b for b in sizes}
    ragged = {b % cfg.micro_batch_size for b in sizes if cfg.micro_batch_size and b % cfg.micro_batch_size}
    noise = {cfg.noise_micro} if cfg.noise_micro and cfg.noise_scale else set()   # its flush steps' shape
    return {"dynamic": False, "recompile_limit": len(micro | ragged | noise) + 8}


CONVNETS = ("resnet18", "cnn", "convnext")


def noise_micro_applies(cfg: Config, batch: int, micro: int, world: int, graph_steps: bool) -> bool:
    """Whether a flush step of `batch` samples (per rank) is cut into micro-batches of `noise_micro`
    to measure the noise scale: opt-in, where it is not free (the run neither accumulates nor has
    several ranks) and the batch is a multiple of it; never with CUDA graphs, whose shapes are
    recorded once."""
    m = cfg.noise_micro
    return bool(cfg.noise_scale and m and world == 1 and micro >= batch and m < batch
                and batch % m == 0 and not graph_steps)


def compile_choice(cfg: Config, device_type: str) -> tuple[bool, str, str]:
    """(compile?, torch.compile mode, why) for `cfg.compile` on this device.

    true / false are obeyed (with cfg.compile_mode). "auto": eager on the CPU (inductor's CPU code is
    rarely faster for these models and a cold compile costs minutes on few cores); on CUDA a convnet
    compiles with CUDA graphs ("reduce-overhead": ResNet-18 bs 512 on an H200 went from 43.8k img/s
    eager to 80.8k), except under gradient accumulation (or noise_micro), whose replays into shared
    buffers have not been measured safe on a GPU yet, where it compiles in the default mode; GPT-2
    compiles in the default mode (217k -> 405k tok/s). A compile_mode set in the config wins over auto's."""
    if cfg.compile is True:
        return True, cfg.compile_mode, "compile = true"
    if cfg.compile is False:
        return False, "", "compile = false"
    if device_type != "cuda":
        return False, "", "compile = auto: eager on the CPU"
    if cfg.compile_mode != "default":
        return True, cfg.compile_mode, f"compile = auto, compile_mode = {cfg.compile_mode}"
    if cfg.model.name in CONVNETS and not cfg.micro_batch_size and not (cfg.noise_micro and cfg.noise_scale):
        return True, "reduce-overhead", "compile = auto: a convnet on CUDA, with CUDA graphs"
    return True, "default", "compile = auto: on CUDA, default mode"


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process (dynamo's counter)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    return int(counters["stats"]["unique_graphs"])


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_optimizer(cfg: Config, model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    oc = cfg.optim
    fused = oc.fused == "on" or (oc.fused == "auto" and device.type == "cuda")
    params = [p for p in model.parameters() if p.requires_grad]
    if oc.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=oc.momentum, nesterov=oc.nesterov,
                               weight_decay=oc.weight_decay, fused=fused or None)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(oc.betas), eps=oc.eps,
                             weight_decay=oc.weight_decay, fused=fused or None)


def loss_fn(logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor | None, reduction: str = "mean"):
    """Cross-entropy: classes for images, next token for LMs (positions 1..L-1 predicted)."""
    if y is None:   # targets shifted left, the last position ignored: no sliced copy of the (B, L, V) logits
        target = torch.full_like(x, -100, dtype=torch.long)
        target[:, :-1] = x[:, 1:]
        return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=-100, reduction=reduction)
    return F.cross_entropy(logits.float(), y, reduction=reduction)


class Trainer:
    def __init__(self, rd: RunDir, cfg: Config | None = None,
                 on_progress: Callable[["Trainer"], None] | None = None):
        self.rd, self.cfg = rd, cfg or rd.config()
        self.on_progress = on_progress
        self.hooks: list[Callable[["Trainer"], None]] = []   # called before every step
        self.clock = Clock()
        self.wall_offset = 0.0
        self.last_eval: dict = {}
        self.last_record: dict = {}
        self.last_checkpoint = -1
        self.stop_requested = False
        self.signal_stop = False       # SIGTERM seen (under DDP, acted on when all ranks agree)
        self._pending: list[tuple[dict, torch.Tensor]] = []
        self._consumed_since_checkpoint = False   # control lines consumed after the last checkpoint
        self.loss_ema: float | None = None         # EMA (LOSS_EMA) of the train loss at the last flush: `when loss<…`
        self.noise_ema: dict = {}                  # EMAs (LOSS_EMA) of noise_tr_sigma, noise_g2, grad_norm: `when noise_scale<…`
        self.levels = LossLevels(self.cfg.checkpoint_at_losses, self.cfg.checkpoint_loss_tol, self.cfg.eval_every)
        self._reached: list[dict] = []              # loss levels the last eval reached (its checkpoint's)
        self._noise: dict | None = None             # the last step's gradient noise scale fields (noise.py)

    # the clocks, read by name (one Clock value holds them; only Clock.tick advances them)
    step = property(lambda self: self.clock.step)
    samples = property(lambda self: self.clock.samples)
    lr_time = property(lambda self: self.clock.lr_time)

    # ------------------------------------------------------------------ setup
    def setup(self, resume: bool) -> None:
        cfg = self.cfg
        untrusted = run_dir_untrusted(self.rd.path)
        if untrusted:   # others could steer it or replace its files: refuse to start or resume
            raise RuntimeError(f"refusing to train: {untrusted}")
        st = os.stat(self.rd.path)
        self._dir_key = (st.st_dev, st.st_ino)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.dist = Dist()
        self.device = self.dist.init(want_cuda=cfg.device != "cpu") or pick_device(cfg.device)
        if not self.dist.leader:
            self.rd = _Follower(self.rd.path)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device = {cfg.device!r} but no CUDA device is visible")
        use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda")
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext())
        self.precision = "bf16" if use_bf16 else "fp32"
        flags = cuda_flags(cfg.precision, self.device.type)
        if flags:
            torch.backends.cudnn.benchmark = flags["cudnn_benchmark"]
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = flags["tf32"]
        torch.manual_seed(cfg.seed)
        self.stream = build_stream(cfg, self.device)
        self.model = build_model(cfg.model).to(self.device)
        self.channels_last = cfg.channels_last and self.device.type == "cuda" and not cfg.is_lm
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(cfg, self.model, self.device)
        self.schedule = Schedule(cfg)
        self.tokens_per_sample = cfg.data.seq_len if cfg.is_lm else 1
        self.fwd = self.model
        if self.dist.active:
            from torch.nn.parallel import DistributedDataParallel as DDP
            bad = [b for b in [cfg.batch_size] + [c.batch_size for c in cfg.changes if c.batch_size]
                   if b % self.dist.world]
            if bad:   # a remainder would be silently dropped by every rank
                raise ValueError(f"batch_size {bad[0]} does not divide among {self.dist.world} ranks "
                                 f"(gpus = {cfg.gpus}): every batch size of the run must be a multiple of it")
            self.fwd = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.eval_fwd = self.model   # eager: the ragged last eval batch never reaches the compiler
        self.eager_fwd = self.fwd    # what a failed compile falls back to
        self.fwd_loss = self._fwd_loss   # (x, y) -> the micro-batch's loss; compiled whole when it can be
        self.compiled, self.compile_mode, self.compile_why = compile_choice(cfg, self.device.type)
        if self.compiled:
            policy = compile_policy(cfg)
            import torch._dynamo.config as dynamo_config
            limit = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
            setattr(dynamo_config, limit, max(getattr(dynamo_config, limit), policy["recompile_limit"]))
            cache = self.rd.home / "cache" / "torchinductor"   # one compiler cache for the home's runs:
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache))      # a preset's second run of a
            os.environ.setdefault("TRITON_CACHE_DIR", str(cache / "triton"))  # shape starts warm
            mode = None if self.compile_mode == "default" else self.compile_mode
            self.fwd = torch.compile(self.fwd, dynamic=policy["dynamic"], mode=mode, backend=cfg.compile_backend)
            if not self.dist.active:   # the loss inside the compiled graph: GPT-2's cross-entropy fused with
                eager = self.eager_fwd      # the head, no fp32 copy of the (B·L, V) logits in memory
                self.fwd_loss = torch.compile(lambda x, y: loss_fn(eager(x), x, y), dynamic=policy["dynamic"],
                                              mode=mode, backend=cfg.compile_backend)
        # CUDA graphs (reduce-overhead, max-autotune) replay into the same output buffers: each forward
        # starts a new graph step, so a micro-batch's forward never overwrites what the last one's
        # backward still needs (tied embeddings under gradient accumulation did, on an H200)
        self._graph_steps = self.compiled and self.compile_mode in ("reduce-overhead", "max-autotune") \
            and self.device.type == "cuda"
        self._graphs_before = compiled_graphs() if self.compiled else 0
        self._poll_s, self._last_poll = cfg.control.poll_ms / 1000, -math.inf
        self._window = None   # the last flush's records, their losses still on their way to the host
        self.control = ControlReader(self.rd)
        swept = self.rd.sweep_temp_files()   # what a killed writer left behind
        if swept:
            self.rd.log(f"removed {len(swept)} temp file(s) of unfinished writes: {', '.join(swept[:5])}")
        restart = None   # a run lost before its first checkpoint starts again, exactly as a fresh start
        if resume and not self.rd.list_checkpoints() and self.rd.metrics_size() > 0:
            from engine.store.rundir import restart_blocker
            why = restart_blocker(self.rd)
            if why:
                raise RuntimeError(f"cannot resume: no checkpoint in {self.rd.checkpoints}: {why} (the records are kept)")
            restart = (f"no checkpoint yet: started again from "
                       f"{'its parent checkpoint' if cfg.parent_checkpoint else 'step 0'}; the lost attempt's "
                       f"{self.rd.metrics_size()} bytes of records were dropped")
        self.rd.checkpoints.mkdir(mode=0o700, exist_ok=True)
        if resume and self.rd.list_checkpoints():
            self._resume()
        elif cfg.parent_checkpoint:
            self._start_from_parent()
            if restart:
                self.rd.append_event("resume", step=self.step, lr_time=self.lr_time, checkpoint=None, restarted=restart)
        else:
            self.rd.truncate_metrics(0)
            if resume:
                self.rd.append_event("resume", step=0, lr_time=0.0, checkpoint=None,
                                     **({"restarted": restart} if restart else {}))
        self.attempt = self.rd.mark_running(str(self.device)).get("started")   # requests may name it
        code = self._code_check()
        gpu = {}
        if self.device.type == "cuda":
            from engine.train.mps import mps_pipe
            gpu = {"cuda": torch.version.cuda, "gpu_name": torch.cuda.get_device_name(self.device),
                   "mps": mps_pipe() is not None}     # an MPS control daemon in this process's environment
        self.rd.append_event("start", step=self.step, lr_time=self.lr_time, device=str(self.device),
                             precision=self.precision, torch=torch.__version__, python=platform.python_version(),
                             host=platform.node(), params=sum(p.numel() for p in self.model.parameters()),
                             bayes_loss=self.stream.bayes_loss, world=self.dist.world,   # ranks (DDP), 1 alone
                             compile=self.compile_mode if self.compiled else "off", compile_why=self.compile_why,
                             code=code, **gpu)
        self.rd.log(f"start {self.rd.id} on {self.device} ({self.precision}), step {self.step}/{cfg.steps}")

    def _code_check(self) -> list:
        """The code this attempt runs, against what the run recorded when it was created: a change
        (a commit, an edit, an upgrade since enqueue) is a `code_changed` event and a log line.
        Returns the code's fingerprint (version, commit, diff sha256) for the start event."""
        from engine.store import provenance
        now = provenance.code_identity(fresh=True)
        now.pop("_diff", None)
        rec = provenance.read(self.rd.path)
        if rec is not None and not provenance.same_code(rec["code"], now) and self.dist.leader:
            was, is_ = provenance.code_text(rec["code"]), provenance.code_text(now)
            self.rd.append_event("code_changed", step=self.step, lr_time=self.lr_time, created=rec["code"], now=now)
            self.rd.log(f"warning: the code changed since this run was created: {was} -> {is_}")
        return list(provenance.fingerprint(now))

    def _restore(self, path) -> dict:
        """Weights, optimizer, RNG, clocks, schedule and stream position from a checkpoint."""
        state = ckpt.restore(path, self.model, self.optimizer)
        loop = state["loop"]
        self.clock, self.wall_offset = Clock.of(loop), loop["wall"]
        self.loss_ema = loop.get("loss_ema")
        self.noise_ema = dict(loop.get("noise_ema") or {})
        self.levels.load_state_dict(loop.get("loss_levels"))
        self.schedule.load_state_dict(state["schedule"])
        self.stream.load_state_dict(state["stream"])
        return state

    def _resume(self) -> None:
        """From the newest checkpoint that reads whole: a torn one (a machine crash mid-write, a bad
        block) is skipped, said in the event and the log, and the one before it is used (its files
        are kept; the step is written again when the run gets there)."""
        skipped = []
        for step, path in reversed(self.rd.list_checkpoints()):
            try:
                state = self._restore(path)
                break
            except CheckpointError as e:
                skipped.append(f"{path.name} ({str(e).rsplit(': ', 1)[-1][:120]})")
        else:
            raise CheckpointError(f"cannot resume: no checkpoint of {self.rd.id} reads whole: {'; '.join(skipped[:3])}")
        if skipped:
            self.rd.log(f"resume: skipped unreadable checkpoint(s) {', '.join(skipped)}; resuming from {path.name}")
        self.last_eval = state["loop"].get("last_eval", {})
        self.control.load_state_dict(state["control"])
        dropped = self.rd.truncate_metrics(state["loop"]["metrics_size"])
        self.rd.append_event("resume", step=self.step, lr_time=self.lr_time, samples=self.samples,
                             checkpoint=path.name, dropped_metric_bytes=dropped,
                             **({"skipped": skipped} if skipped else {}))

    def _start_from_parent(self) -> None:
        """A fork: the parent's state at its checkpoint, then the fork's overrides from the first step."""
        from pathlib import Path

        cfg = self.cfg
        self._restore(Path(cfg.parent_checkpoint))
        self.rd.truncate_metrics(0)
        for group in self.optimizer.param_groups:  # optimizer hyper-parameters come from the fork's config
            if cfg.optim.name == "sgd":
                group.update(momentum=cfg.optim.momentum, nesterov=cfg.optim.nesterov)
            else:
                group.update(betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
            group["weight_decay"] = cfg.optim.weight_decay
        keys = {item.split("=", 1)[0].strip() for item in cfg.parent_overrides}
        changed = self.schedule.set(self.step, self.lr_time, lr=cfg.lr if "lr" in keys else 0.0,
                                    batch_size=cfg.batch_size if "batch_size" in keys else 0,
                                    manual="lr" in keys)
        self.rd.append_event("fork", parent=cfg.parent, checkpoint=cfg.parent_checkpoint, step=self.step,
                             samples=self.samples, lr_time=self.lr_time, overrides=cfg.parent_overrides,
                             changed=changed)

    # ------------------------------------------------------------------ the loop
    def run(self) -> str:
        cfg, model = self.cfg, self.model
        model.train()
        if self.compiled:
            try:
                self.prewarm()
            except Exception as e:   # the compiler failed on this model or machine: train eager, say so
                self._compile_failed(e)
        self.t0 = time.perf_counter()
        if self.levels.active and self.levels.last is None and not self._finished():
            self.evaluate()   # the loss the run starts from: a level is reached from above
        while not self._finished():
            # -- before the step: planned changes, then hooks (control requests)
            self._apply_planned_changes()
            if self.signal_stop and not self.dist.active:
                self.stop_requested = True
            self._apply_control()
            for hook in self.hooks:
                hook(self)
            if self.stop_requested:
                break
            # -- the step
            lr, base = self.schedule.rates(self.step, self.lr_time)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            batch = self.schedule.batch_size
            loss = self._train_step(batch)
            lr_time_before = self.clock.tick(batch * self.tokens_per_sample, base / self.schedule.lr_ref)
            # -- record (no sync: the loss stays a tensor until the flush)
            self._pending.append(({**self.clock.as_dict(), "wall": self.wall(), "lr": lr, "batch_size": batch,
                                   **(self._noise or {})}, loss))
            if self.step % cfg.log_every == 0:
                self.flush(wait=self.device.type != "cuda")
            # -- eval and checkpoint
            want_ckpt = self._checkpoint_due(lr_time_before)
            if want_ckpt or (cfg.eval_every and self.step % cfg.eval_every == 0) or self.levels.eval_due(self.step):
                self.evaluate()
                want_ckpt = want_ckpt or bool(self._reached)
            if want_ckpt:
                self.save_checkpoint()
        # -- end (a stop takes no eval: the resumed run's records must equal an uninterrupted run's)
        self.flush()
        if self.last_eval.get("step") != self.step and self._finished():
            self.evaluate()
        if self.last_checkpoint != self.step or self._consumed_since_checkpoint:
            self.save_checkpoint()   # also when a line (a stop) was consumed after this step's checkpoint
        return "stopped" if self.stop_requested and not self._finished() else "done"

    def _finished(self) -> bool:
        return ended(self.cfg, self.step, self.lr_time)

    # ------------------------------------------------------------------ pre-warm
    def prewarm_sizes(self) -> list[int]:
        """The micro-batch shapes the rest of this run will train on, as it plans them: the batch size
        now and those of the planned changes not yet applied (each cut into micro-batches, with the
        ragged last one), per rank under DDP."""
        sizes = [self.schedule.batch_size] + [c.batch_size for c, done in
                                               zip(self.cfg.changes, self.schedule.noise.applied)
                                               if c.batch_size and not done]
        micro, out = self.cfg.micro_batch_size, set()
        for b in sizes:
            b //= self.dist.world
            m = min(micro, b) if micro else b
            out.add(m)
            if b % m:
                out.add(b % m)
            if noise_micro_applies(self.cfg, b, m, self.dist.world, getattr(self, "_graph_steps", False)):
                out.add(self.cfg.noise_micro)     # the flush steps' micro-batches (noise_micro)
        return sorted(out)

    def prewarm(self) -> None:
        """Compile every planned shape before the first step, so a noise drop mid-run does not wait
        for the compiler (nor, with CUDA graphs, for their recording: each shape runs three times).
        The inputs are held-out batches, tiled to size; the run is left as it was: batch-norm
        statistics and every other buffer restored, gradients cleared, RNG states put back, the
        stream and the optimizer untouched. A pre-warmed run's records equal a cold one's (tested)."""
        sizes = self.prewarm_sizes()
        first = next(iter(self.stream.eval_batches(max(sizes))), None)
        if first is None:
            self.rd.log("no held-out batch to pre-warm the compiled model with: it compiles as it goes")
            return
        x0, y0 = first
        t0 = time.perf_counter()
        saved = self._prewarm_save()
        reps = 3 if self._graph_steps else 1
        if self._graph_steps:
            self._stable_grads()
        for size in sizes:
            tile = -(-size // x0.shape[0])
            x = x0.repeat(tile, *[1] * (x0.dim() - 1))[:size]
            y = y0.repeat(tile, *[1] * (y0.dim() - 1))[:size] if y0 is not None else None
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            for _ in range(reps):
                if self._graph_steps:
                    torch.compiler.cudagraph_mark_step_begin()
                with self.autocast:
                    self.fwd_loss(x, y).backward()
                self.optimizer.zero_grad(set_to_none=not self._graph_steps)   # each rep from zero grads
        self._prewarm_restore(saved)
        took = time.perf_counter() - t0
        self.rd.append_event("prewarm", step=self.step, lr_time=self.lr_time, sizes=sizes, seconds=round(took, 3),
                             graphs=compiled_graphs() - self._graphs_before)
        self.rd.log(f"pre-warmed the compiled model for micro-batches {sizes} in {took:.1f} s")

    def _fwd_loss(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return loss_fn(self.fwd(x), x, y)

    def _stable_grads(self) -> None:
        """Preallocated, zeroed .grad tensors, which CUDA-graph replays accumulate into (never a graph's
        own output kept as .grad, which the next replay would overwrite)."""
        for p in self.model.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)

    def _compile_failed(self, e: Exception) -> None:
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:500]
        self.fwd, self.compiled, self._graph_steps = self.eager_fwd, False, False
        self.fwd_loss = self._fwd_loss
        self.optimizer.zero_grad(set_to_none=True)
        self.rd.append_event("compile_failed", step=self.step, lr_time=self.lr_time, mode=self.compile_mode,
                             reason=reason)
        self.rd.log(f"torch.compile failed ({reason}); this run trains eager")

    def _prewarm_save(self) -> dict:
        cuda = torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None
        return {"buffers": [b.detach().clone() for b in self.model.buffers()],
                "cpu_rng": torch.get_rng_state(), "cuda_rng": cuda}

    def _prewarm_restore(self, saved: dict) -> None:
        with torch.no_grad():
            for b, v in zip(self.model.buffers(), saved["buffers"]):
                b.copy_(v)
        # put back only what moved (a model without dropout draws nothing): the CUDA generators of a
        # run with CUDA graphs are then never touched
        if not torch.equal(torch.get_rng_state(), saved["cpu_rng"]):
            torch.set_rng_state(saved["cpu_rng"])
        if saved["cuda_rng"] is not None and not all(
                torch.equal(a, b) for a, b in zip(torch.cuda.get_rng_state_all(), saved["cuda_rng"])):
            torch.cuda.set_rng_state_all(saved["cuda_rng"])

    def _train_step(self, batch: int) -> torch.Tensor:
        if self.dist.active:  # this rank reads (and copies to its GPU) its own slice of the global batch
            x, y = self.stream.next_batch(batch, part=(self.dist.rank, self.dist.world))
            batch //= self.dist.world
        else:
            x, y = self.stream.next_batch(batch)
        micro = self.cfg.micro_batch_size or batch
        world = self.dist.world if self.dist.active else 1
        flush = (self.step + 1) % self.cfg.log_every == 0
        if flush and noise_micro_applies(self.cfg, batch, micro, world, self._graph_steps):
            micro = self.cfg.noise_micro     # opt-in: this flush step accumulates, to measure the noise
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self._graph_steps:
            self._stable_grads()
        total = None
        starts = range(0, batch, micro)
        noise = None    # B_simple on a flush step, from the micro-batches' own gradients (engine/train/noise.py)
        # free where there are several gradients to compare: micro-batches, or ranks (each rank's own
        # gradient, read before the all-reduce that this step then does itself, after its backward)
        if (self.cfg.noise_scale and micro < batch * world and batch % micro == 0
                and not self._graph_steps and flush):
            from engine.train.noise import MicroGrads
            noise = MicroGrads([p for p in self.model.parameters() if p.requires_grad])
        ddp_noise = noise is not None and self.dist.active
        for i in starts:   # gradient accumulation; a batch change never lands inside
            xs, ys = x[i:i + micro], (y[i:i + micro] if y is not None else None)
            sync = (i == starts[-1] and not ddp_noise) or not self.dist.active
            if self._graph_steps:
                torch.compiler.cudagraph_mark_step_begin()
            with self.autocast, (nullcontext() if sync else self.fwd.no_sync()):
                loss = self.fwd_loss(xs, ys)
                if self._graph_steps:     # a CUDA graph's output is overwritten by its next replay: the
                    loss = loss.clone()   # loss summed over micro-batches keeps its own copy
                if micro < batch:
                    loss = loss * (xs.shape[0] / batch)
                loss.backward()
            if noise is not None:
                noise.after_backward(xs.shape[0] / batch)
            total = loss.detach() if total is None else total + loss.detach()
        if ddp_noise:
            noise.local_mean(self.dist.mean)               # mean|g_i|² over every rank's micro-batches
            self.dist.average_grads(noise.params)          # the all-reduce the last backward did not do
        self._noise = noise.fields(micro, batch * world,
                                   self.optimizer.param_groups[0]["lr"]) if noise else None
        if self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        # with CUDA graphs the .grad tensors stay allocated and are zeroed in place: a replay's outputs
        # stolen into a fresh .grad are freed by the next replay (torch's cudagraph_trees asks for
        # "stable .grad buffers"); eager runs free them, as before
        self.optimizer.zero_grad(set_to_none=not self._graph_steps)
        return total

    def wall(self) -> float:
        return self.wall_offset + time.perf_counter() - self.t0

    # ------------------------------------------------------------------ changes
    def _apply_planned_changes(self) -> None:
        for i, ch, changed in self.schedule.due(self.step, self.lr_time):
            self.rd.append_event("schedule", source="preset", change=i, changed=changed,
                                 step=self.step, lr_time=self.lr_time, samples=self.samples)

    def _control_lines(self) -> list[Line]:
        """New control lines. The file is checked at most every `control.poll_ms` (a stat per step is a
        metadata round trip on NFS/Lustre); under DDP only at flush boundaries, read by rank 0 and
        broadcast."""
        if not self.dist.active:
            now = _now()
            if now - self._last_poll < self._poll_s:
                return []
            self._last_poll = now
            self.check_run_dir()
            return self.control.poll()
        if self.step % self.cfg.log_every:
            return []
        self.stop_requested = self.dist.any(self.stop_requested or self.signal_stop)
        lines = [vars(line) for line in self.control.poll()] if self.dist.leader else None
        return [Line(**d) for d in self.dist.broadcast_json(lines)]

    def _apply_control(self) -> None:
        """Requests from control.jsonl, each once, in order, at this step boundary. A conditional one
        (at_step / at_lr_time / when) waits, in the control state that checkpoints keep, until it holds."""
        self._apply_waiting()
        for item in self._control_lines():
            self.control.consume(item)
            self._consumed_since_checkpoint = True
            if item.problem == "blank":
                continue
            req = Request(item.request, item.number, request_id(item.request) or f"line-{item.number}")
            reason = item.problem or req.check(self.cfg) or expired(req.body) or self._other_attempt(req.body)
            if reason:
                self.rd.append_event("control", id=req.id, line=req.line, status="rejected", reason=reason,
                                     **self.where())
                self.rd.log(f"control line {req.line} rejected: {reason}")
                continue
            met = self._met(req)
            if met is None and len(self.control.state.waiting) >= MAX_WAITING:
                reason = (f"{MAX_WAITING} requests already wait for their conditions (the most a run keeps, "
                          "in every checkpoint); send this one when one of them has applied")
                self.rd.append_event("control", id=req.id, line=req.line, status="rejected", reason=reason,
                                     **self.where())
                self.rd.log(f"control line {req.line} rejected: {reason}")
                continue
            if met is None:
                self.control.state.waiting.append([req.line, req.id, kept(req.body)])
                self.rd.append_event("control", id=req.id, line=req.line, status="waiting", **req.condition,
                                     **self.where())
                continue
            req.apply(self, met)

    attempt: float | None = None     # this process's `started` in status.json

    def _other_attempt(self, req: dict) -> str | None:
        """A request for one attempt (process) of the run is not taken by a later one: `fork --now`'s
        checkpoint, sent to the job running then, never fires on a resume after that job stopped."""
        if "attempt" not in req or self.attempt is None or req["attempt"] == self.attempt:
            return None
        return ("sent to an earlier attempt of this run (started "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(req['attempt']))}), which ended before taking it")

    def _apply_waiting(self) -> None:
        waiting, still = self.control.state.waiting, []
        for line, rid, body in waiting:
            req = Request(body, line, rid)
            if reason := expired(body):
                self.rd.append_event("control", id=rid, line=line, status="rejected", reason=reason, **self.where())
                continue
            met = self._met(req)
            if met is None:
                still.append([line, rid, body])
            else:
                req.apply(self, met)
        if len(still) != len(waiting):
            self.control.state.waiting = still
            self._consumed_since_checkpoint = True

    def _met(self, req: Request) -> dict | None:
        return req.met(self.step, self.lr_time, self.loss_ema, self.last_eval.get("eval_loss"), self.when_values())

    def when_values(self) -> dict:
        """What `when` conditions on besides the losses (engine/control/request.py WHEN_KEYS); a value
        not measured yet (no noise fields: no gradient accumulation) is absent, so its condition waits."""
        out = {}
        g2, tr = self.noise_ema.get("noise_g2"), self.noise_ema.get("noise_tr_sigma")
        if g2 is not None and tr is not None and g2 > 0:
            out["noise_scale"] = tr / g2
        if "grad_norm" in self.noise_ema:
            out["grad_norm"] = self.noise_ema["grad_norm"]
        return out

    def where(self) -> dict:
        """The clocks at this step boundary, as every event records them."""
        return self.clock.as_dict()

    # the control layer's view of a run (engine/control/request.py Steerable): all a request touches
    def record(self, kind: str, **fields) -> None:
        self.rd.append_event(kind, **fields)

    def set_noise(self, lr: float, batch_size: int, ramp: float) -> dict:
        return self.schedule.set(self.step, self.lr_time, lr=lr, batch_size=batch_size, ramp=ramp, manual=True)

    def checkpoint_now(self) -> None:
        if self.last_eval.get("step") != self.step:
            self.evaluate()
        self.save_checkpoint()

    def stop(self) -> None:
        self.stop_requested = True

    def twin_checkpoint(self) -> tuple[str, str]:
        """Checkpoint this boundary (before the change applies) for an unsteered twin and name the
        twin; the launcher forks and queues it from the acknowledgement (engine.launch.twins): the
        loop writes only its own run directory."""
        from engine.store.fork import twin_name
        from engine.store.rundir import new_run_id

        self.checkpoint_now()
        return new_run_id(self.cfg.preset or "run", twin_name(self.cfg.name, self.step)), \
            self.rd.checkpoint_path(self.step).name

    def _checkpoint_due(self, lr_time_before: float) -> bool:
        cfg = self.cfg
        if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
            return True
        if self.step in cfg.checkpoint_at_steps:
            return True
        # crossed a listed lr_time in this step?
        return any(not reached(lr_time_before, t) and reached(self.lr_time, t) for t in cfg.checkpoint_at_lr_times)

    # ------------------------------------------------------------------ records
    def check_run_dir(self) -> None:
        """Raise RunDirReplaced when rd.path is no longer the folder setup() found (one stat, at
        every flush and control poll: records never go into a folder swapped in under the job)."""
        key = getattr(self, "_dir_key", None)
        if key is None:
            return
        try:
            st = os.stat(self.rd.path)
            now = (st.st_dev, st.st_ino)
        except OSError:
            now = None
        if now != key:
            raise RunDirReplaced(f"{self.rd.path} is no longer the folder this job started in (moved or "
                                 "replaced); it stops without writing into it")

    def flush(self, wait: bool = True) -> None:
        """Write buffered step records. On CUDA, the step loop calls flush(wait=False): the window's
        losses start their copy into pinned memory without waiting, and the window before it (whose
        copy finished long ago) is written. Eval, checkpoints and the end flush everything."""
        self.check_run_dir()
        window = self._window
        self._window = None
        if self._pending:
            losses = self.dist.mean(torch.stack([loss for _, loss in self._pending]))
            if self.device.type == "cuda":
                host = torch.empty(losses.shape, dtype=losses.dtype, pin_memory=True)
                host.copy_(losses, non_blocking=True)
                done = torch.cuda.Event()
                done.record()
            else:
                host, done = losses, None
            self._window = ([rec for rec, _ in self._pending], host, done)
            self._pending = []
        if window:
            self._write(*window)
        if wait and self._window:
            window, self._window = self._window, None
            self._write(*window)

    def _write(self, recs: list[dict], host: torch.Tensor, done) -> None:
        if done is not None:
            done.synchronize()   # long finished when the loop writes a window one flush late
        losses = host.tolist()
        records = [dict(rec, loss=l) for rec, l in zip(recs, losses)]
        for l in losses:
            if math.isfinite(l):
                self.loss_ema = l if self.loss_ema is None else LOSS_EMA * self.loss_ema + (1 - LOSS_EMA) * l
        for rec in recs:
            for key in ("noise_tr_sigma", "noise_g2", "grad_norm"):
                v = rec.get(key)
                if isinstance(v, float) and math.isfinite(v):
                    old = self.noise_ema.get(key)
                    self.noise_ema[key] = v if old is None else LOSS_EMA * old + (1 - LOSS_EMA) * v
        self.rd.append_metrics(records)
        last = self.last_record = records[-1]
        peak = {"gpu_peak_gib": round(torch.cuda.max_memory_reserved(self.device) / 2**30, 3)} \
            if self.device.type == "cuda" else {}   # what a worker packing jobs by memory plans with
        self.rd.write_status(step=last["step"], samples=last["samples"], lr_time=last["lr_time"],
                             loss=last["loss"], lr=last["lr"], batch_size=last["batch_size"], durable=False, **peak)
        if self.on_progress:
            self.on_progress(self)
        bad = next((r for r in records if not math.isfinite(r["loss"])), None)
        if bad:
            raise Diverged(f"loss is {bad['loss']} at step {bad['step']}")

    @torch.no_grad()
    def evaluate(self) -> dict:
        self.flush()
        model = self.model
        model.eval()
        total = errors = count = 0.0
        eval_batch = self.cfg.micro_batch_size or min(self.cfg.batch_size, 1024)
        for x, y in self.stream.eval_batches(eval_batch):
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with self.autocast:
                logits = self.eval_fwd(x)
            total += loss_fn(logits, x, y, reduction="sum")
            if y is None:
                errors += (logits[:, :-1].argmax(-1) != x[:, 1:]).sum()
                count += x.shape[0] * (x.shape[1] - 1)
            else:
                errors += (logits.argmax(-1) != y).sum()
                count += x.shape[0]
        model.train()
        rec = {**self.clock.as_dict(), "wall": self.wall(),
               "eval_loss": float(total) / count, "eval_error": float(errors) / count,
               "unique_samples": self.stream.unique_seen * self.tokens_per_sample}
        self.rd.append_metrics([rec])
        self.rd.write_status(eval_loss=rec["eval_loss"], eval_error=rec["eval_error"], eval_step=self.step)
        self.last_eval = rec
        if self.levels.active:
            self._reached = self.levels.crossed(self.step, rec["eval_loss"])
        self.rd.log(f"step {self.step}: eval loss {rec['eval_loss']:.4f} error {rec['eval_error']:.4f}")
        return rec

    def save_checkpoint(self) -> None:
        self.flush()
        path = self.rd.checkpoint_path(self.step)
        meta = {**self.clock.as_dict(),
                "eval_loss": self.last_eval.get("eval_loss") if self.last_eval.get("step") == self.step else None,
                "model": self.cfg.model.name, "model_config": vars(self.cfg.model),
                "hf_config": hf_config_dict(self.cfg.model), "run": self.rd.id}
        reached = self._reached if self.last_eval.get("step") == self.step else []
        if reached:
            meta["loss_levels"] = [r["level"] for r in reached]   # the levels this checkpoint stands for
        self._reached = []
        loop = {**self.clock.as_dict(), "wall": self.wall(),
                "metrics_size": self.rd.metrics_size(), "last_eval": self.last_eval, "loss_ema": self.loss_ema,
                "noise_ema": self.noise_ema, "loss_levels": self.levels.state_dict()}
        if not self.dist.leader:
            return
        ckpt.save(path, self.model, self.optimizer, meta,
                  {"loop": loop, "schedule": self.schedule.state_dict(), "stream": self.stream.state_dict(),
                   "control": self.control.state_dict()})
        self.last_checkpoint = self.step
        self._consumed_since_checkpoint = False
        self.rd.append_event("checkpoint", step=self.step, lr_time=self.lr_time, samples=self.samples,
                             path=f"checkpoints/{path.name}", eval_loss=meta["eval_loss"],
                             **({"loss_levels": reached} if reached else {}))


def train(rd: RunDir, resume: bool = False, on_progress: Callable[[Trainer], None] | None = None,
          hooks: list[Callable[[Trainer], None]] = ()) -> str:
    """Train the run in `rd` to its end (or a stop); returns the final state. Never raises for a
    failed run: the failure is recorded in status.json and events.jsonl."""
    trainer = Trainer(rd, on_progress=on_progress)
    trainer.hooks.extend(hooks)
    old = signal.getsignal(signal.SIGTERM)

    def on_term(signum, frame):  # checkpoint at the next step boundary, then end cleanly
        trainer.signal_stop = True

    in_main = _in_main_thread()
    if in_main:
        signal.signal(signal.SIGTERM, on_term)
    state = "failed"
    try:   # records go through trainer.rd: under DDP, rank 0 alone writes (the others' log goes to stderr)
        trainer.setup(resume)
        state = trainer.run()
        trainer.rd.write_status(state=state, ended=time.time(), step=trainer.step)
        graphs = {"graphs": compiled_graphs() - trainer._graphs_before} if trainer.compiled else {}
        trainer.rd.append_event("end", state=state, step=trainer.step, lr_time=trainer.lr_time,
                                eval_loss=trainer.last_eval.get("eval_loss"), **graphs)
        return state
    except RunDirReplaced as e:   # nothing more is written under rd.path: it is not ours any more
        print(f"error: {e}", file=sys.stderr, flush=True)
        state = "replaced"
        return "failed"
    except Diverged as e:
        state = "diverged"
        trainer.rd.write_status(state="diverged", ended=time.time(), error=str(e))
        trainer.rd.append_event("diverged", step=trainer.step, lr_time=trainer.lr_time, error=str(e))
        trainer.rd.log(f"diverged: {e}")
        return "diverged"
    except DataMissing as e:
        trainer.rd.write_status(state="failed", ended=time.time(), error=str(e))
        trainer.rd.append_event("error", error=str(e))
        trainer.rd.log(f"error: {e}")
        return "failed"
    except Exception as e:  # recorded, with the traceback in log.txt
        if disk_full(e) or disk_full(e.__context__):
            return _end_disk_full(trainer, e if disk_full(e) else e.__context__)
        trainer.rd.write_status(state="failed", ended=time.time(), error=f"{type(e).__name__}: {e}")
        trainer.rd.append_event("error", step=trainer.step, error=f"{type(e).__name__}: {e}")
        trainer.rd.log(traceback.format_exc())
        return "failed"
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, old)
        leader = not getattr(trainer, "dist", None) or trainer.dist.leader
        if getattr(trainer, "dist", None):
            trainer.dist.close()
        if state in ("done", "failed", "diverged") and leader:
            from engine.control.notify import notify
            try:
                notify(rd, state)
            except Exception as e:  # noqa: BLE001 - a notification never changes how a run ended
                rd.log(f"notify: {type(e).__name__}: {e}")


def _end_disk_full(trainer: "Trainer", e: OSError) -> str:
    """Out of space is an ending, not a crash: the last good checkpoint is kept (a torn one never
    replaced it: checkpoints are written to a temp file and renamed), and the run ends `failed` with
    one line naming the path and the free space; each record is tried on its own, and status.json
    is overwritten in place if it must (it takes no new block). `gpctl resume` continues it once
    there is space; its records then equal an uninterrupted run's (tested on a small tmpfs)."""
    rd = trainer.rd
    where = e.filename or rd.path
    last = rd.list_checkpoints()[-1][0] if rd.list_checkpoints() else None
    free = free_bytes(rd.path)
    error = (f"disk full: {where}: {e.strerror} ({free if free is not None else '?'} bytes free); "
             + (f"its last checkpoint (step {last}) is kept: free space, then gpctl resume {rd.id}" if last is not None
                else f"no checkpoint yet: free space, then gpctl resume {rd.id} starts it again"))
    print(f"error: {error}", file=sys.stderr, flush=True)
    for write in (lambda: rd.write_status(state="failed", ended=time.time(), error=error, disk_full=True),
                  lambda: rd.append_event("error", step=trainer.step, error=error, disk_full=True)):
        try:
            write()
        except OSError:
            pass
    return "failed"


def _in_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()
