"""`gpctl repro`'s checks: each claim measured on the runs by the rules of gpctl.repro's docstring,
with its negative control, appended to the report as a Claim."""
from __future__ import annotations

import numpy as np

from engine.analysis.curves import eval_curve, fit_shift, held_out_curve, rms_gap
from engine.store.rundir import RunDir
from engine.control import RAISE_RAMP as LR_RAMP
from gpctl.repro.claims import EMA, FIRST, LAST, SETTLE, THRESHOLDS, TV_AFTER, Claim, Report
from gpctl.repro.runs import seed_runs, t0_of

def curve(runs: RunDir | list[RunDir], x: str = "step") -> tuple[np.ndarray, np.ndarray]:
    """The held-out loss curve, EMA-smoothed as the paper plots it (rule 1); for several seeds, their
    mean on the first seed's scheduled evals (each seed interpolated there: loss levels add evals at
    different steps in different seeds)."""
    rds = runs if isinstance(runs, list) else [runs]
    cs = [held_out_curve(rd, x, EMA) for rd in rds]
    every = rds[0].config().eval_every
    steps = eval_curve(rds[0], "step")[0]
    keep = (steps % every == 0) if every else np.ones(len(steps), bool)
    xs = cs[0][0][keep]
    end = min(c[0][-1] for c in cs)
    xs = xs[xs <= end]
    return xs, np.mean([np.interp(xs, cx, cy) for cx, cy in cs], axis=0)


def _window_means(a, b, x: str) -> tuple[float, float, float]:
    """Mean smoothed held-out loss of A and of B (at A's points) over the last LAST of the common x range."""
    xa, ya = curve(a, x)
    xb, yb = curve(b, x)
    hi = min(xa[-1], xb[-1])
    lo = hi - LAST * (hi - max(xa[0], xb[0]))
    keep = (xa >= lo) & (xa <= hi)
    ma, mb = float(ya[keep].mean()), float(np.interp(xa[keep], xb, yb).mean())
    return ma, mb, float(lo)


def _final(runs, n: int = 1) -> float:
    return float(curve(runs, "step")[1][-n:].mean())


def _best(runs) -> float:
    """The early-stopped held-out loss: the best of the smoothed curve (Fig. 1: "early stopping (true) loss")."""
    return float(curve(runs, "step")[1].min())


def _best_at(runs) -> tuple[int, int]:
    """Where the smoothed (seed-mean) held-out curve is best, and where it ends (steps)."""
    xs, ys = curve(runs, "step")
    return int(xs[int(np.argmin(ys))]), int(xs[-1])


def _track(off, on, first: bool) -> float:
    """Mean |offline - online| smoothed held-out loss over the first FIRST (or the last LAST) of the steps."""
    xo, yo = curve(off, "step")
    xn, yn = curve(on, "step")
    hi = min(xo[-1], xn[-1])
    keep = xo <= FIRST * hi if first else xo >= (1 - LAST) * hi
    return float(np.mean(np.abs(yo[keep] - np.interp(xo[keep], xn, yn))))


