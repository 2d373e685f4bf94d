"""Loss curves as the paper draws them: EMA smoothing, early stopping, and the translation fit of
Figs. 4 and 5.

Plain numpy; used by gpctl's figures, the TUI and the reproduction checks.

The paper's panels show held-out loss ("true" loss; early-stopped for offline runs), smoothed with
an EMA of coefficient 0.8 (App. A.1, A.3), against steps for batch figures and LR-normalized steps
for lr figures. held_out_curve() is that curve for one run; early_stop() the point an early-stopped
offline run would return; fit_change() the translation of the reference's curve that best fits a
changed run after T0 (right for a drop, left for a raise), or why there is none.
"""
from __future__ import annotations

import numpy as np

from engine.store.rundir import RunDir, is_change

AXES = ("step", "samples", "lr_time", "wall")


def ema(values: np.ndarray, coef: float, start: float | None = None, at: np.ndarray | None = None,
        unit: float = 0.0) -> np.ndarray:
    """s_t = coef * s_{t-1} + (1 - coef) * x_t, started at x_0 (the paper: coef 0.8 for CIFAR), or
    continued from `start` (the last value of an earlier call, to extend a smoothed series).

    at, unit: the points' positions (steps) and the spacing one coefficient stands for (the run's
    eval_every): a point d steps after the last weighs as d / unit points do, coef ** (d / unit),
    so evaluations added between the scheduled ones (near a loss level) leave the curve as it was."""
    out = []
    s = start
    vals = np.asarray(values, dtype=float).tolist()      # Python floats: ~10x faster than numpy scalars
    pos = np.asarray(at, dtype=float).tolist() if at is not None and unit > 0 else None
    for i, v in enumerate(vals):
        if s is None:
            s = v
        else:
            a = coef if pos is None else coef ** (max(pos[i] - pos[i - 1], 0.0) / unit)
            s = a * s + (1 - a) * v
        out.append(s)
    return np.asarray(out, dtype=float)


