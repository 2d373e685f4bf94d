"""`gpctl repro`: the paper's three claims, end to end on a CPU, with gpctl's own functions.

    gpctl repro [--ci] [--seed K] [--out DIR]

1. Queue the preset `repro` (or `repro_ci`) like `gpctl run preset`, every arm's seed moved by K,
   and wait for its runs. The noisy batch-32 arms have three seeds (`high`, `high_s2`, `high_s3`).
2. Like `gpctl fork RUN --step T0` plus `gpctl drop/raise --batch-factor 16`: fork `high` at T0 and
   send it a batch x16 request through its control file (the live drop), and fork `low` at T0 with a
   batch /16 request (the raise); on the full preset also the lr drop (`high` at T0, lr / 4) and the
   lr raise (`low_lr` at lr_time T0, lr x 4 over a 100-step ramp), and the language-model preset
   `repro_lm` (batch 64 vs 8, and a drop 8 -> 64 at T0). Queue both and wait. The request is in the control file when the
   fork starts, so the engine applies it at the fork's first step boundary, T0, and says so in its
   events: the live path at the same step as the preset's scheduled drop.
3. Check each claim against THRESHOLDS (fixed before the recorded run, never tuned after), like
   `gpctl tv --match-loss --baseline` and `gpctl figure`, and write REPRODUCTION.md with the numbers,
   the verdicts, the figures and the time it took.

The rules every check follows (issue 17):
  1. held-out curves are smoothed with the paper's EMA (0.8) before any fit or comparison, and a
     family of seeds is compared by its mean curve;
  2. every check has a negative control, the same rule on a run the claim says it must fail for;
     a claim holds only if its check passes and its control fails;
  3. TV is measured at matched loss from loss-level checkpoints (`checkpoint_at_losses`): each run
     checkpoints where its held-out loss first reaches each level of one grid, so TV(run, low) at a
     level is compared with TV(low seed 2, low) at the same level; a ratio needs >= 10 shared levels
     (the dropped run's from T0 + 100 on) and pairs beyond 2 % of the loss are dropped, counted; only
     seeds other than low's are compared (as the baseline is: a shared initialization alone makes
     two runs close early);
  4. offline is judged by the early-stopped (best) held-out loss, and by tracking online at first;
  5. thresholds were fixed on calibration seeds; `--seed K` records on fresh ones; a gap's threshold
     sits above the seed-to-seed spread, and its control is that spread (the same arm's seeds).
Verdicts follow one rule everywhere (Claim.label): "holds" when the check passes and its control
fails; "not shown" when both pass (the rule cannot tell them apart at this size) or there is too
little to measure; "does not hold" when the check fails.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from engine.config import ConfigError
from gpctl.common import State, check_int, friendly, out
from gpctl.repro.checks import check_lm, check_online_offline, check_snap, check_tv
from gpctl.repro.claims import THRESHOLDS, Claim, Report
from gpctl.repro.report import _fmt, figures, write_report
from gpctl.repro.runs import run_all

__all__ = ["THRESHOLDS", "Claim", "Report", "reproduce", "register"]


def reproduce(preset: str, outdir: Path, command: str, seed: int = 0, cpu_slots: int = 1) -> Report:
    outdir.mkdir(parents=True, exist_ok=True)
    rep = run_all(preset, seed, cpu_slots)
    t = time.perf_counter()
    check_online_offline(rep)
    check_snap(rep)
    check_lm(rep)
    drop, high, base = check_tv(rep)
    for rows, curve in ((drop, "dropped"), (high, "high"), (base, "baseline")):
        for row in rows:
            row["curve"] = curve
    figures(rep, outdir, drop + high + base)
    rep.timings["checks, TV and figures"] = time.perf_counter() - t
    write_report(rep, outdir, command)
    return rep


@friendly
def repro(ci: Annotated[bool, typer.Option("--ci", help="The small version (preset repro_ci, ~4 min on 2 cores).")] = False,
          out_dir: Annotated[Optional[Path], typer.Option("--out", help="Folder for REPRODUCTION.md and the figures.")] = None,
          seed: Annotated[int, typer.Option("--seed", help="Added to every arm's seed: record on seeds the calibration did not use.")] = 0,
          cpu_slots: Annotated[int, typer.Option("--cpu-slots", help="Runs trained at once by the worker it starts "
                                                 "(the CI preset trains on one thread per run, so 2 fit 2 cores).")] = 1) -> None:
    """Reproduce the paper's three claims end to end (runs, forks, live requests, TV, figures)."""
    preset = "repro_ci" if ci else "repro"
    outdir = out_dir or State.home / "repro"
    if outdir.exists() and not outdir.is_dir():
        raise ConfigError(f"--out {outdir}: exists and is not a folder")
    check_int("--cpu-slots", cpu_slots, 1, 1024)
    command = ("gpctl repro" + (" --ci" if ci else "") + (f" --seed {seed}" if seed else "")
               + (f" --cpu-slots {cpu_slots}" if cpu_slots > 1 else "") + (f" --out {out_dir}" if out_dir else ""))
    rep = reproduce(preset, outdir, command, seed, cpu_slots)
    for c in rep.claims:
        verdict = {"holds": "holds", "does not hold": "FAIL"}.get(c.label, c.label)
        ctl = ", ".join(f"{k} {_fmt(v)}" for k, v in c.control_measured.items())
        out.print(f"{verdict:>8}  {c.name}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in c.measured.items())
                  + f"  [control, {c.control}: {ctl}: {'passes' if c.control_passed else 'fails'}]", markup=False)
    out.print(f"wrote {outdir / 'REPRODUCTION.md'}")
    if any(c.verdict is False for c in rep.claims):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command()(repro)
