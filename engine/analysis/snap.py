"""The snap: after a noise change, has the run's held-out curve become its reference arm's, translated?

The paper's claim (Figs. 3–5): lower the noise at T0 and the loss snaps onto the low-noise curve
shifted right; raise it and it joins the high-noise curve shifted left. `snap()` fits the changed
run's raw held-out points after T0 as a translation of the reference's (engine/analysis/curves.py
fit_change, the figures' fit), and judges the fit's RMS residual against the RMS gap between the two
curves before T0: it snapped when residual / gap <= THRESHOLD (gpctl repro's rule). The negative
control is a never-changed run that started with the same noise: it must *not* fit (its ratio above
the threshold); when it fits as well, the snap is not shown at this size. `at` is the first held-out
point after T0 from which every later point is within THRESHOLD × gap of the translated reference.
"""
from __future__ import annotations

import math

import numpy as np

from engine.analysis.curves import change_point, first_change, fit_change, held_out_curve, rms_gap
from engine.store.rundir import RunDir

THRESHOLD = 0.25


def direction(rd: RunDir, x: str = "step") -> str | None:
    """"drop" or "raise" from the run's first noise change (curves.first_change, the event T0 comes
    from): a larger batch or a smaller lr lowers the noise. None when it changed neither."""
    e = first_change(rd, x)
    ch = e.get("changed") if e is not None and isinstance(e.get("changed"), dict) else {}
    for key, lower in (("batch_size", lambda a, b: b > a), ("lr", lambda a, b: b < a)):
        v = ch.get(key)
        if isinstance(v, list) and len(v) == 2 and v[0] != v[1]:
            return "drop" if lower(v[0], v[1]) else "raise"
    return None


def _fit(curve: tuple, ref: tuple, t0: float, way: str) -> dict:
    fit = fit_change(curve, ref, t0, way)
    if fit["ok"]:
        gap = fit["gap_before"]
        fit["ratio"] = fit["residual"] / gap if gap and math.isfinite(gap) and gap > 0 else float("nan")
    return fit


def _since(curve: tuple, ref: tuple, t0: float, tau: float, gap: float) -> float | None:
    """The first held-out point after T0 from which the run stays within THRESHOLD × gap of the
    reference translated by tau (None if its last point is not)."""
    (xs, ys), (xr, yr) = curve, ref
    keep = (xs > t0) & (xs - tau >= xr[0]) & (xs - tau <= xr[-1])
    xs, ys = xs[keep], ys[keep]
    if not len(xs):
        return None
    close = np.abs(ys - np.interp(xs - tau, xr, yr)) <= THRESHOLD * gap
    if not close[-1]:
        return None
    far = np.nonzero(~close)[0]
    return float(xs[far[-1] + 1] if len(far) else xs[0])


def snap(rd: RunDir, ref: RunDir, control: RunDir | None = None, x: str = "step",
         seed: RunDir | None = None) -> dict:
    """The snap of `rd` onto `ref` on axis x, with `control` (a never-changed run) as the negative
    control. Returns a dict; `verdict` is one of "snapped", "not yet", "not shown", "no change yet",
    "no fit"; `sentence` says it in one line. With `seed` (another seed of the reference arm) the
    sentence also sets the fit's residual beside the seed spread (the RMS gap between the two seeds'
    held-out curves after T0, as `gpctl figure` does): the verdict stays the gap rule's, but a fit
    several times the seed spread is said, not hidden."""
    t0, way = change_point(rd, x), direction(rd, x)
    out = {"run": rd.id, "ref": ref.id, "x": x, "t0": t0, "direction": way, "threshold": THRESHOLD,
           "control": None}
    if t0 is None or way is None:
        return dict(out, verdict="no change yet", sentence=f"{rd.id}: no noise change has taken effect yet")
    mine, theirs = held_out_curve(rd, x, 0.0), held_out_curve(ref, x, 0.0)   # raw points, as the figures fit
    fit = _fit(mine, theirs, t0, way)
    out.update({k: fit.get(k) for k in ("ok", "tau", "residual", "gap_before", "ratio", "why")})
    if not fit["ok"] or not math.isfinite(fit.get("ratio", float("nan"))):
        why = fit.get("why") or "no fit: the run has no held-out points before T0 to measure the gap by"
        return dict(out, verdict="no fit", sentence=f"{rd.id}: {why}")
    if control is not None:
        c = _fit(held_out_curve(control, x, 0.0), theirs, t0, way)
        out["control"] = {"run": control.id, "ok": c["ok"], "tau": c.get("tau"), "ratio": c.get("ratio"),
                          "fits": bool(c["ok"] and c.get("ratio", math.inf) <= THRESHOLD)}
    fits = fit["ratio"] <= THRESHOLD
    out["at"] = _since(mine, theirs, t0, fit["tau"], fit["gap_before"]) if fits else None
    ctl = out["control"]
    ctl_text = (f"; control {ctl['run']} {ctl['ratio']:.2g}" if ctl and ctl["ok"] else
                f"; control {ctl['run']}: no fit" if ctl else "; no control: no never-changed run of the same noise")
    out["seed"], out["seed_spread"] = (seed.id if seed is not None else None), None
    if seed is not None:
        xs_, ys_ = held_out_curve(seed, x, 0.0)
        win = xs_ > t0
        spread = rms_gap(xs_[win], ys_[win], *theirs)
        if math.isfinite(spread) and spread > 0:
            out["seed_spread"] = spread
            rel = ("within" if fit["residual"] <= spread else f"{fit['residual'] / spread:.1f}x")
            ctl_text += f"; fit {rel} the seed spread {spread:.2g}"
    side = "right" if fit["tau"] >= 0 else "left"
    shift = f"{ref.id} shifted {side} by {abs(fit['tau']):.1f} {x}"
    if fits and ctl and ctl["fits"]:
        out["verdict"] = "not shown"
        sentence = (f"{rd.id}: not shown: it fits {shift} (residual {fit['ratio']:.2g} of the pre-T0 gap), but so "
                    f"does the never-changed control {ctl['run']} ({ctl['ratio']:.2g})")
    elif fits:
        out["verdict"] = "snapped"
        at = f" at T0 + {out['at'] - t0:.0f} {x}" if out["at"] is not None else ""
        sentence = (f"{rd.id}: snapped to {shift}{at} (residual {fit['ratio']:.2g} of the pre-T0 gap{ctl_text})")
    else:
        out["verdict"] = "not yet"
        sentence = (f"{rd.id}: not yet: the best translation of {ref.id} ({abs(fit['tau']):.1f} {x} {side}) leaves a "
                    f"residual of {fit['ratio']:.2g} of the pre-T0 gap (snapped at <= {THRESHOLD}{ctl_text})")
    return dict(out, sentence=sentence)


