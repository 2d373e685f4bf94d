"""Comparing runs: `gpctl tv` (function space), `gpctl snap` (the snap onto the reference), `gpctl plot`
and `gpctl figure` (pictures)."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from engine.config import ConfigError
from engine.analysis.curves import AXES
from engine.levels import MATCH_MAX_GAP
from engine.presets import load_preset
from engine.store.rundir import RunDir, list_runs, resolve
from gpctl import runs as ops
from gpctl.runs import figure_axis
from gpctl.common import (JsonOpt, State, check_device, check_figure, check_float, check_int, fmt, friendly, out, parse_steps,
                          plain_table, print_json, progress_status)

By = Annotated[str, typer.Option("--by", help="Pair checkpoints by step or lr_time (without --match-loss).")]


@friendly
def tv(run_a: Annotated[str, typer.Argument(help="Run A (e.g. the dropped run).")],
       run_b: Annotated[str, typer.Argument(help="Run B (the low-noise reference).")],
       match_loss: Annotated[bool, typer.Option("--match-loss", help="Pair each checkpoint of A with B's nearest in eval loss.")] = False,
       by: By = "step",
       baseline: Annotated[Optional[str], typer.Option("--baseline", help="Run C: the same curve for (C, B), e.g. a second low-noise seed.")] = None,
       at_steps: Annotated[Optional[str], typer.Option("--at-steps", help="Only these steps of A, comma-separated.")] = None,
       eval_samples: Annotated[int, typer.Option("--eval-samples", help="First N held-out examples (0 = all).")] = 0,
       device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda")] = "auto",
       as_json: JsonOpt = False,
       plot: Annotated[Optional[Path], typer.Option("--plot", help="Write a TV figure (.png or .svg).")] = None,
       plot_x: Annotated[str, typer.Option("--plot-x", help="The figure's x-axis with --match-loss: step, lr_time or loss (of A).")] = "step",
       max_gap: Annotated[float, typer.Option("--max-gap", help="With --match-loss: drop pairs whose losses differ by more than this fraction of B's (0: keep all).")] = MATCH_MAX_GAP,
       no_replacement: Annotated[bool, typer.Option("--no-replacement", help="With --match-loss: each checkpoint of B in one pair at most.")] = False,
       eval_from: Annotated[Optional[str], typer.Option("--eval-from", help="With two checkpoint files: the run whose held-out set to use.")] = None,
       follow: Annotated[bool, typer.Option("--follow", help="While A, B (or C) train: compute each new checkpoint's TV "
                                                           "as it appears (niced, one at a time) and print it; ends when "
                                                           "they have ended (Ctrl-C stops following).")] = False,
       poll: Annotated[float, typer.Option("--poll", help="With --follow: seconds between looks for new checkpoints.")] = 10.0) -> None:
    """Average total-variation distance of two runs' softmax outputs, checkpoint by checkpoint.

    RUN_A and RUN_B may also be two checkpoint files (.safetensors); then --eval-from names the run
    whose held-out examples they are compared on."""
    check_int("--eval-samples", eval_samples, 0, 10 ** 9)
    check_device("--device", device)
    check_figure("--plot", plot)
    steps = parse_steps("--at-steps", at_steps)
    if run_a.endswith(".safetensors") or run_b.endswith(".safetensors"):
        from engine.analysis.tv import tv_files
        if not eval_from:
            raise ConfigError("comparing checkpoint files needs --eval-from RUN (whose held-out set to use)")
        for f in (run_a, run_b):
            if not Path(f).is_file():
                raise ConfigError(f"{f}: no such checkpoint file")
        row = dict(tv_files(Path(run_a), Path(run_b), resolve(State.home, eval_from).config(), eval_samples, device),
                   curve="files")
        if as_json:
            print_json([row])
        else:
            out.print(f"TV {fmt(row['tv'])}  loss A {fmt(row['loss_a'])}  loss B {fmt(row['loss_b'])}  "
                      f"gap {row['loss_gap']:+.4f}  ({row['examples']} examples)")
        return
    by = by.replace("-", "_")    # one spelling of each axis across commands: lr_time (lr-time still works)
    if by not in ("step", "lr_time"):
        raise ConfigError(f"--by must be step or lr_time, got {by!r}")
    if not 0 <= max_gap < float("inf"):
        raise ConfigError(f"--max-gap must be a fraction of the loss >= 0 (0: keep every pair), got {max_gap}")
    pairing = "loss" if match_loss else by
    a, b = resolve(State.home, run_a), resolve(State.home, run_b)
    c = resolve(State.home, baseline) if baseline else None
    gap = (max_gap or None) if match_loss else None
    args = (a, b, c, pairing, steps, gap, not no_replacement, eval_samples, device)
    if follow:
        check_float("--poll", poll, 0.05, 3600.0)
        pairings, rows = follow_tv(*args, poll=poll, as_json=as_json)
    else:
        with progress_status(f"loading torch to compare {a.id} and {b.id}") as status:
            pairings, rows = tv_rows(*args, on_pair=lambda curve, k, n, what: status.update(
                f"TV ({curve}) pair {k + 1}/{n}: {what}"))
    if not rows:
        dropped = sum(len(p.dropped) for p in pairings.values())
        why = f": {dropped} candidate pairs dropped, beyond --max-gap {max_gap:g} of B's loss" if dropped else ""
        raise ConfigError(f"no checkpoint pairs for {a.id} and {b.id} (pairing by {pairing}){why}")
    spread = seed_spread(rows) if c else None
    if plot:
        from gpctl.figures import tv_figure
        x = {"step": "step_a", "lr_time": "lr_time_a"}[by] if not match_loss else plot_x.replace("-", "_") + "_a"
        if x not in ("loss_a", "step_a", "lr_time_a"):
            raise ConfigError(f"--plot-x must be step, lr_time or loss, got {plot_x!r}")
        tv_figure(rows, plot, x=x, title=f"TV to {b.id}")
    summary = {curve: pr.summary() for curve, pr in pairings.items()}
    if follow:                  # the rows are printed; what is left is the summary
        if as_json:
            print(json.dumps(_finite({"summary": summary, "seed_spread": spread}), ensure_ascii=True), flush=True)
        else:
            for curve, sm in summary.items():
                print(f"{curve}: {sm['kept']} pairs kept" + (f" ({sm['level_pairs']} at a shared loss level), "
                                                             f"{sm['dropped']} dropped" if pairing == "loss" else ""))
            if spread:
                print(spread["sentence"])
        return
    if as_json:
        print_json({"pairs": rows, "pairing": summary, "seed_spread": spread,
                                   "dropped": [_dropped(curve, d) for curve, pr in pairings.items() for d in pr.dropped]})
        return
    print(f"TV vs {b.id} (pairs by {pairing}" + (f"; kept where the losses differ by at most {max_gap:.3g} x B's "
                                                 f"loss ({max_gap * 100:.3g} %), "
                                                 f"{'without' if no_replacement else 'with'} replacement"
                                                 if gap else "") + ")")
    print(plain_table(("curve", "run A", "step A", "step B", "loss A", "loss B", "gap", "TV"),
                      [[r["curve"], r["run_a"], str(r["step_a"]), str(r["step_b"]), fmt(r["loss_a"]), fmt(r["loss_b"]),
                        f"{r['loss_gap']:+.4f}", fmt(r["tv"])] for r in rows], left=2))
    for curve, pr in pairings.items():
        sm = pr.summary()
        line = f"{curve}: {sm['kept']} pairs kept"
        if pairing == "loss":
            line += f" ({sm['level_pairs']} at a shared loss level)"
            if gap:
                line += f", {sm['dropped']} dropped beyond {max_gap * 100:.3g} % of B's loss"
        if sm["unmatched"]:
            line += f", {sm['unmatched']} checkpoints of A without a candidate"
        print(line)
        for ca, cb, g in pr.dropped:
            print(f"  dropped: step {ca.step} of {ca.run} (loss {ca.eval_loss:.4f}) ~ step {cb.step} of {cb.run} "
                  f"(loss {cb.eval_loss:.4f}): gap {g:.4f} > {max_gap * abs(cb.eval_loss):.4f}")
    if spread:
        print(spread["sentence"])
    if plot:
        out.print(f"wrote {plot}")


def tv_rows(a: RunDir, b: RunDir, c: RunDir | None, pairing: str, steps, gap, replacement: bool,
            eval_samples: int, device: str, on_pair=None) -> tuple[dict, list[dict]]:
    """({curve: Pairing}, rows): TV of A (curve "main") and of C ("baseline") to B for every kept pair,
    computed or read from A's (C's) cache. on_pair(curve, k, n, what) before each computed pair."""
    from engine.analysis.tv import pair_runs, tv_curve   # torch: only when a TV is computed
    pairings = {"main": pair_runs(a, b, pairing, steps, gap, replacement)}
    if c:
        pairings["baseline"] = pair_runs(c, b, pairing, steps, gap, replacement)
    rows = []
    for curve, pr in pairings.items():
        told = (lambda k, n, what, curve=curve: on_pair(curve, k, n, what)) if on_pair else None
        rows += [dict(r, curve=curve) for r in tv_curve(a if curve == "main" else c, b, pairing, steps, eval_samples,
                                                       device, on_pair=told, pairing=pr)]
    return pairings, rows


_sleep = time.sleep      # tests step a follow's polls themselves
FOLLOW_NICE = 10         # a follow yields the CPU to training on the same machine


def follow_tv(a: RunDir, b: RunDir, c: RunDir | None, pairing: str, steps, gap, replacement: bool,
              eval_samples: int, device: str, poll: float, as_json: bool) -> tuple[dict, list[dict]]:
    """`gpctl tv --follow`: every `poll` seconds, the TV of each checkpoint pair not yet printed
    (tv_rows: new checkpoints, one evaluation at a time, in this niced process), printed as it is
    computed; a checkpoint of A paired anew (B's newer checkpoint is nearer in loss) is printed again,
    saying which pair it replaces. Ends after the first look that starts when none of the runs is
    running or queued (so every checkpoint they wrote is in it); returns what tv_rows returns then,
    the rows `gpctl tv` prints for the same checkpoints."""
    from gpctl.steer import run_state
    try:
        os.nice(FOLLOW_NICE)
    except OSError:
        pass
    if device != "cuda":       # one core at most: the training it watches keeps the others
        import torch
        torch.set_num_threads(1)
    shown: dict[tuple, int] = {}
    if not as_json:
        print(f"following TV vs {b.id} (pairs by {pairing}; it looks for new checkpoints every {poll:g} s; "
              f"Ctrl-C stops)", flush=True)
        print(f"  {'curve':<8} {'run A':<28} {'step A':>7} {'step B':>7} {'loss A':>8} {'loss B':>8} {'gap':>8} "
              f"{'TV':>8}", flush=True)
    pairings, rows, look = {}, [], 0
    try:
        while True:
            look += 1
            growing = [r.id for r in (a, b, c) if r is not None and run_state(r) in ("running", "queued")]
            pairings, rows = tv_rows(a, b, c, pairing, steps, gap, replacement, eval_samples, device)
            for r in rows:
                key = (r["curve"], r["step_a"])
                if shown.get(key) == r["step_b"]:
                    continue
                replaces = shown.get(key)
                shown[key] = r["step_b"]
                if as_json:
                    print(json.dumps(_finite(dict(r, replaces=replaces, look=look)), ensure_ascii=True), flush=True)
                else:
                    again = f"  (was paired with step {replaces})" if replaces is not None else ""
                    print(f"  {r['curve']:<8} {r['run_a']:<28} {r['step_a']:>7} {r['step_b']:>7} {fmt(r['loss_a']):>8} "
                          f"{fmt(r['loss_b']):>8} {r['loss_gap']:>+8.4f} {fmt(r['tv']):>8}{again}", flush=True)
            if not growing:
                return pairings, rows
            _sleep(poll)
    except KeyboardInterrupt:
        if not as_json:
            print("stopped following (the runs go on; the TVs printed so far are cached)", flush=True)
        return pairings, rows


def _finite(v):
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def _dropped(curve: str, d) -> dict:
    ca, cb, g = d
    return {"curve": curve, "run_a": ca.run, "step_a": ca.step, "loss_a": ca.eval_loss,
            "run_b": cb.run, "step_b": cb.step, "loss_b": cb.eval_loss, "gap": g}


def seed_spread(rows: list[dict]) -> dict | None:
    """The main TV against the seed baseline's, over the loss range both curves cover (by A's loss):
    mean TV of each there and their ratio, with a sentence that says which is larger."""
    import numpy as np

    main = [r for r in rows if r["curve"] == "main"]
    base = [r for r in rows if r["curve"] == "baseline"]
    if not main or not base:
        return None
    lo = max(min(r["loss_a"] for r in main), min(r["loss_a"] for r in base))
    hi = min(max(r["loss_a"] for r in main), max(r["loss_a"] for r in base))
    m = [r["tv"] for r in main if lo <= r["loss_a"] <= hi]
    bl = [r["tv"] for r in base if lo <= r["loss_a"] <= hi]
    if not m or not bl or hi < lo:
        return {"range": None, "main": None, "baseline": None, "ratio": None, "pairs": [0, 0],
                "sentence": "seed spread: the main and baseline curves share no range of A's loss "
                            "(no comparison with the seed baseline)"}
    tm, tb = float(np.mean(m)), float(np.mean(bl))
    ratio = tm / tb if tb > 0 else float("inf")
    where = "within the seed baseline" if ratio <= 1 else f"{ratio:.2f}x the seed baseline"
    return {"range": [lo, hi], "main": tm, "baseline": tb, "ratio": ratio, "pairs": [len(m), len(bl)],
            "sentence": f"seed spread: mean TV {tm:.4f} (main, {len(m)} pairs) vs {tb:.4f} (baseline, "
                        f"{len(bl)} pairs) at A's losses {lo:.4f}-{hi:.4f}: {where}"}


AxisOpt = Annotated[str, typer.Option("--x", help="x-axis: step, samples, lr_time or wall (lr-time works too).")]
EmaOpt = Annotated[float, typer.Option("--ema", help="EMA coefficient (the paper: 0.8).")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output file, .png or .svg.")]


@friendly
def plot(runs: Annotated[list[str], typer.Argument(help="Runs to draw.")],
         x: AxisOpt = "step", ema: EmaOpt = 0.8, out_file: OutOpt = Path("loss.png"),
         logy: Annotated[bool, typer.Option("--logy", help="Logarithmic loss axis.")] = False,
         evals: Annotated[bool, typer.Option("--eval", help="Held-out loss instead of train loss (EMA'd over the evals).")] = False,
         error: Annotated[bool, typer.Option("--error", help="Held-out error (EMA'd over the evals).")] = False,
         mean: Annotated[bool, typer.Option("--mean", help="Seeds of one family as their mean with a min-max band.")] = False) -> None:
    """Loss curves of some runs (or every run of a group) in one figure."""
    from gpctl.figures import loss_figure
    check_figure("--out", out_file)
    x = x.replace("-", "_")
    if x not in AXES:
        raise ConfigError(f"--x must be one of {', '.join(AXES)}, got {x!r}")
    rds = [rd for r in runs for rd in runs_or_group(r)]
    loss_figure(rds, out_file, x=x, coef=ema, logy=logy, evals=evals or error, mean=mean,
                field="eval_error" if error else "eval_loss")
    out.print(f"wrote {out_file}")


def runs_or_group(text: str) -> list[RunDir]:
    """A run (id or unique prefix), or every run of a group (`--seeds`/`--sweep` families)."""
    members = []
    for rd in list_runs(State.home):
        try:
            if rd.config().group == text:
                members.append(rd)
        except ConfigError:
            continue
    return members or [resolve(State.home, text)]


def latest_runs(preset: str) -> dict[str, RunDir]:
    """The newest run of each arm of `preset` under the home folder."""
    return ops.latest_runs(State.home, preset)


@friendly
def figure(preset: Annotated[str, typer.Argument(help="Preset whose latest runs to draw.")],
           out_file: OutOpt = Path("figure.png"), ema: EmaOpt = 0.8,
           x: Annotated[Optional[str], typer.Option("--x", help="x-axis (default: lr_time for lr figures, else step).")] = None,
           train: Annotated[bool, typer.Option("--train", help="Train loss instead of the paper's held-out loss.")] = False,
           tv_out: Annotated[Optional[Path], typer.Option("--tv", help="Also TV at matched loss against steps (Figs. 7, 8), written here.")] = None,
           as_json: JsonOpt = False) -> None:
    """The paper's panel for a preset, from its latest runs here: held-out loss (EMA 0.8) on the
    figure's axis, the reference translated onto each changed arm, offline early-stopping marked."""
    from gpctl.figures import draw_panel, fit_sentence, panel_data
    check_figure("--out", out_file)
    check_figure("--tv", tv_out)
    if x is not None and x.replace("-", "_") not in AXES:
        raise ConfigError(f"--x must be one of {', '.join(AXES)}, got {x!r}")
    p = load_preset(preset, check=False)
    runs = latest_runs(p.name)
    if not runs:
        raise ConfigError(f"no runs of preset '{p.name}' in {State.home / 'runs'} (gpctl run preset {p.name})")
    x = figure_axis(p, x)
    data = panel_data(runs, p.contract, x, ema, train=train)
    if not any(c["x"] for c in data["curves"]):
        raise ConfigError(f"no {'train' if train else 'held-out'} loss recorded yet in the runs of '{p.name}'")
    data["tv"] = tv_panel(p, runs, x, tv_out) if tv_out else None
    if as_json:
        print_json(data)
        return
    draw_panel(data, out_file, title=f"{p.figure}: {p.name}")
    out.print(f"wrote {out_file}", markup=False)
    for fit in data["fits"]:
        out.print(fit_sentence(fit, x), markup=False)
    if tv_out:
        out.print(f"wrote {tv_out}", markup=False)
        for line in data["tv"]["sentences"]:
            out.print(line, markup=False)


