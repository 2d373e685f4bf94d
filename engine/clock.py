"""A run's clocks at a step boundary: the value every record, event, checkpoint and condition reads.

    step      optimizer steps taken
    samples   training samples drawn (images; tokens for a language model: samples × seq_len)
    lr_time   the LR-normalized step: Σ lr_t / lr_ref over the steps taken (the paper's x-axis)

One step advances all three at once (`tick`); `as_dict` is how records spell them.
"""
from __future__ import annotations

from dataclasses import dataclass

KEYS = ("step", "samples", "lr_time")


@dataclass
class Clock:
    step: int = 0
    samples: int = 0
    lr_time: float = 0.0

    def tick(self, samples: int, lr_step: float) -> float:
        """One optimizer step that drew `samples` at lr/lr_ref = `lr_step`; returns lr_time before it."""
        before = self.lr_time
        self.step += 1
        self.samples += samples
        self.lr_time = before + lr_step
        return before

    def as_dict(self) -> dict:
        return {"step": self.step, "samples": self.samples, "lr_time": self.lr_time}

    @classmethod
    def of(cls, d: dict) -> "Clock":
        """The clock a record, event or checkpoint state spells (KeyError names a missing clock)."""
        return cls(d["step"], d["samples"], d["lr_time"])
