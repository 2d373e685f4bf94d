"""A run's plan, without training: its schedule and its data stepped exactly as the loop steps them.

    p = plan(cfg)
    p.fired        each planned change with the step, lr_time and samples where it takes effect
    p.steps, p.samples, p.lr_time, p.final_lr      where and how the run ends
    p.epochs       passes over the arm's data (None for an endless synthetic stream)
    p.problems     why the run would not be the experiment its preset says it is

The loop below is the trainer's own arithmetic: `Schedule.due` then `Schedule.rates` at every
step boundary, `lr_time += base / lr_ref`, `ended()`; so a step printed here is the step at which the
run applies the change (a test checks this against a real run). It takes no model and no data.

A problem is one of:
  - a planned change that never fires before the run ends (it would be a silent no-op);
  - an online arm that draws more than `data.online_epochs` passes over a finite data set
    (online means every sample is fresh, "i.e., single epoch");
  - a run that stops at `steps` before its `max_lr_time` (its LR-normalized horizon is not reached);
  - a cosine over `steps` cut short by `max_lr_time` (the arm is never annealed while others are).
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from engine.config import Change, Config, ConfigError
from engine.schedule import Schedule, ended

# Training-set sizes of the real data sets, in samples (tokens for C4), for epoch accounting.
KNOWN_SIZES = {
    "cifar5m": 6_002_688,      # CIFAR-5m (Nakkiran et al.), part0 … part5; the eval set is cut from it
    "cifar10": 50_000,         # the train split (eval uses the test split)
    "imagenet": 1_281_167,     # ILSVRC-2012 train (eval uses val)
    "c4": 156_000_000_000,     # C4 en train: ~156B tokens (Dodge et al. 2021); a lower bound for GPT-2 BPE
}


@dataclass
class Fired:
    index: int          # position in cfg.changes
    change: Change
    step: int           # steps taken before it applies
    lr_time: float
    samples: int        # samples (tokens for LMs) seen before it applies
    changed: dict       # what changed: {"lr": [before, after], "batch_size": [...]}


@dataclass
class Plan:
    cfg: Config
    steps: int = 0
    samples: int = 0                 # samples (tokens for LMs) drawn by the end
    lr_time: float = 0.0
    final_lr: float = 0.0            # effective lr of the last step
    last_increment: float = 0.0      # lr_time the last step added (how far an end may overshoot)
    ended_by: str = "steps"          # "steps" | "max_lr_time"
    fired: list[Fired] = field(default_factory=list)
    unfired: list[int] = field(default_factory=list)
    data_size: int | None = None     # samples (tokens) the arm draws from; None = endless
    data_note: str = ""              # where data_size comes from
    problems: list[str] = field(default_factory=list)

    @property
    def epochs(self) -> float | None:
        return None if not self.data_size else self.samples / self.data_size


def plan(cfg: Config) -> Plan:
    """Step `cfg`'s schedule to the run's end (planned changes only; no control requests)."""
    p = Plan(cfg=cfg)
    sched = Schedule(cfg)
    tokens = cfg.data.seq_len if cfg.is_lm else 1
    step, samples, lr_time, lr, base = 0, 0, 0.0, 0.0, 0.0
    while not ended(cfg, step, lr_time):
        for i, ch, changed in sched.due(step, lr_time):
            p.fired.append(Fired(i, ch, step, lr_time, samples, changed))
        lr, base = sched.rates(step, lr_time)
        samples += sched.batch_size * tokens
        lr_time += base / sched.lr_ref
        step += 1
    p.steps, p.samples, p.lr_time, p.final_lr = step, samples, lr_time, lr
    p.last_increment = base / sched.lr_ref
    p.ended_by = "steps" if step >= cfg.steps else "max_lr_time"
    done = {f.index for f in p.fired}
    p.unfired = [i for i in range(len(cfg.changes)) if i not in done]
    p.data_size, p.data_note = data_size(cfg)
    p.problems = _problems(p)
    return p


def _when(ch: Change) -> str:
    return f"at_step {ch.at_step}" if ch.at_step >= 0 else f"at_lr_time {ch.at_lr_time:g}"


def _problems(p: Plan) -> list[str]:
    cfg, out = p.cfg, []
    for i in p.unfired:
        out.append(f"changes[{i}] ({_when(cfg.changes[i])}) never fires: the run ends at step {p.steps}, "
                   f"lr_time {p.lr_time:.1f}")
    if cfg.max_lr_time > 0 and p.ended_by == "steps" and p.lr_time < cfg.max_lr_time - 1e-9:
        out.append(f"the horizon is not reached: 'steps' = {cfg.steps} ends the run at lr_time "
                   f"{p.lr_time:.1f}, before 'max_lr_time' = {cfg.max_lr_time:g}")
    sc = cfg.schedule
    if sc.kind == "cosine" and sc.clock == "steps" and p.ended_by == "max_lr_time":
        out.append(f"the cosine over 'steps' = {cfg.steps} is cut at step {p.steps} by 'max_lr_time' = "
                   f"{cfg.max_lr_time:g} (last lr {p.final_lr:.3g}, never annealed); "
                   f"use schedule.clock = \"lr_time\"")
    if cfg.data.mode == "online" and p.epochs is not None and p.epochs > cfg.data.online_epochs + 1e-12:
        unit = "tokens" if cfg.is_lm else "samples"
        out.append(f"the online arm repeats data: {p.samples:,} {unit} from {p.data_size:,} ({p.data_note}) "
                   f"is {p.epochs:.2f} epochs, more than 'data.online_epochs' = {cfg.data.online_epochs:g}")
    return out


def compare_ends(plans: list[Plan]) -> list[str]:
    """Arms of one preset are compared on lr_time: they must end at the same LR-normalized time."""
    if len(plans) < 2:
        return []
    lo, hi = min(p.lr_time for p in plans), max(p.lr_time for p in plans)
    if hi - lo <= max(p.last_increment for p in plans) + 1e-9 * hi:
        return []
    ends = ", ".join(f"{p.cfg.name} {p.lr_time:.1f}" for p in plans)
    return [f"arms meant to be compared end at different LR-normalized times: {ends}"]


def check(cfg: Config, where: str) -> Config:
    """Raise ConfigError (one line) when the run would not be the experiment it says it is."""
    problems = plan(cfg).problems
    if problems:
        hint = " (lengthen the run, or --set changes=[] to run without it)" if "never fires" in problems[0] else ""
        raise ConfigError(f"{where}: {problems[0]}{hint}")
    return cfg


# ---------------------------------------------------------------- data accounting

def data_size(cfg: Config) -> tuple[int | None, str]:
    """(samples, or tokens for LMs, that the arm draws from; where that number comes from)."""
    dc = cfg.data
    tokens = dc.seq_len if cfg.is_lm else 1
    if dc.mode == "offline":
        return dc.offline_size * tokens, f"offline subset of {dc.offline_size:,}"
    if dc.source.startswith("synthetic"):
        return None, "endless synthetic stream"
    if dc.source == "cifar5m":
        local = _cifar5m_local(dc.path or "~/data/cifar5m")
        total, note = (local, "the parts on disk") if local else (KNOWN_SIZES["cifar5m"], "CIFAR-5m")
        return total - dc.eval_samples, f"{note} less {dc.eval_samples:,} held out"
    return KNOWN_SIZES[dc.source], {"cifar10": "CIFAR-10 train", "imagenet": "ImageNet train",
                                    "c4": "C4 en train, ~156B tokens"}[dc.source]


def _cifar5m_local(path: str) -> int:
    """Images in the CIFAR-5m parts at `path` (read from the .npy headers; 0 if none are there)."""
    import numpy as np

    total = 0
    for part in sorted(Path(os.path.expanduser(path)).glob("part*.npz")):
        try:
            with zipfile.ZipFile(part) as z, z.open("Y.npy") as f:
                version = np.lib.format.read_magic(f)
                shape = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                         else np.lib.format.read_array_header_2_0(f))[0]
            total += int(shape[0])
        except (OSError, KeyError, ValueError, zipfile.BadZipFile):
            return 0  # unreadable: fall back to the published size; training reports the real error
    return total
