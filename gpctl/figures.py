"""Figures the paper's way, with matplotlib (imported here only): PNG or SVG by the file suffix.

`gpctl figure PRESET` draws the paper's panel from the preset's latest runs (panel_data, then
draw_panel; `--json` prints the data itself):
- y: held-out loss, EMA 0.8 over the evals (App. A.1, A.3), and for classifiers the held-out error
  as its own panel; x: steps for batch figures, LR-normalized steps for lr figures (the preset's
  `compares`); online solid, offline dotted with its early-stopping point marked;
- each changed arm against the preset's reference: the reference's curve translated by the fitted
  shift (right for a drop, Fig. 4; left for a raise, Fig. 5), dashed in the reference's colour, or
  "no fit" and why; the fit's residual beside the seed spread where the reference has a baseline.
  Fits use the raw held-out points (an EMA over evals lags by evals, not by steps);
- `--tv FILE`: TV at matched loss against steps (or LR-normalized steps) with the seed baseline and
  T0 marked (Figs. 7, 8).
`gpctl plot` draws any runs (train loss by default; --eval held-out, --error held-out error).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.analysis.curves import (change_point, early_stop, fit_change, fit_shift, held_out_curve, rms_gap, train_curve,
                                   translated_curve)
from engine.store.rundir import RunDir
from gpctl.runs import family

LABELS = {"step": "steps", "samples": "samples", "lr_time": "LR-normalized steps", "wall": "seconds"}


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def seed_band(curves: list[tuple]) -> tuple:
    """(x, min, mean, max) of several seeds' curves, on the x values they all reach (the others
    interpolated onto the first's)."""
    import numpy as np
    end = min(float(c[0][-1]) for c in curves if len(c[0]))
    xs = np.asarray(curves[0][0], dtype=float)
    xs = xs[xs <= end]
    ys = np.stack([np.interp(xs, np.asarray(cx, dtype=float), np.asarray(cy, dtype=float)) for cx, cy in curves])
    return xs, ys.min(axis=0), ys.mean(axis=0), ys.max(axis=0)


def loss_figure(runs: list[RunDir], out: Path, x: str = "step", coef: float = 0.8, title: str = "",
                shift: tuple[RunDir, RunDir, float] | None = None, logy: bool = False,
                evals: bool = False, taus: tuple[float, float] | None = None, settle: float = 0.0,
                mean: bool = False, field: str = "eval_loss") -> dict | None:
    """Loss curves of `runs` (train loss with EMA `coef`, or held-out `field` with `evals`, EMA'd
    over the evals the same way); shift = (changed run, reference run, T0) draws the reference
    translated to fit it after T0; mean: the seeds of one family (gpctl.runs.family) drawn as their
    mean with a min-max band."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    fit = None

    def curve(rd: RunDir):
        return held_out_curve(rd, x, coef, field) if evals else train_curve(rd, x, coef)

    colors = {}
    families: dict[str, list[RunDir]] = {}
    for rd in runs:
        cfg = rd.config()
        key = family(cfg.name, cfg.group) if mean else rd.id
        families.setdefault(key, []).append(rd)
    for key, members in families.items():
        cfg = members[0].config()
        ls = ":" if cfg.data.mode == "offline" else "-"
        if len(members) == 1:
            xs, ys = curve(members[0])
            (line,) = ax.plot(xs, ys, ls=ls, lw=1.4, label=f"{cfg.name}")
        else:                  # seeds of one family: their mean, and the band from min to max
            xs, lo, mid, hi = seed_band([curve(rd) for rd in members])
            (line,) = ax.plot(xs, mid, ls=ls, lw=1.4, label=f"{key} (mean of {len(members)} seeds)")
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
        for rd in members:
            colors[rd.id] = line.get_color()
    if shift:
        drop, ref, t0 = shift
        xd, yd = curve(drop)
        xr, yr = curve(ref)
        fit = fit_shift(xd, yd, xr, yr, t0, settle=settle, taus=taus)
        ax.plot(xr + fit["tau"], yr, "--", color=colors.get(ref.id, "tab:red"), lw=1.2,
                label=f"{ref.config().name} shifted by {fit['tau']:.0f}")
        ax.axvline(t0, color="grey", lw=0.8, ls="-.")
    ax.set_xlabel(LABELS[x])
    what = ("held-out error" if field == "eval_error" else "held-out loss") if evals else "train loss"
    ax.set_ylabel(f"{what} (EMA {coef:g})" if coef else what)
    if logy:
        ax.set_yscale("log")
    _finish(plt, fig, ax, out, title, legend_size=8)
    return fit


def tv_figure(rows: list[dict], out: Path, x: str = "loss_a", title: str = "",
              span: tuple[float, float] | None = None, t0: float | None = None) -> None:
    """TV curves: one line per (run_a, run_b) pair of runs, against A's loss, step or lr_time.

    span: an x range to shade (the matched-loss range the TV ratios are computed over); t0: the
    noise change, marked."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    if span is not None:
        ax.axvspan(*span, color="0.85", zorder=0, label="range the ratios use")
    if t0 is not None:
        ax.axvline(t0, color="grey", lw=0.8, ls="-.", label=f"T0 = {t0:g}")
    curves: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        curves.setdefault((r["run_a"], r["run_b"]), []).append(r)
    for (a, b), rs in curves.items():
        rs = sorted(rs, key=lambda r: r[x])
        style = "o-" if len(rs) <= 30 else "o"   # many noisy checkpoints: points, not a zigzag
        ax.plot([r[x] for r in rs], [r["tv"] for r in rs], style, ms=3, label=f"{a} vs {b}")
    ax.set_xlabel({"loss_a": "held-out loss (of A)", "step_a": "steps (of A)",
                   "lr_time_a": "LR-normalized steps (of A)"}.get(x, x))
    ax.set_ylabel("average TV distance")
    if x == "loss_a":
        ax.invert_xaxis()  # training goes left to right: loss decreases
    _finish(plt, fig, ax, out, title, legend_size=7)


