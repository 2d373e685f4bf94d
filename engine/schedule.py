"""Learning-rate and batch-size schedules, and the LR-normalized clock.

The effective learning rate of step s is   lr_s = base(lr_time) * shape(s)
  - shape(s): the preset's schedule kind — 1 for constant, warmup then cosine to final_lr_ratio;
  - base:     the preset's `lr`, replaced by each change (planned `changes`, or requests from the
              control file); with `ramp` R it moves linearly to the new value over R LR-normalized
              steps (the paper ramps lr increases over 100).
A manual lr (control file, fork) is exact from then on: shape(s) = 1 and planned lr changes are
skipped; planned batch changes still apply.
lr_time after s steps is  sum_{i<s} lr_i / lr_ref.
A batch-size change takes effect at a step boundary, never inside gradient accumulation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from engine.config import Change, Config


@dataclass
class Noise:
    base_lr: float
    batch_size: int
    ramp_from: float = 0.0
    ramp_to: float = 0.0
    ramp_start: float = 0.0         # lr_time where the ramp began
    ramp_len: float = 0.0           # LR-normalized steps; 0 = no ramp in progress
    applied: list[bool] = field(default_factory=list)  # one per planned change
    manual: bool = False            # an lr was set by hand: the schedule's lr no longer applies


class Schedule:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.lr_ref = cfg.reference_lr
        self.noise = Noise(base_lr=cfg.lr, batch_size=cfg.batch_size,
                           applied=[False] * len(cfg.changes))

    # ------------------------------------------------------------ the two knobs
    def shape(self, step: int) -> float:
        sc = self.cfg.schedule
        if self.noise.manual:
            return 1.0
        if sc.warmup_steps and step < sc.warmup_steps:
            return (step + 1) / sc.warmup_steps
        if sc.kind == "cosine":
            span = max(1, self.cfg.steps - sc.warmup_steps)
            t = min(1.0, (step - sc.warmup_steps) / span)
            return sc.final_lr_ratio + (1 - sc.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
        return 1.0

    def base_lr(self, lr_time: float) -> float:
        n = self.noise
        if n.ramp_len > 0:
            frac = (lr_time - n.ramp_start) / n.ramp_len
            if frac < 1:
                return n.ramp_from + (n.ramp_to - n.ramp_from) * max(0.0, frac)
            n.ramp_len = 0.0
        return n.base_lr

    def lr(self, step: int, lr_time: float) -> float:
        return self.base_lr(lr_time) * self.shape(step)

    @property
    def batch_size(self) -> int:
        return self.noise.batch_size

    # ------------------------------------------------------------ changes
    def set(self, step: int, lr_time: float, lr: float = 0.0, batch_size: int = 0, ramp: float = 0.0,
            manual: bool = False) -> dict:
        """Change the noise now; returns what changed ({"lr": [effective before, new], ...}).

        manual: the lr is exactly `lr` from now on (the schedule's shape and planned lr changes stop).
        """
        n, changed = self.noise, {}
        if lr:
            before = self.lr(step, lr_time)
            if manual:
                n.manual = True
            start = before if manual else self.base_lr(lr_time)
            if ramp > 0:
                n.ramp_from, n.ramp_to, n.ramp_start, n.ramp_len = start, lr, lr_time, ramp
            else:
                n.ramp_len = 0.0
            n.base_lr = lr
            changed["lr"] = [before, lr]
        if batch_size:
            changed["batch_size"] = [n.batch_size, batch_size]
            n.batch_size = batch_size
        return changed

    def due(self, step: int, lr_time: float) -> list[tuple[int, Change, dict]]:
        """Apply the planned changes due at this step boundary; returns (index, change, what changed).

        After a manual lr, a planned change's lr part is skipped (its batch part still applies).
        """
        out = []
        for i, ch in enumerate(self.cfg.changes):
            if self.noise.applied[i]:
                continue
            if (ch.at_step >= 0 and step >= ch.at_step) or (0 <= ch.at_lr_time <= lr_time + 1e-9):
                self.noise.applied[i] = True
                lr = 0.0 if self.noise.manual else ch.lr
                changed = self.set(step, lr_time, lr, ch.batch_size, ch.ramp)
                if ch.lr and self.noise.manual:
                    changed["skipped"] = "lr (a manual lr overrides the schedule)"
                out.append((i, ch, changed))
        return out

    # ------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        return dict(vars(self.noise))

    def load_state_dict(self, d: dict) -> None:
        self.noise = Noise(**d)
