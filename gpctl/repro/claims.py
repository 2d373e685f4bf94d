"""What `gpctl repro` decides with: the thresholds (fixed before the recorded run), the rules'
constants, and a Claim with its negative control and the one verdict rule."""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.store.rundir import RunDir

# Fixed before the recorded run (docs/REPRODUCTION.md); a failed claim is reported, never tuned away.
THRESHOLDS = {
    "online_gap": 0.05,      # claim 1, online: high-noise minus low-noise held-out loss, mean over the last 30%, above this
                             # (2.5x the two-seed gap measured on the calibration seeds, 0.021); control: |seed gap| above it
    "offline_gap": 0.0,      # claim 1, offline: low-noise minus high-noise best (early-stopped) held-out loss, above this
    "offline_track": 0.03,   # claim 1, offline: mean |offline - online| held-out loss over the first 20% of steps, at most
    "snap_residual": 0.25,   # claim 2: RMS residual of the translated fit, at most this fraction of the gap before T0
    "live_equal": 1e-4,      # determinism: scheduled vs live drop, largest difference of the loss after T0
    "tv_close": 1.3,         # claim 3: TV(dropped, low) / TV(low seed 2, low) at matched loss, at most
    "tv_apart": 1.5,         # claim 3: TV(high, low) / TV(low seed 2, low) at matched loss, at least
    "tv_min_levels": 10,     # claim 3: loss levels a ratio (and its control) needs, shared with the baseline
    "lm_online_gap": 0.1,    # claim 1 on the language model (repro_lm): high minus low noise held-out loss, last 30%
                             # (calibration seed 0: gap 0.47, two-seed gap 0.004)
}
EMA = 0.8           # rule 1: every held-out curve is smoothed with the paper's EMA (App. A.1) before a fit or comparison
LAST = 0.3          # "the last part of training": the last 30% of the x-axis
FIRST = 0.2         # "at first": the first 20% of the steps (offline tracks online)
SETTLE = 25         # steps after T0 left out of the translation fits (one eval interval)
TV_AFTER = 100      # dropped-run checkpoints count for TV from T0 + this many steps
CALIBRATION_SEEDS = (0, 1)   # the seeds (low/high..., low_seed2) the task and thresholds were calibrated on



@dataclass
class Claim:
    """A check and its negative control: the claim holds only if the check passes and the control fails."""
    name: str
    measured: dict
    rule: str
    passed: bool | None      # None: reported, not checked at this size
    note: str = ""
    control: str = ""        # what the control applies the same rule to
    control_measured: dict = field(default_factory=dict)
    control_passed: bool | None = None
    enough: bool = True      # False: too little to measure (the check and its control are not judged)
    why_not: str = ""        # what was too little

    @property
    def label(self) -> str:
        """The one rule: holds (check passes, control fails), not shown (both pass, or too little to
        measure), does not hold (check fails), reported (not checked at this size)."""
        if self.passed is None:
            return "reported"
        if not self.enough or (self.passed and self.control_passed):
            return "not shown"
        return "holds" if self.passed else "does not hold"

    @property
    def verdict(self) -> bool | None:
        """True: holds; False: does not hold; None: not shown, or only reported."""
        return {"holds": True, "does not hold": False}.get(self.label)


@dataclass
class Report:
    preset: str
    seed: int = 0
    runs: dict[str, RunDir] = field(default_factory=dict)
    claims: list[Claim] = field(default_factory=list)
    figures: list[tuple[str, str]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
