"""The run config: a typed schema, strict TOML loading and `--set key=value` overrides.

A config is plain dataclasses. Every key a preset or `--set` may name is a field here, with its
unit in the comment. Loading is strict: an unknown key, a wrong type or a bad value raises
ConfigError with one line that names the file and the key.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from engine.fs import read_small

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A user-caused config problem; str(e) is the one line to print."""


@dataclass
class ModelConfig:
    name: str = "resnet18"          # resnet18 | cnn | convnext | gpt2
    width: int = 64                 # resnet18: channels of the first stage (64 = the standard net); cnn: first layer
    depth: int = 3                  # cnn: conv layers (stride 2 and twice the channels on every second one)
    bn_momentum: float = 0.1        # resnet18: BatchNorm running-stat momentum (PyTorch's default)
    num_classes: int = 10
    depths: list[int] = field(default_factory=lambda: [3, 3, 9, 3])        # convnext stages (T)
    dims: list[int] = field(default_factory=lambda: [96, 192, 384, 768])   # convnext widths (T)
    n_layer: int = 12               # gpt2 (124M: 12/12/768)
    n_head: int = 12
    n_embd: int = 768
    vocab_size: int = 50257
    pad_vocab: int = 64             # gpt2: the output GEMM runs on the tied embedding padded with zero rows to a
                                    # multiple of this (50257 -> 50304, as nanoGPT: aligned GEMMs), its logits
                                    # sliced back to vocab_size: the same function and weights; 1 = no padding
    n_positions: int = 2048         # context length the model supports, tokens
    attention: str = "auto"         # gpt2: the SDPA kernel. auto: PyTorch's choice (flash on CUDA); cudnn | flash |
                                    # efficient | math: that kernel only (an error where it cannot run), to
                                    # measure one (benchmarks/gpu_check.sh measures cudnn on Hopper)
    dropout: float = 0.0            # Mosaic 125m trains without dropout


@dataclass
class DataConfig:
    source: str = "synthetic_images"  # synthetic_images | synthetic_tokens | cifar5m | cifar10 | c4 | imagenet
    mode: str = "online"            # online: every sample fresh; offline: fixed subset, repeated epochs
    offline_size: int = 50_000      # samples (sequences for LMs) in the offline subset
    path: str = ""                  # folder of the real data set (cifar5m parts, c4 shards, imagenet, cifar10)
    hf_name: str = "allenai/c4"     # hub name for C4 when `path` is empty
    hf_config: str = "en"
    tokenizer: str = "gpt2"         # hub name or local folder for AutoTokenizer.from_pretrained
    seq_len: int = 2048             # tokens per training sequence
    image_size: int = 32            # pixels; synthetic images, and the crop of larger stored images
    resize: int = 0                 # imagenet: pixels; each image is resized to resize x resize once decoded
                                    # (App. A.2: 256), then cropped to image_size (random: augment "crop";
                                    # else centred); 0 = shorter side to image_size, centre crop
    normalize: bool = True          # per-channel mean/std normalization
    augment: list[str] = field(default_factory=list)  # any of "crop", "flip" (App. A.2: RandomCrop+Flip)
    crop_padding: int = 4           # pixels, RandomCrop(image_size, padding=crop_padding) (CIFAR: 4)
    eval_samples: int = 10_000      # held-out examples (sequences for LMs)
    hold: str = "auto"              # in-memory image sets (CIFAR): "device" (uint8 on the GPU), "host" (host
                                    # memory, .npy parts memory-mapped and shared by jobs; each batch gathered
                                    # into pinned memory, copied without blocking), "auto": device up to
                                    # 2 GiB (CIFAR-10), else host (CIFAR-5m's 18.4 GB), so jobs pack on a GPU
    teacher_width: int = 48         # synthetic_images: channels of the random teacher CNN
    teacher_depth: int = 2          # synthetic_images: conv layers of the teacher
    teacher_sharpness: float = 4.0  # synthetic: logit scale; larger = lower Bayes loss, harder to fit
    vocab_size: int = 512           # synthetic_tokens: alphabet size
    workers: int = 4                # imagenet: decoding threads
    online_epochs: float = 1.0      # online: passes over a finite set allowed (1 = single pass; the paper's
                                    # ImageNet "online" arm is 10 epochs, App. A.2); `gpctl presets check`