def tv_panel(p, runs: dict[str, RunDir], x: str, path: Path) -> dict:
    """Figs. 7/8: TV at matched loss of every non-reference arm (and the seed baselines) to the
    reference, against A's steps or lr_time, T0 marked."""
    from engine.analysis.curves import change_point
    from engine.analysis.tv import pair_runs, tv_curve
    from gpctl.figures import tv_figure

    c = p.contract
    ref = runs.get(c.reference) if c.declared else None
    if ref is None:
        raise ConfigError(f"--tv needs the preset's reference arm ({c.reference or 'preset.reference is not set'}) "
                          f"among its runs here")
    rows, sentences, t0 = [], [], None
    for arm, rd in runs.items():
        if arm == c.reference:
            continue
        pairing = pair_runs(rd, ref, "loss", max_gap=MATCH_MAX_GAP)
        curve = "baseline" if c.baselines.get(arm) == c.reference else "main"
        got = tv_curve(rd, ref, "loss", pairing=pairing)
        rows += [dict(r, curve=curve, arm=arm) for r in got]
        sm = pairing.summary()
        sentences.append(f"{arm} vs {c.reference}: {sm['kept']} pairs at matched loss ({sm['level_pairs']} at a "
                         f"shared loss level), {sm['dropped']} dropped beyond {MATCH_MAX_GAP * 100:.3g} % of the "
                         f"reference's loss")
        t0 = t0 if t0 is not None else change_point(rd, x)
    if not rows:
        raise ConfigError(f"no checkpoint pairs at matched loss to {c.reference} (checkpoint_at_losses puts a "
                          f"family's checkpoints at the same losses)")
    for arm in dict.fromkeys(r["arm"] for r in rows if r["curve"] == "main"):
        spread = seed_spread([r for r in rows if r["arm"] == arm or r["curve"] == "baseline"])
        if spread:
            sentences.append(f"{arm}: {spread['sentence']}")
    tv_figure(rows, path, x=f"{x}_a" if x in ("step", "lr_time") else "step_a",
              title=f"{p.figure}: TV to {c.reference} at matched loss", t0=t0)
    return {"pairs": rows, "sentences": sentences}