def check_online_offline(rep: Report) -> None:
    r, th = rep.runs, THRESHOLDS["online_gap"]
    for low, high, x, what in (("low", "high", "step", "batch 512 vs 32, equal steps"),
                               ("low_lr", "high", "lr_time", "lr 0.0125 vs 0.05 (batch 32), equal LR-normalized steps")):
        if low not in r:
            continue
        m_high, m_low, lo = _window_means(seed_runs(rep, high), seed_runs(rep, low), x)
        seeds = seed_runs(rep, low) if low != "low" else [r["low"], r["low_seed2"]]   # the low-noise arm's own seeds
        c_a, c_b, _ = _window_means(seeds[1], seeds[0], x)
        gap, c_gap = m_high - m_low, c_a - c_b
        rep.claims.append(Claim(f"1. online, {what}", {"high noise": m_high, "low noise": m_low, "gap": gap,
                                                      "gap / seed spread": gap / abs(c_gap) if c_gap else float("inf"),
                                                      f"window from {x}": lo},
                                f"gap > {th}", gap > th,
                                control=f"two seeds of the low-noise arm ({seeds[1].config().name} minus "
                                        f"{seeds[0].config().name}), absolute gap",
                                control_measured={"gap": c_gap}, control_passed=abs(c_gap) > th))
    th, th_t = THRESHOLDS["offline_gap"], THRESHOLDS["offline_track"]
    for low, high, on_low, on_high, what in (("off_low", "off_high", "low", "high", "batch 512 vs 32"),
                                             ("off_low_lr", "off_high", "low_lr", "high", "lr 0.0125 vs 0.05 (batch 32)")):
        if low not in r:
            continue
        b_low, b_high = _best(seed_runs(rep, low)), _best(seed_runs(rep, high))
        c_low, c_high = _best(seed_runs(rep, on_low)), _best(seed_runs(rep, on_high))
        gap, c_gap = b_low - b_high, c_low - c_high
        (at_h, end_h), (at_l, end_l) = _best_at(seed_runs(rep, high)), _best_at(seed_runs(rep, low))
        # early-stopped means the best lies before the end: an arm still improving at its end is not
        stopped = [arm for arm, at, end in ((high, at_h, end_h), (low, at_l, end_l)) if at > 0.9 * end]
        rep.claims.append(Claim(f"1. offline, {what}: high noise's early-stopped loss is lower",
                                {"high noise, best": b_high, "at step": at_h, "of": end_h,
                                 "low noise, best": b_low, "at step ": at_l, "of ": end_l, "gap": gap,
                                 "low noise, final": _final(seed_runs(rep, low))},
                                f"gap > {th}", gap > th,
                                control="the same rule on the online pair",
                                control_measured={"online high, best": c_high, "online low, best": c_low, "gap": c_gap},
                                control_passed=c_gap > th, enough=not stopped,
                                why_not=f"{', '.join(stopped)} still improving in the last 10% of its steps: "
                                        f"not early-stopped"))
    for off, on in (("off_low", "low"), ("off_high", "high")):
        if off not in r:
            continue
        first, last = _track(seed_runs(rep, off), seed_runs(rep, on), True), _track(seed_runs(rep, off), seed_runs(rep, on), False)
        rep.claims.append(Claim(f"1. offline tracks online at first ({off} vs {on})",
                                {f"mean abs gap, first {int(FIRST * 100)}%": first},
                                f"<= {th_t}", first <= th_t,
                                control=f"the same rule over the last {int(LAST * 100)}% (they part later)",
                                control_measured={"mean abs gap": last}, control_passed=last <= th_t))


def _fit_ratio(changed, ref, t0: int, taus=None, x: str = "step") -> dict:
    xd, yd = curve(changed, x)
    xr, yr = curve(ref, x)
    fit = fit_shift(xd, yd, xr, yr, t0, settle=SETTLE, taus=taus)
    return dict(fit, ratio=fit["residual"] / fit["gap_before"])


def _gap_before(a, b, t0: float, x: str) -> float:
    """RMS gap between two arms' smoothed held-out curves before T0 (the scale a fit is judged by)."""
    xa, ya = curve(a, x)
    xb, yb = curve(b, x)
    return rms_gap(xa[xa <= t0], ya[xa <= t0], xb, yb)


