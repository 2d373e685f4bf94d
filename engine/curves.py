"""Loss curves as the paper draws them: EMA smoothing and the right-translation fit of Fig. 4.

Plain numpy; used by gpctl's figures, the TUI and the reproduction checks.
"""
from __future__ import annotations

import numpy as np

from engine.rundir import RunDir

AXES = ("step", "samples", "lr_time", "wall")


def ema(values: np.ndarray, coef: float, start: float | None = None) -> np.ndarray:
    """s_t = coef * s_{t-1} + (1 - coef) * x_t, started at x_0 (the paper: coef 0.8 for CIFAR), or
    continued from `start` (the last value of an earlier call, to extend a smoothed series)."""
    out = []
    s = start
    for v in np.asarray(values, dtype=float).tolist():   # Python floats: ~10x faster than numpy scalars
        s = v if s is None else coef * s + (1 - coef) * v
        out.append(s)
    return np.asarray(out, dtype=float)


def train_curve(rd: RunDir, x: str = "step", coef: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    recs = [r for r in rd.metrics()[0] if "loss" in r]
    xs = np.array([r[x] for r in recs], dtype=float)
    ys = np.array([r["loss"] for r in recs], dtype=float)
    return xs, (ema(ys, coef) if coef else ys)


def eval_curve(rd: RunDir, x: str = "step") -> tuple[np.ndarray, np.ndarray]:
    recs = [r for r in rd.metrics()[0] if "eval_loss" in r]
    return np.array([r[x] for r in recs], dtype=float), np.array([r["eval_loss"] for r in recs], dtype=float)


def fit_shift(x_drop: np.ndarray, y_drop: np.ndarray, x_ref: np.ndarray, y_ref: np.ndarray,
              t0: float, settle: float = 0.0, grid: int = 400, taus: tuple[float, float] | None = None) -> dict:
    """The translation tau for which y_ref(x - tau) best fits the changed run after t0 + settle.

    tau is searched over `taus` (default 0..t0: a dropped run follows the low-noise curve shifted
    right; a raised run follows the high-noise curve shifted left, tau < 0). Returns tau, the fit's
    RMS residual, and the RMS gap between the two curves before t0 (the scale to judge the residual
    against; NaN if the changed run has no points before t0, e.g. a fork).
    """
    after = x_drop > t0 + settle
    xa, ya = x_drop[after], y_drop[after]
    best = (np.inf, 0.0)
    lo, hi = taus if taus is not None else (0.0, max(t0, 1e-9))
    for tau in np.linspace(lo, hi, grid):
        shifted = xa - tau
        ok = (shifted >= x_ref[0]) & (shifted <= x_ref[-1])
        if ok.sum() < max(3, len(xa) // 4):
            continue
        r = np.sqrt(np.mean((ya[ok] - np.interp(shifted[ok], x_ref, y_ref)) ** 2))
        if r < best[0]:
            best = (r, tau)
    return {"tau": float(best[1]), "residual": float(best[0]),
            "gap_before": rms_gap(x_drop[x_drop <= t0], y_drop[x_drop <= t0], x_ref, y_ref)}


def rms_gap(xa: np.ndarray, ya: np.ndarray, xb: np.ndarray, yb: np.ndarray) -> float:
    """RMS of a - b over A's points inside B's x range (B interpolated); NaN if none."""
    common = (xa >= xb[0]) & (xa <= xb[-1]) if len(xb) else np.zeros(len(xa), bool)
    if not common.any():
        return float("nan")
    return float(np.sqrt(np.mean((ya[common] - np.interp(xa[common], xb, yb)) ** 2)))
