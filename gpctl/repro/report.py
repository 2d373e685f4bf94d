"""`gpctl repro`'s output: the figures and REPRODUCTION.md (numbers, verdicts, machine, timings)."""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np

from engine.control import BATCH_FACTOR, RAISE_RAMP as LR_RAMP
from engine.presets import load_preset
from gpctl.repro.checks import _final
from gpctl.repro.claims import CALIBRATION_SEEDS, EMA, FIRST, LAST, SETTLE, THRESHOLDS, TV_AFTER, Report
from gpctl.repro.runs import t0_of

def figures(rep: Report, outdir: Path, tv_rows: list[dict]) -> None:
    from gpctl.figures import loss_figure, tv_figure

    r, t0 = rep.runs, t0_of(rep)
    plots = [("repro_fig3_batch.png", "Fig. 3 (top): batch 512 vs 32, online (solid) and offline (dotted)",
              ["low", "high", "off_low", "off_high"], "step", None, None),
             ("repro_fig3_lr.png", "Fig. 3 (bottom): lr 0.0125 vs 0.05 at batch 32, online and offline",
              ["low_lr", "high", "off_low_lr", "off_high"], "lr_time", None, None),
             ("repro_fig4_drop.png", f"Fig. 4: batch 32 -> 512 at T0 = {t0} (high_live lies on high_drop)",
              ["low", "high", "high_drop", "high_live"], "step", ("high_drop", "low"), None),
             ("repro_fig5_raise.png", f"Fig. 5: batch 512 -> 32 at T0 = {t0} (live)",
              ["low", "high", "low_raise"], "step", ("low_raise", "high"),
              (-float(r["low"].config().steps - t0), 0.0))]
    if "low_lr" in r:
        lo = r["low_lr"].config()
        end, k = lo.steps * lo.lr / lo.lr_ref, r["high"].config().lr / lo.lr
        plots += [("repro_fig4_lr_drop.png", f"Fig. 4 (lr): lr / {k:g} at lr_time T0 = {t0}, batch 32",
                   ["low_lr", "high", "high_lr_drop"], "lr_time", ("high_lr_drop", "low_lr"), None),
                  ("repro_fig5_lr_raise.png", f"Fig. 5 (lr): lr x {k:g} at lr_time T0 = {t0}, "
                                              f"{LR_RAMP:g}-step ramp, batch 32",
                   ["low_lr", "high", "low_lr_raise"], "lr_time", ("low_lr_raise", "high"), (-(end - t0), 0.0))]
    for name, title, arms, x, shift, taus in plots:
        rds = [r[a] for a in arms if a in r]
        if len(rds) < 2 or (shift and shift[0] not in r):
            continue
        sh = (r[shift[0]], r[shift[1]], float(t0)) if shift else None
        loss_figure(rds, outdir / name, x=x, title=title, shift=sh, evals=True, taus=taus, settle=SETTLE)
        rep.figures.append((name, title))
    tv_figure(tv_rows, outdir / "repro_fig7_tv.png", x="step_a", t0=float(t0),
              title="Fig. 7: TV to `low` at matched held-out loss (loss-level checkpoints)")
    rep.figures.append(("repro_fig7_tv.png", "Fig. 7: TV to the low-noise run at matched loss, against steps"))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