def measure(home, rd: RunDir, ref: RunDir | None = None, control: RunDir | None = None,
            x: str | None = None) -> dict:
    """snap() with its defaults: `ref` the newest run of the preset's reference arm, `control` the
    newest never-changed run of the preset that started with the same lr and batch (not a seed
    baseline), `x` the figure's axis. ConfigError (one line) when there is no reference."""
    from engine.analysis.curves import figure_axis
    from engine.config import ConfigError
    from engine.presets import load_preset
    from engine.store.rundir import latest_runs
    cfg = rd.config()
    p = None
    if cfg.preset:
        try:
            p = load_preset(cfg.preset, check=False)
        except ConfigError:
            p = None
    runs = latest_runs(home, cfg.preset) if cfg.preset else {}
    if ref is None:
        if p is not None and p.contract.declared and runs.get(p.contract.reference) is not None:
            ref = runs[p.contract.reference]
        else:
            raise ConfigError(f"run {rd.id}: no reference run found (its preset {cfg.preset or '-'} names none here); "
                              f"give --ref RUN")
    if ref.id == rd.id:
        raise ConfigError(f"run {rd.id} is its own reference; give --ref another run")
    if control is None:
        skip = {ref.id, rd.id} | {r.id for a, r in runs.items() if p is not None and a in p.contract.baselines}
        control = next((r for a, r in runs.items() if r.id not in skip and not (c := r.config()).changes
                        and c.lr == cfg.lr and c.batch_size == cfg.batch_size), None)
    from engine.analysis.curves import AXES
    axis = figure_axis(p, x) if p is not None else (x or "step").replace("-", "_")
    if axis not in AXES:
        raise ConfigError(f"--x must be one of {', '.join(AXES)}, got {x!r}")
    try:
        ref_arm = ref.config().name
    except ConfigError:
        ref_arm = None
    seed = next((runs[a] for a, of in (p.contract.baselines.items() if p is not None else ())
                 if of == ref_arm and runs.get(a) is not None and runs[a].id not in (ref.id, rd.id)), None)
    return snap(rd, ref, control, axis, seed)


def announce(rd: RunDir) -> dict | None:
    """Once: if `rd` has snapped onto its reference (measure's defaults) and has not said so, a
    `snap` event with the sentence; returns the measure then, else None (not changed yet, not yet,
    no reference, or said before). The worker calls it for its running jobs and notifies."""
    from engine.config import ConfigError
    if any(e.get("event") == "snap" for e in rd.events()[0]) or change_point(rd) is None:
        return None
    try:
        res = measure(rd.home, rd)
    except (ConfigError, OSError, ValueError):
        return None
    if res["verdict"] != "snapped":
        return None
    st = rd.status()
    rd.append_event("snap", step=st.get("step"), lr_time=st.get("lr_time"), ref=res["ref"], x=res["x"],
                    tau=res["tau"], ratio=res["ratio"], at=res.get("at"), sentence=res["sentence"],
                    seed_ratio=(res["residual"] / res["seed_spread"] if res.get("seed_spread") else None))
    return res