@dataclass
class OptimConfig:
    name: str = "sgd"               # sgd | adamw
    momentum: float = 0.9           # SGD (App. A.1)
    nesterov: bool = False
    weight_decay: float = 0.0       # AdamW: decoupled
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # Mosaic 125m
    eps: float = 1e-8
    grad_clip: float = 0.0          # max global grad norm; 0 = off (Mosaic: 1.0)
    fused: str = "auto"             # auto (fused kernels on CUDA) | on | off


@dataclass
class ScheduleConfig:
    kind: str = "constant"          # constant | cosine (after a linear warmup)
    clock: str = "steps"            # what warmup and cosine count: "steps" (cosine over `steps`) or
                                    # "lr_time" (LR-normalized steps; cosine over `max_lr_time`, App. A.3)
    warmup_steps: int = 0           # clock "steps": steps of linear warmup from 0
    warmup_lr_time: float = 0.0     # clock "lr_time": LR-normalized steps of linear warmup from 0
    final_lr_ratio: float = 0.1     # cosine ends at this fraction of lr (Mosaic alpha_f = 0.1)


@dataclass
class Change:
    """A planned noise change, applied at the first step boundary where it is due."""
    at_step: int = -1               # apply before this step (steps taken so far == at_step)
    at_lr_time: float = -1.0        # or once lr_time >= this (LR-normalized steps)
    lr: float = 0.0                 # new base lr (0 = unchanged)
    batch_size: int = 0             # new batch size (0 = unchanged)
    ramp: float = 0.0               # reach the new lr linearly over this many LR-normalized steps
    manual: bool = False            # apply as a control request does: the lr is exact from then on (the
                                    # schedule's shape and later planned lr changes stop); `preset from-run`


@dataclass
class ControlConfig:
    max_lr_factor: float = 100.0    # a requested lr above this times the preset's lr is rejected
    max_batch_size: int = 65536     # samples; a requested batch above this is rejected
    share_with_group: bool = False  # run dir 0750 / files 0640: the group may read, never write
    poll_ms: float = 100.0          # the control file is checked at the first step boundary this long after
                                    # the last check (0: every step); where a request applied is recorded


