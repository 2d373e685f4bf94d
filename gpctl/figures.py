"""Figures the paper's way, with matplotlib (imported here only): PNG or SVG by the file suffix.

- loss vs step (batch experiments) or LR-normalized steps (lr experiments), EMA-smoothed,
  online solid, offline dotted;
- for a run whose noise was dropped at T0, the low-noise curve translated right to best fit it after
  T0 (Fig. 4's dashed line, in the reference's colour), with the fitted shift in the legend;
- TV vs loss (or step) with its baseline (Figs. 7-8).
"""
from __future__ import annotations

from pathlib import Path

from engine.curves import eval_curve, fit_shift, train_curve
from engine.rundir import RunDir
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
                mean: bool = False) -> dict | None:
    """Loss curves of `runs` (train loss with EMA `coef`, or held-out loss with `evals`);
    shift = (changed run, reference run, T0) draws the reference translated to fit it after T0;
    mean: the seeds of one family (gpctl.runs.family) drawn as their mean with a min-max band."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    fit = None

    def curve(rd: RunDir):
        return eval_curve(rd, x) if evals else train_curve(rd, x, coef)

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
    ax.set_ylabel("held-out loss" if evals else f"train loss (EMA {coef})" if coef else "train loss")
    if logy:
        ax.set_yscale("log")
    _finish(plt, fig, ax, out, title, legend_size=8)
    return fit


def tv_figure(rows: list[dict], out: Path, x: str = "loss_a", title: str = "",
              span: tuple[float, float] | None = None) -> None:
    """TV curves: one line per (run_a, run_b) pair of runs, against A's loss (or step).

    span: an x range to shade (the matched-loss range the TV ratios are computed over)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    if span is not None:
        ax.axvspan(*span, color="0.85", zorder=0, label="range the ratios use")
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


def _finish(plt, fig, ax, out: Path, title: str, legend_size: int) -> None:
    ax.set_title(title)
    ax.legend(fontsize=legend_size)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