def write_report(rep: Report, outdir: Path, command: str) -> Path:
    p = load_preset(rep.preset)
    total = sum(rep.timings.values())
    lines = [f"# Reproduction: the paper's three claims with gpctl on a CPU ({rep.preset})", "",
             f"Made by `{command}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} "
             f"({platform.machine()}, {_cpus()} CPU cores, torch {_torch()}).", "",
             f"CPU: {_cpu_model()}; Python {platform.python_version()}, numpy {np.__version__}.", "",
             f"Setup: {p.description}. Preset `presets/{rep.preset}.toml`; forks and requests as in "
             f"`gpctl/repro/runs.py`. Loss is the held-out loss (2000 fixed examples), smoothed with the paper's "
             f"EMA ({EMA}) before every fit and comparison.", "",
             f"Seeds: the task and the thresholds were calibrated on the preset's own seeds "
             f"{', '.join(map(str, CALIBRATION_SEEDS))}; this run adds {rep.seed} to every arm's seed "
             f"({'fresh seeds, not used in calibration' if rep.seed else 'the calibration seeds themselves'}).", "",
             "## Verdicts", "",
             "A claim holds only if its check passes **and** its negative control (the same rule applied to "
             "a run the claim says it must not hold for) fails.", "",
             "| claim | measured | threshold | check | negative control | control | verdict |",
             "|---|---|---|---|---|---|---|"]
    for c in rep.claims:
        measured = "; ".join(f"{k} {_fmt(v)}" for k, v in c.measured.items())
        ctl = "; ".join(f"{k} {_fmt(v)}" for k, v in c.control_measured.items())
        check = "reported" if c.passed is None else ("pass" if c.passed else "fail") + ("" if c.enough else " (too little)")
        cpass = "-" if c.control_passed is None else "passes (bad)" if c.control_passed else "fails (good)"
        verdict = f"**{c.label}**"
        lines.append(f"| {c.name} | {measured} | {c.rule} | {check} | {c.control}: {ctl} | {cpass} | {verdict} |")
    lines += ["", "## What shows at this size", ""] + [f"- {line}" for line in plain_verdicts(rep)]
    lines += ["", f"Thresholds (fixed in `gpctl/repro/claims.py` before the recorded run): `{json.dumps(THRESHOLDS)}`; "
              f"\"the last part\" = the last {int(LAST * 100)}% of the x-axis, \"at first\" the first "
              f"{int(FIRST * 100)}%; fits leave out {SETTLE} steps after T0; TV pairs checkpoints taken at the same "
              f"held-out loss level (`checkpoint_at_losses`, within 1 % of the level; pairs more than 2 % apart "
              f"are dropped), the dropped run's from T0 + {TV_AFTER} on, and compares each run's TV to `low` "
              f"with the seed baseline's at the same levels.", "",
              "## Figures", ""]
    lines += [f"![{title}]({name})" for name, title in rep.figures]
    lines += ["", "## Runs", "", "| arm | run id | seed | batch | lr | steps | mode | last held-out loss (EMA) |",
              "|---|---|---|---|---|---|---|---|"]
    for name, rd in rep.runs.items():
        cfg = rd.config()
        recs = rd.train_records()
        # from the config (a fork's is its parent's at T0) to the last record
        batch, lr = (f"{a:g} → {b:g}" if a != b else f"{a:g}"
                     for a, b in ((cfg.batch_size, recs[-1]["batch_size"]), (cfg.lr, recs[-1]["lr"])))
        start = f"{recs[0]['step'] - 1}–" if recs[0]["step"] > 1 else ""
        lines.append(f"| {name} | `{rd.id}` | {cfg.seed} | {batch} | {lr} | {start}{cfg.steps} | {cfg.data.mode} | "
                     f"{_final(rd, 1):.4f} |")
    t0 = t0_of(rep)
    lines += ["", "## Rerun", "", "```",
              "python3 -m venv .venv && .venv/bin/pip install -e .",
              f".venv/bin/{command}", "```", "",
              "What it does, in the CLI's words (each step calls the function behind that command):", "", "```",
              f"gpctl run preset {rep.preset} --wait",
              f"gpctl fork {rep.preset}-high-… --step {t0} --name high_live --no-start",
              f"gpctl drop {rep.preset}-high_live-… --batch-factor {BATCH_FACTOR} --queued-ok   "
              f"# applied at its first step boundary, T0 = {t0}",
              f"gpctl resume {rep.preset}-high_live-…                  # queue it",
              f"gpctl fork {rep.preset}-low-… --step {t0} --name low_raise --no-start",
              f"gpctl raise {rep.preset}-low_raise-… --batch-factor {BATCH_FACTOR} --queued-ok",
              f"gpctl resume {rep.preset}-low_raise-…",
              *([f"gpctl fork {rep.preset}-high-… --step {t0} --name high_lr_drop --set steps=… --no-start",
                 f"gpctl drop {rep.preset}-high_lr_drop-… --lr-factor 4 --queued-ok",
                 f"gpctl fork {rep.preset}-low_lr-… --lr-time {t0} --name low_lr_raise --set steps=… --no-start",
                 f"gpctl raise {rep.preset}-low_lr_raise-… --lr-factor 4 --ramp {LR_RAMP:g} --queued-ok",
                 "gpctl resume …                                        # queue both",
                 "gpctl run preset repro_lm --wait                      # the language-model part"]
                if "high_lr_drop" in rep.runs else []),
              f"gpctl tv {rep.preset}-high_drop-… {rep.preset}-low-… --match-loss --baseline {rep.preset}-low_seed2-…",
              "gpctl plot … --eval                                   # the figures above",
              "```"]
    lines += ["", "## Time", ""]
    lines += [f"- {k}: {v:.0f} s" for k, v in rep.timings.items()]
    lines += [f"- total: {total:.0f} s ({total / 60:.1f} min)", ""]
    path = outdir / "REPRODUCTION.md"
    path.write_text("\n".join(lines) + "\n")
    (outdir / "repro.json").write_text(json.dumps(
        {"preset": rep.preset, "thresholds": THRESHOLDS, "timings": rep.timings,
         "runs": {k: v.id for k, v in rep.runs.items()},
         "seed": rep.seed, "calibration_seeds": CALIBRATION_SEEDS, "cpu": _cpu_model(),
         "claims": [{"name": c.name, "measured": c.measured, "rule": c.rule, "passed": c.passed,
                     "control": c.control, "control_measured": c.control_measured,
                     "control_passed": c.control_passed, "enough": c.enough, "label": c.label,
                     "verdict": c.verdict} for c in rep.claims]},
        indent=1))
    return path


def _cpus() -> int:
    import os
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


def plain_verdicts(rep: Report) -> list[str]:
    """Each claim in one plain sentence, by the one rule (Claim.label), saying why where it is not shown."""
    out = []
    for c in rep.claims:
        if c.label == "holds":
            out.append(f"**Holds**: {c.name}.")
        elif c.label == "not shown" and not c.enough:
            out.append(f"**Not shown**: {c.name}: too little to measure it ({c.why_not}).")
        elif c.label == "not shown":
            out.append(f"**Not shown**: {c.name}: the check passes, but so does its negative control "
                       f"({c.control}), so at this size it cannot tell the two apart.")
        elif c.label == "does not hold":
            out.append(f"**Does not hold here**: {c.name}: the check fails ({c.rule}).")
        else:
            out.append(f"**Reported**: {c.name}.")
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _torch() -> str:
    import torch
    return torch.__version__