@dataclass
class Config:
    name: str = ""                  # run name (arm), set by the preset
    preset: str = ""
    steps: int = 1000               # optimizer steps
    max_lr_time: float = 0.0        # stop once lr_time reaches this (the LR-normalized training duration of
                                    # App. A.3: the same for every lr); 0 = off
    lr: float = 0.025               # base learning rate (App. A.1)
    lr_ref: float = 0.0             # reference lr: lr_time = sum of base lr / lr_ref (see engine/schedule.py); 0 =
                                    # this run's `lr`, resolved when the config is built, so config.toml
                                    # records it and forks keep it whatever lr they set
    batch_size: int = 512           # samples (sequences) per optimizer step
    micro_batch_size: int = 0       # samples per forward/backward; 0 = the whole batch
    seed: int = 0                   # model init and data order
    data_seed: int = 0              # synthetic task (teacher) and eval set; shared by all arms
    eval_every: int = 100           # steps; 0 = only at the end
    checkpoint_every: int = 0       # steps; 0 = only at the end and at listed points
    checkpoint_at_steps: list[int] = field(default_factory=list)
    checkpoint_at_lr_times: list[float] = field(default_factory=list)
    checkpoint_at_losses: list[float] = field(default_factory=list)   # held-out losses (nats): checkpoint where the
                                    # eval loss first reaches each, evaluating more often near them (engine/levels.py)
    checkpoint_loss_tol: float = 0.01   # a loss checkpoint lands within this fraction of its level (cadence target)
    log_every: int = 20             # steps between flushes of metrics.jsonl (no GPU sync in between)
    noise_scale: bool = True        # record the gradient noise scale at each flush step where it is free:
                                    # gradient accumulation (micro_batch_size < batch_size) or DDP ranks
                                    # (engine/train/noise.py: McCandlish et al. 2018's B_simple)
    noise_micro: int = 0            # opt-in where it is not free: a run that does not accumulate cuts each
                                    # flush step's batch into micro-batches of this size to measure it (the
                                    # same gradient up to rounding; BatchNorm's statistics are then the
                                    # micro-batches' on those steps); 0 = only where free
    device: str = "auto"            # auto | cpu | cuda | cuda:N
    gpus: int = 1                   # GPUs a queued job asks of a GPU worker (> 1: torchrun DDP), per node
    nodes: int = 1                  # Slurm nodes a job spans (> 1: srun torchrun, c10d rendezvous at the
                                    # first node; nodes × gpus ranks, rank 0 alone writes); local workers: 1
    gpu_memory: float = 0.0         # GiB the job needs on each GPU; a worker packing several jobs per GPU
                                    # starts it only where that much is free (0: its last recorded peak, else count only)
    precision: str = "auto"         # auto (bf16 on CUDA) | fp32 | bf16
    channels_last: bool = True      # convnets on CUDA
    compile: bool | str = "auto"    # torch.compile the model: true | false | "auto" (on CUDA: convnets with CUDA
                                    # graphs when no micro-batches, else default mode; GPT-2 default mode;
                                    # eager on the CPU). A compile that fails falls back to eager, with an event
    compile_mode: str = "default"   # torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune
                                    # | max-autotune-no-cudagraphs
    compile_backend: str = "inductor"  # inductor (generated kernels) | aot_eager | eager: dynamo's debugging
                                    # backends, the same graphs and recompiles without code generation
    threads: int = 0                # CPU threads for torch; 0 = torch's default
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    changes: list[Change] = field(default_factory=list)
    group: str = ""                 # a family of runs (seeds of one sweep point): "<preset>.<arm>-<point>"
    notify: str = ""                # a shell command run when this run ends, fails, diverges, is lost or stalls
    parent: str = ""                # fork: the run this one branched from
    parent_checkpoint: str = ""     # fork: absolute path of the checkpoint it starts from
    parent_overrides: list[str] = field(default_factory=list)  # fork: the --set items applied at its start

    @property
    def reference_lr(self) -> float:
        return self.lr_ref or self.lr

    @property
    def is_lm(self) -> bool:
        return self.model.name == "gpt2"


_CHOICES = {
    "model.name": ("resnet18", "cnn", "convnext", "gpt2"),
    "data.source": ("synthetic_images", "synthetic_tokens", "cifar5m", "cifar10", "c4", "imagenet"),
    "data.mode": ("online", "offline"),
    "data.hold": ("auto", "device", "host"),
    "optim.name": ("sgd", "adamw"),
    "optim.fused": ("auto", "on", "off"),
    "schedule.kind": ("constant", "cosine"),
    "schedule.clock": ("steps", "lr_time"),
    "precision": ("auto", "fp32", "bf16"),
    "compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    "compile_backend": ("inductor", "aot_eager", "eager"),
}
_AUGMENTS = ("crop", "flip")
ATTENTIONS = ("auto", "cudnn", "flash", "efficient", "math")


# ---------------------------------------------------------------- building from dicts

