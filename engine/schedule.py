"""Learning-rate and batch-size schedules, and the LR-normalized clock.

Two learning rates per step s:
  - base lr b_s:   the preset's `lr`, replaced by each change (planned `changes`, or requests from
                   the control file); with `ramp` R it moves linearly to the new value over R
                   LR-normalized steps (the paper ramps lr increases over 100);
  - effective lr:  lr_s = b_s * shape(s), what the optimizer uses; shape is 1 for a constant
                   schedule, else a linear warmup and then a cosine down to final_lr_ratio.
The LR-normalized clock counts the base lr:   lr_time after s steps = sum_{i<s} b_i / lr_ref.
It is the paper's clock (App. A.3): an arm at lr 6e-5 = lr_ref / 10 advances 0.1 per step, so it
"trains for 4800 LR-normalized steps" in 48000 steps, and a change "after 2880 LR-normalized
steps" fires at 60 % of that whatever the schedule's shape. With a constant schedule it is
exactly sum lr_i / lr_ref (App. A.1's sum of eta_i).
The shape runs on one of two clocks (`schedule.clock`):
  steps:    warmup over `warmup_steps` steps, cosine over `steps`;
  lr_time:  warmup over `warmup_lr_time`, cosine over `max_lr_time`. Every arm then has the same
            shape at the same lr_time, so arms compared on lr_time differ only by their base lr.
A manual lr (control file, fork) is exact from then on: shape = 1 and planned lr changes are
skipped; planned batch changes still apply.
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


def reached(lr_time: float, target: float) -> bool:
    """lr_time >= target, forgiving the rounding of a float sum: 28800 steps of 6e-5 / 6e-4 add up to
    2879.99999999x, and a change "at 2880" must fire at step 28800, not one step late."""
    return lr_time >= target - 1e-9 * max(1.0, abs(target))


def advance(x: float, inc: float, k: int) -> float:
    """`x` after `k` float additions of `inc` (x += inc, k times), bit for bit, in O(binades) steps.

    Inside one binade [2^(e-1), 2^e) of x the float grid is evenly spaced, so every addition of the
    same inc moves x by the same multiple d of the spacing (inc rounded to the grid): n of them are
    one exact x + n*d, as long as x stays in the binade. The binade's last steps, a tie in the rounding
    (d alternating), and x below inc are stepped one by one. What the trainer's clock adds step by
    step (lr_time += base / lr_ref) is thus reproduced exactly by plans of any length."""
    while k > 0:
        y = x + inc
        if x < inc or x <= 0.0:
            x, k = y, k - 1
            continue
        d = y - x                               # exact (Sterbenz: y and x within a factor 2)
        top = math.ldexp(1.0, math.frexp(x)[1])  # the binade's end
        n = min(k, int((top - x) / d) - 2)      # additions that surely stay inside the binade
        if n < 2 or (y + inc) - y != d:          # near the binade's end, or a rounding tie: step
            x, k = y, k - 1
            continue
        x, k = x + n * d, k - n                 # n*d is a whole number of grid steps: exact
    return x


def ended(cfg: Config, step: int, lr_time: float) -> bool:
    """The run's end: `steps` taken, or `max_lr_time` reached."""
    return step >= cfg.steps or (cfg.max_lr_time > 0 and reached(lr_time, cfg.max_lr_time))


class Schedule:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.lr_ref = cfg.reference_lr
        self.noise = Noise(base_lr=cfg.lr, batch_size=cfg.batch_size,
                           applied=[False] * len(cfg.changes))

    # ------------------------------------------------------------ the two knobs
    def shape(self, step: int, lr_time: float, base: float) -> float:
        """Warmup/cosine factor of this step (base: this step's base lr, for the lr_time clock)."""
        sc = self.cfg.schedule
        if self.noise.manual:
            return 1.0
        if sc.clock == "lr_time":
            now, warmup, end = lr_time, sc.warmup_lr_time, self.cfg.max_lr_time
            after_step = lr_time + base / self.lr_ref
            span = max(end - warmup, 1e-12)
        else:
            now, warmup, end = step, sc.warmup_steps, self.cfg.steps
            after_step = step + 1
            span = max(1, end - warmup)
        if warmup and now < warmup:
            return min(1.0, after_step / warmup)
        if sc.kind == "cosine":
            t = min(1.0, (now - warmup) / span)
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

    def rates(self, step: int, lr_time: float) -> tuple[float, float]:
        """(effective lr, base lr) of this step; lr_time advances by base / lr_ref."""
        base = self.base_lr(lr_time)
        return base * self.shape(step, lr_time, base), base

    def lr(self, step: int, lr_time: float) -> float:
        return self.rates(step, lr_time)[0]

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

    def _index(self) -> tuple[list, list]:
        """The planned changes by step and by lr_time target, sorted, with a cursor each past those
        applied (built again whenever the noise is replaced, e.g. on resume)."""
        if getattr(self, "_indexed", None) is not self.noise:
            changes, applied = self.cfg.changes, self.noise.applied
            by_step = sorted((ch.at_step, i) for i, ch in enumerate(changes) if ch.at_step >= 0 and not applied[i])
            by_time = sorted((ch.at_lr_time, i) for i, ch in enumerate(changes) if ch.at_lr_time >= 0 and not applied[i])
            self._queues, self._cursors, self._indexed = (by_step, by_time), [0, 0], self.noise
        return self._queues

    def next_events(self) -> tuple[int | None, float | None]:
        """The smallest at_step and at_lr_time among the planned changes not yet applied (None: none)."""
        queues, out = self._index(), []
        for q, c in zip(queues, self._cursors):
            while c < len(q) and self.noise.applied[q[c][1]]:
                c += 1
            out.append(q[c][0] if c < len(q) else None)
        return out[0], out[1]

    def due(self, step: int, lr_time: float) -> list[tuple[int, Change, dict]]:
        """Apply the planned changes due at this step boundary; returns (index, change, what changed).
        After a manual lr, a planned change's lr part is skipped (its batch part still applies).
        Several due at one boundary apply in their order in `changes`. Amortized O(1) a step, whatever
        the number of changes (each is looked at once, by a cursor over the sorted targets)."""
        (by_step, by_time), cursors = self._index(), self._cursors
        fire = []
        while cursors[0] < len(by_step) and step >= by_step[cursors[0]][0]:
            fire.append(by_step[cursors[0]][1])
            cursors[0] += 1
        while cursors[1] < len(by_time) and reached(lr_time, by_time[cursors[1]][0]):
            fire.append(by_time[cursors[1]][1])
            cursors[1] += 1
        out = []
        for i in sorted(set(fire)):
            if self.noise.applied[i]:
                continue
            ch = self.cfg.changes[i]
            self.noise.applied[i] = True
            skip_lr = self.noise.manual and not ch.manual
            lr = 0.0 if skip_lr else ch.lr
            changed = self.set(step, lr_time, lr, ch.batch_size, ch.ramp, manual=ch.manual)
            if ch.lr and skip_lr:
                changed["skipped"] = "lr (a manual lr overrides the schedule)"
            out.append((i, ch, changed))
        return out

    # ------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        return dict(vars(self.noise))

    def load_state_dict(self, d: dict) -> None:
        self.noise = Noise(**d)
