"""Checkpoints at matched losses: a run checkpoints when its held-out loss first reaches each level.

The paper compares models "at matched loss" (Figs. 7, 8). Checkpoints every N steps fall at whatever
losses each run had then, so a low-noise run and a high-noise one rarely share one. With
`checkpoint_at_losses = [2.0, 1.8, ...]` (nats, held-out) every run of a family checkpoints where its
held-out loss first reaches each level, so their checkpoints sit at the same losses.

    levels = LossLevels(cfg.checkpoint_at_losses, cfg.checkpoint_loss_tol, cfg.eval_every)
    levels.eval_due(step)        -> evaluate at this step (the cadence tightens near a level)
    levels.crossed(step, loss)   -> the levels this eval reached, each with its gap

A level is reached between two consecutive evals, the earlier above it and this one at or below it;
levels the run was already below when it started (a fork, a resumed run without this key) are not
crossed. The held-out set is fixed, so its loss has no sampling noise: the raw eval loss is used.

Cadence: from the fastest fall of the loss between the last few evals, doubled (d nats per step),
once the next scheduled eval could pass the level by more than tol x level, the next eval comes
after floor(room / d) steps (at least 1, at most eval_every), room being what is left to the level:
each eval halves the rest, a level costs a few evals (about log2 of room over one step's fall), and
the eval that reaches it lands less than one step's fall past it when the loss falls steadily. A
crossing further away (a jump, a first eval already past several levels) is still checkpointed and
recorded with its gap: `gpctl tv --match-loss` drops pairs beyond its tolerance rather than hide them.
"""
from __future__ import annotations

import math

MATCH_MAX_GAP = 0.02   # `gpctl tv --match-loss`: a pair is kept when its losses differ by at most 2 % of B's


SAFETY = 2.0   # the cadence assumes the loss may fall this many times faster than it last did


class LossLevels:
    def __init__(self, levels: list[float], tol: float, eval_every: int):
        self.levels = sorted({float(v) for v in levels}, reverse=True)   # falling: highest first
        self.tol, self.eval_every = tol, eval_every
        self.taken: list[float] = []
        self.prev: tuple[int, float] | None = None      # (step, eval loss) of the eval before the last
        self.last: tuple[int, float] | None = None      # (step, eval loss) of the last eval
        self.next_eval: int | None = None                # step of the next eval this class asks for
        self.falls: list[float] = []                     # nats per step between the last few evals

    @property
    def active(self) -> bool:
        return bool(self.levels)

    def pending(self) -> list[float]:
        """Levels not yet reached, highest first."""
        return [v for v in self.levels if v not in self.taken]

    def eval_due(self, step: int) -> bool:
        return self.next_eval is not None and step >= self.next_eval

    def crossed(self, step: int, loss: float) -> list[dict]:
        """Record an eval; return the levels it reached: [{"level", "eval_loss", "gap", "within"}]."""
        out = []
        if math.isfinite(loss) and self.last is not None:
            above = self.last[1]
            for v in self.pending():
                if above > v >= loss:
                    gap = loss - v
                    out.append({"level": v, "eval_loss": loss, "gap": gap,
                                "within": abs(gap) <= self.tol * v + 1e-12})
                    self.taken.append(v)
        if math.isfinite(loss):
            if self.last is not None and step > self.last[0]:
                self.falls = (self.falls + [(self.last[1] - loss) / (step - self.last[0])])[-3:]
            self.prev, self.last = self.last, (step, loss)
        self.next_eval = self._plan(step)
        return out

    def _plan(self, step: int) -> int | None:
        """The step of the next eval this class needs (None: the run's own cadence is enough)."""
        if self.last is None:
            return None
        below = [v for v in self.pending() if v < self.last[1]]
        if not below:
            return None
        level = below[0]
        every = self.eval_every or 10**9
        if not self.falls:
            return step + 1                       # one more eval to learn how fast the loss falls
        fall = SAFETY * max(self.falls)           # nats per step, erring fast: a noisy fall is uneven
        if fall <= 0:
            return step + max(1, min(every, 10))  # rising or flat: look again soon, not every step
        room = self.last[1] - level               # nats left to the level
        band = self.tol * level                   # how far past the level an eval may land
        if room - fall * every > band:
            return None                           # the next scheduled eval is still well above it
        # aim at half the time the loss would take at its fastest (doubled) recent fall: each eval
        # halves what is left, and the last step before the crossing moves less than one step's fall
        return step + max(1, min(every, int(room / fall)))

    def state_dict(self) -> dict:
        return {"taken": list(self.taken), "prev": self.prev, "last": self.last, "next_eval": self.next_eval,
                "falls": list(self.falls)}

    def load_state_dict(self, d: dict | None) -> None:
        d = d or {}
        self.taken = [float(v) for v in d.get("taken", [])]
        self.prev = tuple(d["prev"]) if d.get("prev") else None
        self.last = tuple(d["last"]) if d.get("last") else None
        self.next_eval = d.get("next_eval")
        self.falls = [float(v) for v in d.get("falls", [])]