def check_snap(rep: Report) -> dict:
    r, t0, th = rep.runs, t0_of(rep), THRESHOLDS["snap_residual"]
    fit = _fit_ratio(seed_runs(rep, "high_drop"), r["low"], t0)
    ctl = _fit_ratio(seed_runs(rep, "high"), r["low"], t0)    # the never-dropped run must not fit
    rep.claims.append(Claim("2. drop at T0 (scheduled): a right-translation of the low-noise curve",
                            {"T0": t0, "seeds": len(seed_runs(rep, "high_drop")), "tau": fit["tau"],
                             "residual": fit["residual"],
                             "gap before T0": fit["gap_before"], "residual / gap": fit["ratio"]},
                            f"residual / gap <= {th}", fit["ratio"] <= th,
                            control="the never-dropped high-noise run",
                            control_measured={"tau": ctl["tau"], "residual / gap": ctl["ratio"]},
                            control_passed=ctl["ratio"] <= th))
    if "high_live" in r:
        live, sched, high = r["high_live"], r["high_drop"], r["high"]
        ack = next((e for e in live.events()[0] if e.get("event") == "control"), {})

        def max_diff(a: RunDir, b: RunDir) -> tuple[int, float]:
            la = {m["step"]: m["loss"] for m in a.train_records()}
            lb = {m["step"]: m["loss"] for m in b.train_records() if m["step"] > t0}
            common = sorted(set(la) & set(lb))
            return len(common), (max(abs(la[s] - lb[s]) for s in common) if common else float("inf"))

        n, diff = max_diff(live, sched)
        _, c_diff = max_diff(high, sched)
        th_l = THRESHOLDS["live_equal"]
        ok = ack.get("status") == "applied" and ack.get("step") == t0 and diff <= th_l
        rep.claims.append(Claim("determinism (not a claim of the paper): live drop = scheduled drop",
                                {"ack step": ack.get("step"), "ack": ack.get("status"), "steps compared": n,
                                 "max abs loss difference": diff},
                                f"applied at T0 and max difference <= {th_l:g}", ok,
                                control="the never-dropped run against the scheduled drop",
                                control_measured={"max abs loss difference": c_diff},
                                control_passed=c_diff <= th_l))
    if "low_raise" in r:
        steps = r["low"].config().steps
        taus = (-float(steps - t0), 0.0)
        xl, yl = curve(r["low"], "step")
        xh, yh = curve(seed_runs(rep, "high"), "step")
        gap = rms_gap(xl[xl <= t0], yl[xl <= t0], xh, yh)
        fit_r = _fit_ratio(r["low_raise"], seed_runs(rep, "high"), t0, taus)
        ctl_r = _fit_ratio(r["low"], seed_runs(rep, "high"), t0, taus)   # the never-raised run must not fit
        ratio_r, ratio_c = fit_r["residual"] / gap, ctl_r["residual"] / gap
        rep.claims.append(Claim("2. raise at T0 (control file): a left-translation of the high-noise curve",
                                {"tau": fit_r["tau"], "residual": fit_r["residual"], "gap before T0": gap,
                                 "residual / gap": ratio_r},
                                f"residual / gap <= {th}", ratio_r <= th,
                                control="the never-raised low-noise run",
                                control_measured={"tau": ctl_r["tau"], "residual / gap": ratio_c},
                                control_passed=ratio_c <= th))
    if "high_lr_drop" in r and "low_lr" in r:    # lr figures: x = LR-normalized steps (T0 = lr_time T0)
        low_lr, highs = seed_runs(rep, "low_lr"), seed_runs(rep, "high")
        gap = _gap_before(highs, low_lr, t0, "lr_time")
        k = r["high"].config().lr / r["low_lr"].config().lr
        end = r["low_lr"].config().steps * r["low_lr"].config().lr / r["low_lr"].config().lr_ref
        for name, changed, ref, never, taus, what in (
                ("high_lr_drop", r["high_lr_drop"], low_lr, highs, None,
                 f"2. lr drop at T0 (control file, lr / {k:g}): a right-translation of the low-lr curve"),
                ("low_lr_raise", r.get("low_lr_raise"), highs, low_lr, (-(end - t0), 0.0),
                 f"2. lr raise at T0 (control file, lr x {k:g} over a {LR_RAMP:g}-step ramp): "
                 f"a left-translation of the high-lr curve")):
            if changed is None:
                continue
            f = _fit_ratio(changed, ref, t0, taus, x="lr_time")
            c = _fit_ratio(never, ref, t0, taus, x="lr_time")
            ratio, c_ratio = f["residual"] / gap, c["residual"] / gap
            rep.claims.append(Claim(what, {"T0 (lr_time)": t0, "tau": f["tau"], "residual": f["residual"],
                                           "gap before T0": gap, "residual / gap": ratio},
                                    f"residual / gap <= {th}", ratio <= th,
                                    control=f"the never-{'dropped' if name == 'high_lr_drop' else 'raised'} "
                                            f"{'high' if name == 'high_lr_drop' else 'low'}-lr run",
                                    control_measured={"tau": c["tau"], "residual / gap": c_ratio},
                                    control_passed=c_ratio <= th))
    return fit


def check_lm(rep: Report) -> None:
    """The language-model twin (repro_lm): the online gap at equal steps, against two seeds of the
    low-noise arm, and the snap after the batch drop, against the never-dropped run."""
    r = rep.runs
    if "lm_low" not in r:
        return
    th = THRESHOLDS["lm_online_gap"]
    m_high, m_low, lo = _window_means(r["lm_high"], r["lm_low"], "step")
    c_a, c_b, _ = _window_means(r["lm_low_s2"], r["lm_low"], "step")
    gap, c_gap = m_high - m_low, c_a - c_b
    rep.claims.append(Claim("1. online, language model, batch 64 vs 8, equal steps",
                            {"high noise": m_high, "low noise": m_low, "gap": gap,
                             "gap / seed spread": gap / abs(c_gap) if c_gap else float("inf"),
                             "window from step": lo},
                            f"gap > {th}", gap > th,
                            control="two seeds of the low-noise arm (lm_low_s2 minus lm_low), absolute gap",
                            control_measured={"gap": c_gap}, control_passed=abs(c_gap) > th))
    t0, th = r["lm_drop"].config().changes[0].at_step, THRESHOLDS["snap_residual"]
    fit, ctl = _fit_ratio(r["lm_drop"], r["lm_low"], t0), _fit_ratio(r["lm_high"], r["lm_low"], t0)
    rep.claims.append(Claim("2. language model, drop at T0 (scheduled, batch 8 -> 64): a right-translation "
                            "of the low-noise curve",
                            {"T0": t0, "tau": fit["tau"], "residual": fit["residual"],
                             "gap before T0": fit["gap_before"], "residual / gap": fit["ratio"]},
                            f"residual / gap <= {th}", fit["ratio"] <= th,
                            control="the never-dropped high-noise run",
                            control_measured={"tau": ctl["tau"], "residual / gap": ctl["ratio"]},
                            control_passed=ctl["ratio"] <= th))