# ------------------------------------------------------------------ the paper's panels

def panel_data(arms: dict[str, RunDir], contract, x: str, coef: float = 0.8, train: bool = False) -> dict:
    """The numbers behind a preset's panel (what `gpctl figure --json` prints): each arm's curve,
    offline arms' early-stopping points, and each changed arm's fit against the reference."""
    def curve(rd: RunDir, field: str = "eval_loss"):
        return train_curve(rd, x, coef) if train and field == "eval_loss" else held_out_curve(rd, x, coef, field)

    out = {"x": x, "coef": coef, "y": f"{'train' if train else 'held-out'} loss (EMA {coef:g})" if coef else
           f"{'train' if train else 'held-out'} loss", "curves": [], "error_curves": [], "fits": []}
    for arm, rd in arms.items():
        cfg = rd.config()
        xs, ys = curve(rd)
        item = {"arm": arm, "run": rd.id, "mode": cfg.data.mode, "x": xs.tolist(), "y": ys.tolist()}
        if cfg.data.mode == "offline":
            item["early_stop"] = early_stop(xs, ys)
        out["curves"].append(item)
        if not cfg.is_lm:
            ex, ey = curve(rd, "eval_error")
            if len(ey):
                out["error_curves"].append({"arm": arm, "run": rd.id, "mode": cfg.data.mode,
                                            "x": ex.tolist(), "y": ey.tolist()})
    ref_arm = contract.reference if contract and contract.declared else ""
    ref = arms.get(ref_arm)
    if ref is None:
        return out
    # fits use the raw held-out points: an EMA over evals lags by a number of evals, which differs
    # between arms evaluated at different cadences on the x-axis (lr arms on lr_time)
    raw = (lambda rd: train_curve(rd, x, 0.0)) if train else (lambda rd: held_out_curve(rd, x, 0.0))
    xr, yr = raw(ref)
    seeds = [arms[a] for a, of in contract.baselines.items() if of == ref_arm and a in arms]
    for arm, rd in arms.items():
        cfg = rd.config()
        if arm == ref_arm or arm in contract.baselines or not cfg.changes:
            continue
        xd, yd = raw(rd)
        t0 = change_point(rd, x)
        fit = fit_change((xd, yd), (xr, yr), t0, contract.direction or "drop")
        fit.update(arm=arm, ref=ref_arm, direction=contract.direction or "drop", t0=t0)
        if fit["ok"] and not train:
            # the reference translated, smoothed as this arm's curve is (what the figure draws dashed)
            tx, ty = translated_curve(rd, (xr, yr), fit["tau"], t0, x, coef)
            fit["translated"] = {"x": tx.tolist(), "y": ty.tolist()}
        if seeds and fit["ok"]:
            # the seed spread over the same window: how far the reference's own seed is from it
            xs_, ys_ = raw(seeds[0])
            win = xs_ > (t0 or 0)
            fit["seed_spread"] = rms_gap(xs_[win], ys_[win], xr, yr)
        out["fits"].append(fit)
    return out