def _check_value(where: str, key: str, tp: Any, value: Any) -> Any:
    """Return value converted to tp, or raise ConfigError naming where and key."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: '{key}' must be a table, got {_show(value)}")
        return from_dict(tp, value, where, prefix=key + ".")
    if origin is list:
        (item_tp,) = get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: '{key}' must be a list, got {_show(value)}")
        return [_check_value(where, f"{key}[{i}]", item_tp, v) for i, v in enumerate(value)]
    if tp == (bool | str):     # compile: true, false or "auto"
        if isinstance(value, bool) or value == "auto":
            return value
        raise ConfigError(f"{where}: '{key}' must be true, false or \"auto\", got {_show(value)}")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: '{key}' must be true or false, got {_show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: '{key}' must be an integer, got {_show(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: '{key}' must be a number, got {_show(value)}")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: '{key}' must be finite, got {value}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: '{key}' must be a string, got {_show(value)}")
        if why := text_problem(value):
            raise ConfigError(f"{where}: '{key}': {why}")
        if len(value) > 4096:
            raise ConfigError(f"{where}: '{key}' is {len(value)} characters, over the 4096-character limit")
        return value
    raise TypeError(f"unsupported config type {tp}")  # a schema bug, not a user error


def _show(value: Any) -> str:
    """A value as the error quotes it: short (at most 60 characters) and in ASCII, whatever it holds."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10 ** 30:
        return f"an integer of {len(str(abs(value)))} digits"
    if isinstance(value, (str, int, float, bool, list)):
        text = json.dumps(value)
        return text if len(text) <= 60 else text[:57] + "..."
    return type(value).__name__


@functools.lru_cache(maxsize=None)
def _schema(cls: type) -> tuple[dict, frozenset]:
    return get_type_hints(cls), frozenset(f.name for f in dataclasses.fields(cls))


def from_dict(cls: type, data: dict, where: str, prefix: str = "") -> Any:
    """Build dataclass `cls` from `data`, strictly."""
    hints, names = _schema(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"{where}: unknown key '{prefix}{key}'" + _suggest(key, names))
        kwargs[key] = _check_value(where, prefix + key, hints[key], value)
    return cls(**kwargs)


def _suggest(key: str, names: set[str]) -> str:
    import difflib
    close = difflib.get_close_matches(key, sorted(names), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def to_dict(cfg: Any) -> dict:
    """A config as plain dicts and lists (what dataclasses.asdict gives, ~5x faster: a preset with
    20,000 planned changes is turned into a dict several times by `presets check`)."""
    return _plain(cfg)


@functools.lru_cache(maxsize=None)
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _plain(v: Any) -> Any:
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {k: _plain(getattr(v, k)) for k in _field_names(type(v))}
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, tuple):
        return tuple(_plain(x) for x in v)
    return v


