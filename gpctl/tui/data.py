"""What the TUI shows, read through the engine's run-directory API, incrementally.

A RunTail keeps the byte offsets of a run's metrics and events and grows numpy arrays with only
the new records, so a long run is never re-read. The table needs only summaries (a file's tail),
so start-up does not parse every record of every run: a run's full series is loaded when it is
first plotted. Smoothed series are cached per EMA coefficient and extended with new points only.
Every numeric field of a record is kept (lr, batch_size, eval_error, grad_norm, …: the small plots
beside the loss can show any of them); a field that appears later is NaN before it.
"""
from __future__ import annotations

import numpy as np

from engine.analysis.curves import ema
from engine.control import changed_text
from engine.store.rundir import RunDir

FIELDS = ("step", "samples", "lr_time", "wall", "loss")
EVAL_FIELDS = ("step", "samples", "lr_time", "wall", "eval_loss")
MARK_EVENTS = ("schedule", "control", "fork", "resume")
MAX_FIELDS = 32            # per kind of record: a hostile file with thousands of keys costs no more


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class RunTail:
    def __init__(self, rd: RunDir):
        self.rd = rd
        self.offset = self.ev_offset = 0
        self._train = {k: [] for k in FIELDS}
        self._eval = {k: [] for k in EVAL_FIELDS}
        self.events: list[dict] = []
        self._arrays: dict | None = None
        self._ema: dict[float, np.ndarray] = {}

    def poll(self) -> bool:
        """Read what was appended since the last poll; True if anything was."""
        if self.offset and self.rd.metrics_size() < self.offset:   # a resume dropped records: re-read
            self.__init__(self.rd)
        recs, self.offset = self.rd.metrics(self.offset)
        evs, self.ev_offset = self.rd.events(self.ev_offset)
        for r in recs:
            part = self._train if "loss" in r else self._eval if "eval_loss" in r else None
            if part is None:
                continue
            if not r.keys() <= part.keys():       # a field not seen before: NaN for the records before it
                n = len(part["step"])
                for k, v in r.items():            # (names a plot can show; at most MAX_FIELDS of them)
                    if k not in part and _number(v) and k.isidentifier() and len(k) < 64 and len(part) < MAX_FIELDS:
                        part[k] = [np.nan] * n
            for k, col in part.items():
                v = r.get(k, np.nan)
                col.append(v if _number(v) else np.nan)
        self.events += evs
        if recs or evs:
            self._arrays = None
        return bool(recs or evs)

    def arrays(self) -> dict:
        if self._arrays is None:
            self._arrays = {"train": {k: np.asarray(v, dtype=float) for k, v in self._train.items()},
                            "eval": {k: np.asarray(v, dtype=float) for k, v in self._eval.items()}}
        return self._arrays

    def series(self, x: str, coef: float, evals: bool = False) -> tuple[np.ndarray, np.ndarray]:
        a = self.arrays()["eval" if evals else "train"]
        y = a["eval_loss" if evals else "loss"]
        return a[x], (self._smoothed(coef) if coef and not evals and len(y) else y)

    def fields(self) -> list[str]:
        """The numeric fields recorded besides the x-axes (lr, batch_size, eval_error, …)."""
        axes = set(FIELDS) - {"loss"}
        return sorted((set(self._train) | set(self._eval)) - axes)

    def field_series(self, x: str, field: str) -> tuple[np.ndarray, np.ndarray]:
        """One recorded field against an x-axis: from the train records, or the eval records (eval_error);
        empty where the run has not recorded it."""
        for part in ("train", "eval"):
            a = self.arrays()[part]
            if field in a and x in a:
                return a[x], a[field]
        return np.zeros(0), np.zeros(0)

    def _smoothed(self, coef: float) -> np.ndarray:
        loss = self._train["loss"]
        old = self._ema.get(coef)
        done = 0 if old is None else len(old)
        if done < len(loss):
            new = ema(np.asarray(loss[done:], dtype=float), coef, start=None if old is None else old[-1])
            self._ema[coef] = new if old is None else np.concatenate([old, new])
        return self._ema[coef]

    def markers(self, x: str) -> list[tuple[float, str]]:
        """Where noise changes (planned, by control request, fork, resume) took effect, each with what
        changed: "batch 32→512 @ 30", "lr 0.05→0.005 @ 120", "fork @ 100"."""
        out = []
        for e in self.events:
            if e.get("event") in MARK_EVENTS and e.get("status", "applied") == "applied" and x in e:
                label = changed_text(e.get("changed"), digits=3, arrow="→") or str(e.get("action") or e["event"])
                at = e[x]
                out.append((float(at), f"{label} @ {at:.6g}" if isinstance(at, (int, float)) else label))
        return out