def fit_sentence(fit: dict, x: str) -> str:
    if not fit["ok"]:
        return f"{fit['arm']}: {fit['why']}"
    side = "right" if fit["tau"] >= 0 else "left"
    line = (f"{fit['arm']}: after T0 = {fit['t0']:g} it follows {fit['ref']} shifted {side} by "
            f"{abs(fit['tau']):.1f} {x} (fit residual {fit['residual']:.4f}; gap before T0 {fit['gap_before']:.4f}")
    spread = fit.get("seed_spread")
    if spread is not None and np.isfinite(spread):
        rel = "within it" if fit["residual"] <= spread else f"{fit['residual'] / spread:.1f}x it"
        line += f"; seed spread {spread:.4f}: {rel}"
    return line + ")"


def draw_panel(data: dict, out: Path, title: str = "") -> None:
    """The loss panel (and the error panel beside it for classifiers) from panel_data."""
    plt = _plt()
    two = bool(data["error_curves"])
    fig, axes = plt.subplots(1, 2 if two else 1, figsize=(11.5 if two else 6.4, 4.2), dpi=120, squeeze=False)
    ax = axes[0][0]
    colors = {}
    for c in data["curves"]:
        ls = ":" if c["mode"] == "offline" else "-"
        (line,) = ax.plot(c["x"], c["y"], ls=ls, lw=1.4, label=c["arm"] + (" (offline)" if c["mode"] == "offline" else ""))
        colors[c["arm"]] = line.get_color()
        if c.get("early_stop"):
            ex, ey = c["early_stop"]
            ax.plot([ex], [ey], marker="v", ms=7, color=line.get_color(), ls="none",
                    label=f"{c['arm']} early-stopped: {ey:.3f} at {ex:g}")
    by_arm = {c["arm"]: c for c in data["curves"]}
    for fit in data["fits"]:
        if not fit["ok"]:
            continue
        ref = by_arm[fit["ref"]]
        side = f"{fit['ref']} shifted {'right' if fit['tau'] >= 0 else 'left'} by {abs(fit['tau']):.0f}"
        if fit.get("translated"):     # smoothed as the arm is: it lies on the arm's curve where the fit holds
            ax.plot(fit["translated"]["x"], fit["translated"]["y"], "--", color=colors.get(fit["ref"], "tab:red"),
                    lw=1.2, label=f"{side} (smoothed as {fit['arm']})")
        else:
            ax.plot(np.asarray(ref["x"]) + fit["tau"], ref["y"], "--", color=colors.get(fit["ref"], "tab:red"), lw=1.2,
                    label=side)
        ax.axvline(fit["t0"], color="grey", lw=0.8, ls="-.")
    ax.set_xlabel(LABELS[data["x"]])
    ax.set_ylabel(data["y"])
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    if two:
        ax2 = axes[0][1]
        for c in data["error_curves"]:
            ax2.plot(c["x"], c["y"], ls=":" if c["mode"] == "offline" else "-", lw=1.4, color=colors.get(c["arm"]),
                     label=c["arm"])
        ax2.set_xlabel(LABELS[data["x"]])
        ax2.set_ylabel(f"held-out error (EMA {data['coef']:g})" if data["coef"] else "held-out error")
        ax2.legend(fontsize=7)
        ax2.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, out)
    plt.close(fig)


def _save(fig, out) -> None:
    """Write the figure to `out`, or to each of several paths (one PNG and one SVG: gpctl report)."""
    for path in out if isinstance(out, (list, tuple)) else [out]:
        fig.savefig(path, **({"metadata": {"Date": None}} if str(path).lower().endswith(".svg") else {}))


def _finish(plt, fig, ax, out: Path, title: str, legend_size: int) -> None:
    ax.set_title(title)
    ax.legend(fontsize=legend_size)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, out)
    plt.close(fig)