def merge(base: dict, over: dict) -> dict:
    """Deep-merge TOML tables: `over` wins; lists and scalars are replaced whole."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def validate(cfg: Config, where: str) -> Config:
    """Value checks beyond types: choices, ranges, consistency."""
    flat = {"model.name": cfg.model.name, "data.source": cfg.data.source, "data.mode": cfg.data.mode,
            "data.hold": cfg.data.hold,
            "optim.name": cfg.optim.name, "optim.fused": cfg.optim.fused,
            "schedule.kind": cfg.schedule.kind, "schedule.clock": cfg.schedule.clock,
            "precision": cfg.precision, "compile_mode": cfg.compile_mode, "compile_backend": cfg.compile_backend}
    for key, value in flat.items():
        if value not in _CHOICES[key]:
            raise ConfigError(f"{where}: '{key}' = {value!r} is not one of {', '.join(_CHOICES[key])}")
    positive = {"steps": cfg.steps, "data.image_size": cfg.data.image_size, "gpus": cfg.gpus, "nodes": cfg.nodes, "batch_size": cfg.batch_size, "log_every": cfg.log_every,
                "data.eval_samples": cfg.data.eval_samples, "data.seq_len": cfg.data.seq_len,
                "data.offline_size": cfg.data.offline_size}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{where}: '{key}' must be > 0, got {value}")
    if cfg.lr <= 0:
        raise ConfigError(f"{where}: 'lr' must be > 0, got {cfg.lr}")
    _check_ranges(cfg, where)
    if cfg.compile_backend != "inductor" and cfg.compile_mode != "default":
        raise ConfigError(f"{where}: 'compile_mode' = {cfg.compile_mode!r} needs compile_backend = \"inductor\" "
                          f"(got {cfg.compile_backend!r})")
    for key in ("eval_every", "checkpoint_every", "micro_batch_size", "noise_micro", "lr_ref", "max_lr_time"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{where}: '{key}' must be >= 0, got {getattr(cfg, key)}")
    _check_schedule(cfg, where)
    if cfg.data.resize and cfg.data.resize < cfg.data.image_size:
        raise ConfigError(f"{where}: 'data.resize' = {cfg.data.resize} is smaller than "
                          f"'data.image_size' = {cfg.data.image_size}")
    if cfg.data.resize < 0 or cfg.data.crop_padding < 0:
        raise ConfigError(f"{where}: 'data.resize' and 'data.crop_padding' must be >= 0")
    if cfg.model.attention not in ATTENTIONS:
        raise ConfigError(f"{where}: 'model.attention' = {cfg.model.attention!r} is not one of {', '.join(ATTENTIONS)}")
    for a in cfg.data.augment:
        if a not in _AUGMENTS:
            raise ConfigError(f"{where}: 'data.augment' entry {a!r} is not one of {', '.join(_AUGMENTS)}")
    if len(cfg.optim.betas) != 2 or not all(0 <= b < 1 for b in cfg.optim.betas):
        raise ConfigError(f"{where}: 'optim.betas' must be two numbers in [0, 1), got {cfg.optim.betas}")
    _check_batch(where, "batch_size", cfg.batch_size, cfg.micro_batch_size)
    if cfg.noise_micro and not cfg.micro_batch_size:     # the flush steps' micro-batches must cut every planned batch
        for key, b in [("batch_size", cfg.batch_size)] + [(f"changes[{i}].batch_size", c.batch_size)
                                                          for i, c in enumerate(cfg.changes) if c.batch_size]:
            if b > cfg.noise_micro and b % cfg.noise_micro:
                raise ConfigError(f"{where}: '{key}' = {b} is not a multiple of noise_micro = {cfg.noise_micro} "
                                  "(the noise scale's micro-batches)")
    for i, ch in enumerate(cfg.changes):
        key = f"changes[{i}]"
        if (ch.at_step >= 0) == (ch.at_lr_time >= 0):
            raise ConfigError(f"{where}: '{key}' needs exactly one of at_step, at_lr_time")
        if ch.lr < 0 or ch.batch_size < 0 or ch.ramp < 0:
            raise ConfigError(f"{where}: '{key}' lr, batch_size and ramp must be >= 0")
        if ch.lr == 0 and ch.batch_size == 0:
            raise ConfigError(f"{where}: '{key}' changes nothing (set lr or batch_size)")
        if ch.batch_size:
            _check_batch(where, f"{key}.batch_size", ch.batch_size, cfg.micro_batch_size)
    if cfg.control.max_lr_factor <= 0 or cfg.control.max_batch_size <= 0:
        raise ConfigError(f"{where}: 'control.max_lr_factor' and 'control.max_batch_size' must be > 0")
    if cfg.is_lm != (cfg.data.source in ("synthetic_tokens", "c4")):
        raise ConfigError(f"{where}: 'model.name' = {cfg.model.name!r} does not fit "
                          f"'data.source' = {cfg.data.source!r}")
    if cfg.is_lm and cfg.data.seq_len > cfg.model.n_positions:
        raise ConfigError(f"{where}: 'data.seq_len' = {cfg.data.seq_len} exceeds "
                          f"'model.n_positions' = {cfg.model.n_positions}")
    return cfg


_RANGES = {   # key: (lowest, highest) for values beyond "> 0" that a run cannot work without
    "steps": (1, 10**12), "seed": (0, 2**63 - 1), "data_seed": (0, 2**63 - 1), "threads": (0, 4096),
    "gpus": (1, 4096), "nodes": (1, 4096), "model.width": (1, 65536), "model.pad_vocab": (1, 4096), "model.depth": (1, 1000), "model.num_classes": (2, 10**7),
    "model.n_layer": (1, 1000), "model.n_head": (1, 1000), "model.n_embd": (1, 10**6),
    "model.vocab_size": (2, 10**8), "model.n_positions": (1, 10**7), "data.image_size": (1, 65536),
    "data.seq_len": (1, 10**7), "gpu_memory": (0, 10**6), "data.eval_samples": (1, 10**9), "data.offline_size": (1, 10**12),
    "data.teacher_width": (1, 65536), "data.teacher_depth": (1, 1000), "data.vocab_size": (2, 10**8),
    "data.workers": (1, 1024), "control.max_batch_size": (1, 2**31), "control.poll_ms": (0, 3.6e6),
}


def _get(cfg: Config, key: str):
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _check_ranges(cfg: Config, where: str) -> None:
    import re
    for key, (lo, hi) in _RANGES.items():
        v = _get(cfg, key)
        if not lo <= v <= hi:
            raise ConfigError(f"{where}: '{key}' must be in [{lo}, {hi}], got {v}")
    for key in ("model.depths", "model.dims"):
        if any(v < 1 for v in _get(cfg, key)):
            raise ConfigError(f"{where}: '{key}' entries must be >= 1, got {_get(cfg, key)}")
    if cfg.is_lm and cfg.model.n_embd % cfg.model.n_head:
        raise ConfigError(f"{where}: 'model.n_embd' = {cfg.model.n_embd} is not a multiple of "
                          f"'model.n_head' = {cfg.model.n_head}")
    if not (0 <= cfg.model.dropout < 1 and 0 <= cfg.model.bn_momentum <= 1):
        raise ConfigError(f"{where}: 'model.dropout' must be in [0, 1) and 'model.bn_momentum' in [0, 1]")
    if any(s < 0 for s in cfg.checkpoint_at_steps) or any(t < 0 for t in cfg.checkpoint_at_lr_times):
        raise ConfigError(f"{where}: 'checkpoint_at_steps' and 'checkpoint_at_lr_times' must be >= 0")
    bad = next((v for v in cfg.checkpoint_at_losses if not 0 < v < 1e6), None)
    if bad is not None:
        raise ConfigError(f"{where}: 'checkpoint_at_losses' entries must be held-out losses > 0 (nats), got {bad}")
    if len(cfg.checkpoint_at_losses) > 1000:
        raise ConfigError(f"{where}: 'checkpoint_at_losses' has {len(cfg.checkpoint_at_losses)} levels (at most 1000)")
    if not 0 < cfg.checkpoint_loss_tol < 1:
        raise ConfigError(f"{where}: 'checkpoint_loss_tol' must be in (0, 1), got {cfg.checkpoint_loss_tol}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device):
        raise ConfigError(f"{where}: 'device' = {cfg.device!r} is not one of auto, cpu, cuda, cuda:N")
    if cfg.optim.momentum < 0 or cfg.optim.weight_decay < 0 or cfg.optim.eps <= 0 or cfg.optim.grad_clip < 0:
        raise ConfigError(f"{where}: 'optim.momentum', 'optim.weight_decay' and 'optim.grad_clip' must be >= 0 "
                          f"and 'optim.eps' > 0")
    from engine.fs import is_name
    for key in ("name", "preset"):
        v = getattr(cfg, key)
        if v and not is_name(v):
            raise ConfigError(f"{where}: '{key}' = {v!r} is not a plain name (letters, digits, _ . -; no '..')")


def _check_schedule(cfg: Config, where: str) -> None:
    sc = cfg.schedule
    if sc.warmup_steps < 0 or sc.warmup_lr_time < 0:
        raise ConfigError(f"{where}: 'schedule.warmup_steps' and 'schedule.warmup_lr_time' must be >= 0")
    if not 0 <= sc.final_lr_ratio <= 1:
        raise ConfigError(f"{where}: 'schedule.final_lr_ratio' must be in [0, 1], got {sc.final_lr_ratio}")
    if sc.clock == "steps" and sc.warmup_lr_time:
        raise ConfigError(f"{where}: 'schedule.warmup_lr_time' needs schedule.clock = \"lr_time\" "
                          f"(on the steps clock use 'schedule.warmup_steps')")
    if sc.clock == "lr_time":
        if sc.warmup_steps:
            raise ConfigError(f"{where}: 'schedule.warmup_steps' is for schedule.clock = \"steps\" "
                              f"(on the lr_time clock use 'schedule.warmup_lr_time')")
        if cfg.max_lr_time <= 0:
            raise ConfigError(f"{where}: schedule.clock = \"lr_time\" needs 'max_lr_time' > 0 "
                              f"(the LR-normalized horizon the schedule spans)")
        if sc.warmup_lr_time >= cfg.max_lr_time and sc.kind == "cosine":
            raise ConfigError(f"{where}: 'schedule.warmup_lr_time' = {sc.warmup_lr_time} leaves no cosine "
                              f"before 'max_lr_time' = {cfg.max_lr_time}")
    elif sc.kind == "cosine" and sc.warmup_steps >= cfg.steps:
        raise ConfigError(f"{where}: 'schedule.warmup_steps' = {sc.warmup_steps} leaves no cosine "
                          f"before 'steps' = {cfg.steps}")
    if cfg.data.online_epochs <= 0:
        raise ConfigError(f"{where}: 'data.online_epochs' must be > 0, got {cfg.data.online_epochs}")


def _check_batch(where: str, key: str, batch: int, micro: int) -> None:
    if batch <= 0:
        raise ConfigError(f"{where}: '{key}' must be > 0, got {batch}")
    if micro and batch > micro and batch % micro:
        raise ConfigError(f"{where}: '{key}' = {batch} is not a multiple of micro_batch_size = {micro}")


def _legacy(data: dict) -> dict:
    """Configs written before data.hold said data.on_device (a bool): runs made then still load."""
    d = data.get("data")
    if isinstance(d, dict) and "on_device" in d and "hold" not in d and isinstance(d["on_device"], bool):
        d = {k: v for k, v in d.items() if k != "on_device"}
        d["hold"] = "device" if data["data"]["on_device"] else "host"
        data = {**data, "data": d}
    return data


def build(data: dict, where: str) -> Config:
    cfg = validate(from_dict(Config, _legacy(data), where), where)
    if not cfg.lr_ref:
        cfg.lr_ref = cfg.lr   # resolved once: the clock's unit never moves with a later lr
    return cfg


# ---------------------------------------------------------------- --set overrides

MAX_DEPTH = 16          # tables and lists nested deeper than this are refused (configs use 3)
MAX_TEXT = 16 << 20     # characters of TOML parsed at once (a --set value, a preset, a settings file)


def depth_problem(value: Any, limit: int = MAX_DEPTH) -> str | None:
    """Why `value` (parsed TOML or JSON) is nested too deeply to keep, or None; never recurses."""
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            if d > limit:
                return f"nested deeper than {limit} levels"
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return None


def loads_toml(text: str, where: str) -> dict:
    """Parse TOML with bounds: at most MAX_TEXT characters, nested at most MAX_DEPTH deep, integers
    of at most 4300 digits (Python's own limit): anything past them is one ConfigError naming `where`."""
    if len(text) > MAX_TEXT:
        raise ConfigError(f"{where}: {len(text)} characters, over the {MAX_TEXT}-character limit")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where}: invalid TOML: {e}") from None
    except RecursionError:
        raise ConfigError(f"{where}: invalid TOML: nested deeper than {MAX_DEPTH} levels") from None
    except ValueError:        # an integer of more than 4300 digits (Python's int parsing limit)
        raise ConfigError(f"{where}: invalid TOML: an integer of more than 4300 digits") from None
    if why := depth_problem(data):
        raise ConfigError(f"{where}: {why}")
    return data


