"""`gpctl presets` and `gpctl presets check`: what a preset will do, proven before a GPU-hour is spent.

`check` steps every arm's schedule and sample count exactly as the training loop would (engine/plan.py)
and prints, per arm: steps, samples (tokens), epochs of its data, lr_time at the end, each planned
change with the step / lr_time where it fires, and the final lr. Then what the preset compares
(engine/contract.py) and every finding: an arm that differs from the reference in more than the
declared knob, a change in the wrong direction or to another noise than the reference's, an lr figure
without lr_ref, a warmup past T0, an offline subset too big or seen once, ... It exits 1 when a
preset is not its experiment; a departure the preset declares (preset.departs) is printed, not refused.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from engine.config import ConfigError
from engine.contract import errors
from engine.plan import Plan, compare_ends, plan
from engine.presets import list_presets, load_preset
from gpctl.common import JsonOpt, friendly, out, print_json

app = typer.Typer(invoke_without_command=True, help="The presets: list them, or check what they will run.")


@app.callback()
@friendly
def presets(ctx: typer.Context, as_json: JsonOpt = False,
            verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Each preset's arms and description too.")] = False) -> None:
    """List the presets, one line each: name, paper figure, how many runs (-v: arms and description)."""
    if ctx.invoked_subcommand is not None:
        return
    found = list_presets()
    if as_json:
        print_json([{"name": p.name, "figure": p.figure, "description": p.description,
                                    "twin": p.twin, "runs": list(p.runs), "path": str(p.path)} for p in found])
        return
    if not verbose:
        w = max([4] + [len(p.name) for p in found])
        print("\n".join([f"{'name'.ljust(w)}  runs  figure"] +
                        [f"{p.name.ljust(w)}  {len(p.runs):>4}  {p.figure}" for p in found]))
        print("-v: arms and descriptions; gpctl presets check NAME: what a preset runs")
        return
    t = Table(title="presets")
    for col in ("name", "figure", "runs", "description"):
        t.add_column(col, overflow="fold")
    for p in found:
        t.add_row(p.name, p.figure, ", ".join(p.runs), p.description)
    out.print(t)


@app.command("check")
@friendly
def check(names: Annotated[Optional[list[str]], typer.Argument(help="Preset names or .toml paths (default: all).")] = None,
          as_json: JsonOpt = False,
          cost: Annotated[bool, typer.Option("--cost", help="Also estimate each arm's wall time and GPU-hours from a "
                                             "step time measured on this machine (a short probe per model and "
                                             "batch, cached in the home).")] = False,
          device: Annotated[str, typer.Option("--device", help="Where --cost measures: auto (cuda if there), cpu, "
                                              "cuda, cuda:N.")] = "auto") -> None:
    """Step every arm's schedule without training; exit 1 if a preset is not the experiment it says."""
    presets = [load_preset(n, check=False) for n in names] if names else list_presets()
    report, failed = [], 0
    for p in presets:
        runs = p.expand()
        plans = [plan(r.cfg) for r in runs]
        findings = p.findings(runs=runs)
        ends = compare_ends(plans)
        reason = p.contract.departs.get("steps")   # arms that end elsewhere on purpose (offline: past their best)
        problems = [f"{pl.cfg.name}: {msg}" for pl in plans for msg in pl.problems] + ([] if reason else ends)
        problems += [f.line() for f in errors(findings) if not any(f.line().endswith(m) for m in problems)]
        declared = [f.line() for f in findings if f.level == "declared"
                    and not (ends and reason and f.key == "steps" and not f.arms)] + \
            [f"{m} (declared: {reason})" for m in ends if reason]
        failed += bool(problems)
        from gpctl.runs import data_missing
        missing = list(dict.fromkeys(m for r in runs if (m := data_missing(r.cfg))))   # a warning: data comes later
        costs = _costs(plans, device) if cost else []
        c = p.contract
        report.append({"preset": p.name, "path": str(p.path),
                       "compares": list(c.compares), "reference": c.reference, "direction": c.direction,
                       "baselines": c.baselines, "departs": c.departs,
                       "arms": [_arm_json(pl) for pl in plans], "problems": problems, "data_missing": missing,
                       **({"cost": [{"arm": c.arm, "seconds": c.seconds, "gpu_hours": c.gpu_hours, "gpus": c.gpus,
                                     "stretches": [{"batch_size": b, "steps": n, "seconds_per_step": t}
                                                   for b, n, t in c.stretches], "source": c.source}
                                    for c in costs]} if cost else {}),
                       "findings": [f.as_json() for f in findings]})
        if not as_json:
            _print_preset(p, plans, problems, declared)
            for m in missing:
                out.print(f"  DATA {p.name}: {m} (a warning: the preset is checked, its runs would stop "
                          f"before training)", markup=False)
            for c in costs:
                per = ", ".join(f"{n} steps at batch {b} × {t * 1e3:.3g} ms" for b, n, t in c.stretches)
                out.print(f"  COST {p.name} {c.arm}: {_duration(c.seconds)}, {c.gpu_hours:.3g} GPU-h on "
                          f"{c.gpus} GPU(s) ({per}; {c.source}; evals and checkpoints not counted)", markup=False)
    if as_json:
        print_json(report)
    else:
        out.print(f"{len(presets) - failed} of {len(presets)} presets pass" + (f"; {failed} fail" if failed else ""))
    if failed:
        raise typer.Exit(1)