@friendly
def snap(run: Annotated[str, typer.Argument(help="A run whose noise was changed (planned, by a request, or a fork).")],
         ref: Annotated[Optional[str], typer.Option("--ref", help="The reference run (default: the newest run of its "
                                                    "preset's reference arm).")] = None,
         control: Annotated[Optional[str], typer.Option("--control", help="The negative control (default: the newest "
                                                        "never-changed run of its preset that started with the same "
                                                        "lr and batch).")] = None,
         x: Annotated[Optional[str], typer.Option("--x", help="Axis: step, samples or lr_time (default: the preset's "
                                                  "figure's).")] = None,
         as_json: JsonOpt = False) -> None:
    """Has the run snapped onto its reference? Its held-out curve after the change fitted as a translation
    of the reference's (as `gpctl figure` fits it), judged against the gap before T0, with a
    never-changed run as the negative control."""
    rd = resolve(State.home, run)
    res = ops.measure_snap(State.home, rd, resolve(State.home, ref) if ref else None,
                           resolve(State.home, control) if control else None, x)
    if as_json:
        print_json(res)
        return
    out.print(res["sentence"], markup=False)


def register(app: typer.Typer) -> None:
    app.command(epilog="Example: gpctl snap demo-bs32to512")(snap)
    app.command()(tv)
    app.command()(plot)
    app.command()(figure)