def parse_value(text: str) -> Any:
    """A `--set` value is a TOML value (numbers, true/false, [lists], "strings"); bare words are strings.
    A value nested too deeply or with too many digits is a ConfigError saying why (the caller names
    the key), never a traceback."""
    try:
        return loads_toml(f"v = {text}", "--set")["v"]
    except ConfigError as e:
        if "invalid TOML:" in str(e) and "nested" not in str(e) and "digits" not in str(e):
            return text
        raise ConfigError(str(e).split("--set: ", 1)[-1].replace("invalid TOML: ", "")) from None   # the reason alone


_BOOKKEEPING = {   # config keys gpctl writes itself: a --set of one would be silently overwritten
    "preset": "it is the preset file's name",
    "name": "a preset names its arms; a fork takes --name",
    "parent": "gpctl fork records the run it forks",
    "parent_checkpoint": "gpctl fork records the checkpoint it starts from, inside the home",
    "parent_overrides": "gpctl fork records them",
}


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `key=value` strings (dotted keys for nested tables) to a raw config dict."""
    out = json.loads(json.dumps(data))  # deep copy of plain data
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, text = item.split("=", 1)
        key = key.strip()
        if key in _BOOKKEEPING:
            raise ConfigError(f"--set {key}: '{key}' is written by gpctl, not set ({_BOOKKEEPING[key]})")
        parts = key.split(".")
        cls: Any = Config
        node = out
        for i, part in enumerate(parts):
            names = {f.name for f in dataclasses.fields(cls)}
            if part not in names:
                raise ConfigError(f"--set {key}: unknown key '{'.'.join(parts[:i + 1])}'" + _suggest(part, names))
            tp = get_type_hints(cls)[part]
            if i == len(parts) - 1:
                if dataclasses.is_dataclass(tp):
                    raise ConfigError(f"--set {key}: '{key}' is a table; set one of its keys")
                try:
                    node[part] = parse_value(text.strip())
                except ConfigError as e:
                    raise ConfigError(f"--set {key}: {e}") from None
            else:
                if not dataclasses.is_dataclass(tp):
                    raise ConfigError(f"--set {key}: '{'.'.join(parts[:i + 1])}' is not a table")
                cls = tp
                node = node.setdefault(part, {})
    return out


def load_toml(path: Path) -> dict:
    try:
        return loads_toml(read_small(path, MAX_TEXT, follow=True).decode("utf-8"), str(path))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start + 1})") from None
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror or e}") from None


def dump_toml(data: dict) -> str:
    """Write a config dict as TOML (the subset configs use: scalars, lists, tables, arrays of tables)."""
    lines: list[str] = []
    _dump_table(data, [], lines)
    return "\n".join(lines).strip() + "\n"


def _toml_scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, str):
        return toml_string(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_scalar(x) for x in v) + "]"
    raise TypeError(type(v))


def text_problem(v: str) -> str | None:
    """Why a string cannot be kept in a config (None: it can): lone surrogates (undecodable bytes in
    an argument) are not text, and TOML cannot hold them."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"not valid text (character {e.start + 1} is an undecodable byte)"
    return None


def toml_string(v: str) -> str:
    """A TOML basic string holding exactly `v`, whatever its characters (emoji and other characters
    beyond U+FFFF are written as themselves; JSON's surrogate-pair escapes are not TOML)."""
    if why := text_problem(v):
        raise ConfigError(f"{v[:40]!r}: {why}")
    return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")


def _dump_table(data: dict, path: list[str], lines: list[str]) -> None:
    tables, arrays = [], []
    for k, v in data.items():
        if isinstance(v, dict):
            tables.append((k, v))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            arrays.append((k, v))
        else:
            lines.append(f"{k} = {_toml_scalar(v)}")
    for k, v in tables:
        lines += ["", f"[{'.'.join(path + [k])}]"]
        _dump_table(v, path + [k], lines)
    for k, items in arrays:
        for item in items:
            lines += ["", f"[[{'.'.join(path + [k])}]]"]
            _dump_table(item, path + [k], lines)