@app.command("from-run")
@friendly
def from_run(run: Annotated[str, typer.Argument(help="Run id or a unique prefix of it.")],
             out_file: Annotated[Optional[Path], typer.Option("--out", help="Write the preset here (default: stdout).")] = None) -> None:
    """A preset that replays RUN: its config, with the requests it applied as planned changes."""
    from engine.analysis.replay import preset_from_run
    from engine.store.rundir import resolve
    from gpctl.common import State

    text = preset_from_run(resolve(State.home, run))
    if out_file is None:
        print(text, end="")
        return
    if out_file.exists() and out_file.is_dir():
        raise ConfigError(f"--out {out_file}: is a folder")
    try:
        out_file.write_text(text)
    except OSError as e:
        raise ConfigError(f"--out {out_file}: {e.strerror}") from None
    out.print(f"wrote {out_file} (gpctl run preset {out_file})")


def _costs(plans: list[Plan], device: str) -> list:
    from engine.analysis.cost import cost
    from engine.train.loop import pick_device
    from gpctl.common import State, check_device
    check_device("--device", device)
    where = str(pick_device(device))
    return [cost(pl, where, State.home) for pl in plans]


def _duration(sec: float) -> str:
    if sec >= 3600:
        return f"{sec / 3600:.3g} h"
    if sec >= 60:
        return f"{sec / 60:.3g} min"
    return f"{sec:.3g} s"


def _arm_json(pl: Plan) -> dict:
    return {"arm": pl.cfg.name, "steps": pl.steps, "samples": pl.samples, "tokens": pl.cfg.is_lm,
            "epochs": pl.epochs, "data": pl.data_note, "lr_time": pl.lr_time, "final_lr": pl.final_lr,
            "ended_by": pl.ended_by,
            "changes": [{"change": f.index, "step": f.step, "lr_time": f.lr_time, "samples": f.samples,
                         "changed": f.changed} for f in pl.fired],
            "never_fire": pl.unfired, "problems": pl.problems}


SHOWN = 8    # planned changes shown per arm in the table (the count of the rest is said)


def _print_preset(p, plans: list[Plan], problems: list[str], declared: list[str]) -> None:
    name, figure, c = p.name, p.figure, p.contract
    t = Table(title=f"{name} ({figure})" if figure else name, title_justify="left")
    for col in ("arm", "steps", "samples", "epochs", "lr_time", "changes (step / lr_time)", "final lr"):
        t.add_column(col, justify="left" if col in ("arm", "changes (step / lr_time)") else "right",
                     overflow="fold")
    for pl in plans:
        unit = " tok" if pl.cfg.is_lm else ""
        epochs = "endless" if pl.epochs is None else f"{pl.epochs:.3g}"
        fired = [f"{_what(f.changed)} @ {f.step} / {f.lr_time:.1f}" for f in pl.fired[:SHOWN]]
        fired += [f"changes[{i}] NEVER FIRES" for i in pl.unfired[:SHOWN]]
        if len(pl.fired) > SHOWN or len(pl.unfired) > SHOWN:     # said, never cut silently
            fired.append(f"… {len(pl.fired) + len(pl.unfired) - len(fired)} more (--json lists every one)")
        t.add_row(pl.cfg.name, str(pl.steps), _si(pl.samples) + unit, epochs, f"{pl.lr_time:.1f}",
                  "; ".join(fired) or "-", f"{pl.final_lr:.3g}")
    out.print(t)
    if c.declared:
        seeds = ", ".join(f"{a} (seed of {of})" for a, of in c.baselines.items()) or "none"
        out.print(f"  compares {' and '.join(c.compares)}; reference {c.reference}"
                  + (f"; changes {c.direction} the noise" if c.direction else "") + f"; seed baselines: {seeds}",
                  markup=False)
    out.file.write("".join(f"  DEPARTS {name}: {msg}\n" for msg in declared)
                   + "".join(f"  FAIL {name}: {msg}\n" for msg in problems))   # every one, one write
    out.file.flush()


def _what(changed: dict) -> str:
    names = {"lr": "lr", "batch_size": "batch"}
    return ", ".join(f"{names.get(k, k)} {v[1]:.3g}" for k, v in changed.items() if isinstance(v, list)) or "-"


def _si(n: int) -> str:
    """3 significant digits with a unit: 6.14M, 25.2B (exact counts are in --json)."""
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.3g}{suffix}"
    return str(n)