def level_tv(rep: Report, runs: list[RunDir], after: int | None = None) -> tuple[dict[float, list[float]], list[dict]]:
    """TV to `low` at each loss level that a run and `low` both checkpointed (within the matched-loss
    tolerance), over seeds: {level: [TV of each seed]}, and the rows (for the figure). `after`: only
    the run's checkpoints after this step."""
    from engine.levels import MATCH_MAX_GAP
    from engine.analysis.tv import Pairing, pair_runs, tv_curve   # torch: only when the checks run

    low = rep.runs["low"]
    by_level: dict[float, list[float]] = {}
    rows: list[dict] = []
    for rd in runs:
        pr = pair_runs(rd, low, "loss", max_gap=MATCH_MAX_GAP)
        pairs = [(a, b) for a, b in pr.pairs if set(a.levels) & set(b.levels) and (after is None or a.step > after)]
        got = tv_curve(rd, low, "loss", pairing=Pairing("loss", pairs, [], MATCH_MAX_GAP, True))
        for row in got:
            for lv in row["levels"]:
                by_level.setdefault(lv, []).append(row["tv"])
        rows += got
    return by_level, rows


def tv_ratio(run: dict[float, list[float]], base: dict[float, list[float]]) -> dict:
    """mean TV(run, low) / mean TV(low seed 2, low) over the levels both have (seeds averaged per level)."""
    shared = sorted(set(run) & set(base), reverse=True)
    if not shared:
        return {"levels": 0, "tv": float("nan"), "baseline": float("nan"), "ratio": float("nan"), "range": "-"}
    tv = float(np.mean([np.mean(run[lv]) for lv in shared]))
    b = float(np.mean([np.mean(base[lv]) for lv in shared]))
    return {"levels": len(shared), "tv": tv, "baseline": b, "ratio": tv / b if b > 0 else float("inf"),
            "range": f"{shared[-1]:.4g}–{shared[0]:.4g}"}


def check_tv(rep: Report) -> tuple[list[dict], list[dict], list[dict]]:
    """Rule 3: TV at matched loss, level by level, against the low-noise seed baseline at the same levels."""
    r, t0 = rep.runs, t0_of(rep)
    # only seeds other than low's: a run that shares low's initialization and data order is close to it
    # early for that reason alone, and the baseline (low seed 2) does not share them
    other = lambda arm: [rd for rd in seed_runs(rep, arm) if rd.config().seed != r["low"].config().seed]  # noqa: E731
    drop_lv, drop = level_tv(rep, other("high_drop"), after=t0 + TV_AFTER)
    high_lv, high = level_tv(rep, other("high"))
    base_lv, base = level_tv(rep, [r["low_seed2"]])
    d, h = tv_ratio(drop_lv, base_lv), tv_ratio(high_lv, base_lv)
    need = THRESHOLDS["tv_min_levels"]
    enough = d["levels"] >= need and h["levels"] >= need
    why = f"{d['levels']} and {h['levels']} shared loss levels (dropped, high), {need} each needed"

    def measured(name: str, m: dict) -> dict:
        return {"levels": m["levels"], "level range": m["range"], f"TV({name}, low)": m["tv"],
                "baseline at the same levels": m["baseline"], "ratio": m["ratio"]}
    rep.claims.append(Claim("3. TV at matched loss: dropped vs low noise, against two low-noise seeds",
                            measured("dropped", d), f"ratio <= {THRESHOLDS['tv_close']} over >= {need} levels",
                            bool(d["ratio"] <= THRESHOLDS["tv_close"]),
                            control="the never-dropped high-noise run, at its own levels",
                            control_measured={"levels": h["levels"], "ratio": h["ratio"]},
                            control_passed=bool(h["ratio"] <= THRESHOLDS["tv_close"]), enough=enough, why_not=why))
    rep.claims.append(Claim("3. TV at matched loss: high noise vs low noise, against two low-noise seeds",
                            measured("high", h), f"ratio >= {THRESHOLDS['tv_apart']} over >= {need} levels",
                            bool(h["ratio"] >= THRESHOLDS["tv_apart"]),
                            control="the dropped run, at its own levels",
                            control_measured={"levels": d["levels"], "ratio": d["ratio"]},
                            control_passed=bool(d["ratio"] >= THRESHOLDS["tv_apart"]), enough=enough, why_not=why))
    return drop, high, base


# ------------------------------------------------------------------ figures and the report