def train_curve(rd: RunDir, x: str = "step", coef: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    recs = rd.train_records()
    xs = np.array([r[x] for r in recs], dtype=float)
    ys = np.array([r["loss"] for r in recs], dtype=float)
    return xs, (ema(ys, coef) if coef else ys)


def eval_curve(rd: RunDir, x: str = "step", field: str = "eval_loss") -> tuple[np.ndarray, np.ndarray]:
    recs = [r for r in rd.metrics()[0] if isinstance(r.get(field), (int, float))]
    return np.array([r[x] for r in recs], dtype=float), np.array([r[field] for r in recs], dtype=float)


def held_out_curve(rd: RunDir, x: str = "step", coef: float = 0.8,
                   field: str = "eval_loss") -> tuple[np.ndarray, np.ndarray]:
    """The paper's curve: held-out loss (or error) at each eval, EMA-smoothed over the evals, one
    coefficient per `eval_every` steps (extra evals near loss levels do not sharpen it)."""
    xs, ys = eval_curve(rd, x, field)
    if not coef or not len(ys):
        return xs, ys
    steps = xs if x == "step" else eval_curve(rd, "step", field)[0]
    try:
        unit = float(rd.config().eval_every)
    except Exception:   # noqa: BLE001 - an unreadable config: smooth evenly, as before
        unit = 0.0
    return xs, ema(ys, coef, at=steps, unit=unit)


def translated_curve(rd: RunDir, ref_raw: tuple, tau: float, t0: float, x: str = "step",
                     coef: float = 0.8) -> tuple[np.ndarray, np.ndarray]:
    """What `rd`'s smoothed held-out curve would be if, after T0, its raw points were the reference's
    raw curve translated by tau: rd's own points up to T0, the translated reference at rd's eval
    positions after it (where the reference reaches), smoothed exactly as held_out_curve smooths rd.
    Drawn beside rd's curve, the two coincide where the fit is good: a figure compares like with like
    (an EMA over a run's evals carries its pre-T0 losses for a while; the reference's own EMA does not).
    Returns the part after T0."""
    xs, ys = eval_curve(rd, x)
    if not len(xs):
        return xs, ys
    xr, yr = (np.asarray(v, dtype=float) for v in ref_raw)
    after = xs > t0
    inside = (xs - tau >= xr[0]) & (xs - tau <= xr[-1]) if len(xr) else np.zeros_like(after)
    keep = ~after | inside
    xs, ys, after = xs[keep], ys[keep].copy(), after[keep]
    ys[after] = np.interp(xs[after] - tau, xr, yr)
    if coef:
        steps = xs if x == "step" else eval_curve(rd, "step")[0][keep]
        try:
            unit = float(rd.config().eval_every)
        except Exception:   # noqa: BLE001 - an unreadable config: smooth evenly, as held_out_curve does
            unit = 0.0
        ys = ema(ys, coef, at=steps, unit=unit)
    return xs[after], ys[after]


def early_stop(xs: np.ndarray, ys: np.ndarray) -> tuple[float, float] | None:
    """(x, loss) where the curve is lowest: what an early-stopped run returns (None if empty)."""
    if not len(ys):
        return None
    i = int(np.argmin(ys))
    return float(xs[i]), float(ys[i])


def first_change(rd: RunDir, x: str = "step") -> dict | None:
    """The event of the run's first noise change (a planned change, a request or a fork) that has a
    position on x, or None."""
    for e in rd.events()[0]:
        if is_change(e) and isinstance(e.get(x, e.get("step")), (int, float)):
            return e
    return None


def change_point(rd: RunDir, x: str = "step") -> float | None:
    """Where the run's first noise change took effect, on x."""
    e = first_change(rd, x)
    return None if e is None else float(e.get(x, e.get("step")))


def fit_change(changed: tuple[np.ndarray, np.ndarray], ref: tuple[np.ndarray, np.ndarray], t0: float | None,
               direction: str = "drop", settle: float = 0.0) -> dict:
    """fit_shift with the search on the figure's side: a dropped run follows the low-noise curve
    shifted right (0 <= tau <= t0), a raised run the high-noise curve shifted left (tau <= 0, as far
    as the reference reaches). `ok` False comes with `why` ("no fit: ...")."""
    (xd, yd), (xr, yr) = changed, ref
    if t0 is None:
        return {"ok": False, "why": "no fit: the run's noise change never took effect", "tau": None}
    after = int(np.sum(xd > t0 + settle))
    if after < 3:
        return {"ok": False, "why": f"no fit: {after} held-out points after T0 = {t0:g} (3 needed)", "tau": None}
    if len(xr) < 3:
        return {"ok": False, "why": f"no fit: the reference has {len(xr)} held-out points (3 needed)", "tau": None}
    taus = (0.0, max(t0, 1e-9)) if direction != "raise" else (-max(float(xr[-1]) - t0, 1e-9), 0.0)
    fit = fit_shift(xd, yd, xr, yr, t0, settle=settle, taus=taus)
    if not np.isfinite(fit["residual"]):
        return {"ok": False, "why": "no fit: no shift leaves enough of the changed run inside the reference's range",
                "tau": None}
    return {"ok": True, "why": "", "t0": t0, **fit}


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


def figure_axis(p, x: str | None) -> str:
    """A preset's figure axis: `x` if given; else lr_time for lr figures (the preset's `compares`; or
    arms whose lrs differ by more than a relative 1e-6 where a preset declares nothing), else step."""
    from engine.config import ConfigError
    if x is not None:
        x = x.replace("-", "_")
        if x not in AXES:
            raise ConfigError(f"--x must be one of {', '.join(AXES)}, got {x!r}")
        return x
    if p.contract.declared:
        return "lr_time" if "lr" in p.contract.compares else "step"
    cfgs = p.configs(check=False)
    lrs = sorted({c.lr for c in cfgs} | {ch.lr for c in cfgs for ch in c.changes if ch.lr})
    return "lr_time" if lrs and lrs[-1] > lrs[0] * (1 + 1e-6) else "step"

