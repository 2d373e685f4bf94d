"""The `gpctl` command line. Commands stay thin: they call engine / gpctl.runs functions.

User-caused errors (bad preset, bad --set, unknown run, missing data, corrupt checkpoint) end with
one line on stderr and exit code 2 — never a traceback.
"""
from __future__ import annotations

import shutil
import sys
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

from engine.config import ConfigError
from engine.store.rundir import RunDir, home, list_runs, private_files, resolve
from gpctl import runs as ops
from engine.launch import slurm
from engine.store import state as states_
from engine.store.jobs import JobStore
from gpctl import compare, data, export, presetcheck, queue, repro, report, steer
from gpctl.common import JsonOpt, RunArg, SetOpt, State, complete_preset, err, friendly, out, print_json
from gpctl.common import fmt as _f
from gpctl.common import MAX_PRIORITY, check_int, plain_table
from gpctl.progress import train_in_foreground

HELP = {"help_option_names": ["-h", "--help"]}


class RunGroup(TyperGroup):
    """`gpctl run NAME` is a common slip for `gpctl run preset NAME`: say so."""

    def resolve_command(self, ctx, args):
        if args and not args[0].startswith("-") and args[0] not in self.commands:
            ctx.fail(f"No such command '{args[0]}'. To run the preset of that name: gpctl run preset {args[0]}")
        return super().resolve_command(ctx, args)


app = typer.Typer(no_args_is_help=True, context_settings=HELP, help="Run, steer and compare SGD-noise experiments.",
                  epilog="Example: gpctl run preset demo && gpctl tui   (gpctl COMMAND -h for each command)")
run_app = typer.Typer(no_args_is_help=True, cls=RunGroup, context_settings=HELP, help="Start runs.")
app.add_typer(run_app, name="run", rich_help_panel="Run")


def _print_version(value: bool) -> None:
    if value:
        from gpctl import __version__
        print(f"gpctl {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    home_dir: Annotated[Optional[str], typer.Option("--home", envvar="GPCTL_HOME",
                        help="Where runs live (default ./gpctl-runs).")] = None,
    version: Annotated[bool, typer.Option("--version", "-V", is_eager=True, callback=_print_version,
                                          help="Print gpctl's version and exit.")] = False,
) -> None:
    if home_dir is not None and not home_dir.strip():
        from gpctl.common import err
        err.print("error: --home is empty: give the folder where runs live (default ./gpctl-runs)", markup=False)
        raise typer.Exit(2)
    State.home = home(home_dir)
    if State.home.exists() and not State.home.is_dir():
        from gpctl.common import err
        err.print(f"error: {State.home}: not a folder (the home given by --home or $GPCTL_HOME)", markup=False)
        raise typer.Exit(2)
    private_files()


# ---------------------------------------------------------------- presets
app.add_typer(presetcheck.app, name="presets", rich_help_panel="Run")
app.add_typer(presetcheck.app, name="preset", hidden=True)   # `gpctl preset from-run RUN` reads naturally too


# ---------------------------------------------------------------- run
@run_app.command("preset")
@friendly
def run_preset(
    name: Annotated[str, typer.Argument(help="Preset name (see `gpctl presets`) or a .toml path.",
                                        autocompletion=complete_preset)],
    overrides: SetOpt = None,
    arm: Annotated[Optional[list[str]], typer.Option("--arm", help="Only these runs of the preset.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Block with progress until the runs end; exit 1 if any failed.")] = False,
    no_worker: Annotated[bool, typer.Option("--no-worker", help="Only enqueue; start no worker.")] = False,
    foreground: Annotated[bool, typer.Option("--foreground", help="Train here, one run after another, without the queue.")] = False,
    backend: Annotated[str, typer.Option("--backend", help="local (workers on this machine) or slurm (sbatch).")] = "local",
    partition: Annotated[str, typer.Option("--partition", help="Slurm partition.")] = "",
    gres: Annotated[str, typer.Option("--gres", help="Slurm generic resources, e.g. gpu:1.")] = "",
    time_limit: Annotated[str, typer.Option("--time", help="Slurm time limit, e.g. 04:00:00.")] = "",
    signal_before: Annotated[int, typer.Option("--signal-before", metavar="SECONDS",
                             help="Slurm: this long before the time limit the run checkpoints, stops and is requeued to resume (0: off).")] = 120,
    array: Annotated[bool, typer.Option("--array", help="Slurm: the runs as one job array (one squeue entry).")] = False,
    array_limit: Annotated[int, typer.Option("--array-limit", help="Slurm --array: at most this many runs at once (0: no cap).")] = 0,
    seeds: Annotated[Optional[str], typer.Option("--seeds", metavar="N|S1,S2",
                     help="Every arm with seeds 0..N-1 (or these seeds), named ARM-sK, grouped by arm.")] = None,
    sweep: Annotated[Optional[list[str]], typer.Option("--sweep", metavar="KEY=V1,V2",
                     help="Every arm at every point of the product of these values (repeatable), named like ARM-bs512-lr0.05.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the runs it would create, and stop.")] = False,
    priority: Annotated[int, typer.Option("--priority", help="Higher starts first (default 0; gpctl queue move changes it).")] = 0,
    after: Annotated[Optional[list[str]], typer.Option("--after", metavar="RUN|GROUP",
                     help="Start only when these runs (or every run of a group) ended done; fail if one fails.")] = None,
    retries: Annotated[int, typer.Option("--retries", help="Retry a failed attempt (not a diverged one) up to N times from its last checkpoint.")] = 0,
    notify: Annotated[Optional[str], typer.Option("--notify", metavar="CMD",
                      help="Shell command run when each run ends, fails, diverges, is lost or stalls "
                           "($GPCTL_RUN, $GPCTL_STATE, $GPCTL_LOSS, ...; see docs/runs.md).")] = None,
) -> None:
    """Queue the runs of a preset (and make sure a local worker serves them); prints the run ids."""
    if backend not in ("local", "slurm"):
        raise ConfigError(f"--backend must be local or slurm, got {backend!r}")
    from engine.presets import parse_seeds, parse_sweep
    if notify is not None:
        from engine.config import toml_string
        overrides = [*(overrides or []), f"notify={toml_string(notify)}"]   # TOML, whatever its characters
    check_int("--retries", retries, 0, 100)
    check_int("--priority", priority, -MAX_PRIORITY, MAX_PRIORITY)
    check_int("--array-limit", array_limit, 0, 100_000)
    seed_list = parse_seeds(seeds) if seeds is not None else None
    grid = parse_sweep(sweep or [])
    if dry_run:
        configs = ops.plan_runs(name, overrides or [], arm, seed_list, grid)
        print(plain_table(("run", "group", "seed", "lr", "batch", "steps"),
                          [[c.name, c.group or "-", str(c.seed), f"{c.lr:g}", str(c.batch_size), str(c.steps)]
                           for c in configs], left=2))
        print(f"{len(configs)} run(s); nothing created (--dry-run)")
        return
    deps = queue.resolve_after(after or [])
    if backend == "slurm":     # checked before any run is created: the values go into #SBATCH lines
        opts = slurm.SlurmOptions(partition, gres, time_limit, warn=signal_before, array_limit=array_limit)
        slurm.directive_path(State.home)
        planned = ops.plan_runs(name, overrides or [], arm, seed_list, grid)
        for cfg in planned:          # --gres against each run's gpus, and an array's one gpus
            slurm.check_gres(opts, cfg.gpus, cfg.name)
        if array and len({(cfg.gpus, cfg.nodes) for cfg in planned}) > 1:
            shapes = ", ".join(map(str, sorted({(c.gpus, c.nodes) for c in planned})))
            raise ConfigError(f"--array: the runs ask for (gpus, nodes) = {shapes}; "
                              "an array's runs share one job script (submit them without --array)")
    rds = ops.create_runs(name, overrides or [], State.home, arm, seed_list, grid,
                          backend="local" if foreground else backend)
    if foreground:
        for rd in rds:
            out.print(rd.id)
        states = train_in_foreground(rds, out)
    elif backend == "slurm":
        ids = queue.submit_slurm(rds, opts, array=array, after=deps, priority=priority)
        for rd, sid in zip(rds, ids):
            out.print(f"{rd.id}  slurm job {sid}")
        if not wait:
            return
        states = queue.wait_for(rds)
    else:
        try:
            queue.enqueue(rds, priority=priority, after=deps, retries=retries)
        except BaseException:           # a full or locked jobs.db: no run folder is left without its job
            ops.remove_runs(rds)
            raise
        for rd in rds:
            out.print(rd.id)
        if not no_worker and queue.ensure_worker():
            out.print(f"started a worker (log: {State.home / 'worker.log'})")
        if not wait:
            return
        states = queue.wait_for(rds)
    final_table(rds)
    if any(s not in states_.OK for s in states):
        raise typer.Exit(1)


def final_table(rds: list[RunDir], last: int = 20) -> None:
    """The runs' final losses, plain columns that never cut a run id (at any width, or piped)."""
    floor = None
    cells = []
    for rd in rds:
        s = rd.summary()
        floor = floor or _bayes(rd)
        cells.append([rd.id, s["state"], str(s["step"]), _f(_mean_last_losses(rd, last)), _f(s["eval_loss"]),
                      _f(s["eval_error"])])
    print("final losses")
    print(plain_table(("run", "state", "step", f"train loss (last {last} steps)", "eval loss", "eval error"),
                      cells, left=2))
    if floor:
        print(f"Bayes loss of the task: {floor:.4f}")


def _mean_last_losses(rd: RunDir, n: int) -> float | None:
    """Mean train loss of the last n steps: online, every batch is fresh data, so this is a test loss
    with far less noise than one step's."""
    losses = [r["loss"] for r in rd.train_records()][-n:]
    return sum(losses) / len(losses) if losses else None


def _bayes(rd: RunDir) -> float | None:
    evs, _ = rd.events()
    return next((e.get("bayes_loss") for e in evs if e["event"] == "start"), None)


# ---------------------------------------------------------------- ls / show / resume
LS_SORTS = ("created", "id", "state", "step", "loss", "eval_loss", "lr_time")


@app.command("ls")
@friendly
def ls(as_json: JsonOpt = False,
       as_csv: Annotated[bool, typer.Option("--csv", help="Comma-separated values, one row per run (for scripts).")] = False,
       state: Annotated[Optional[list[str]], typer.Option("--state", metavar="STATE",
                        help="Only runs in this state (repeatable): running, done, failed, unreadable, ...")] = None,
       preset: Annotated[Optional[str], typer.Option("--preset", help="Only runs of this preset.",
                         autocompletion=complete_preset)] = None,
       group: Annotated[Optional[str], typer.Option("--group", help="Only runs of this group (a family of seeds).")] = None,
       sort: Annotated[str, typer.Option("--sort", help=f"Order by one of: {', '.join(LS_SORTS)} (a leading - reverses).")] = "created",
       wide: Annotated[bool, typer.Option("--wide", "-w", help="Every column, however wide the terminal.")] = False,
       ) -> None:
    """List runs: state, step, last loss, eval loss, lr, batch, lr_time, samples, device, attempt, snap.
    Run ids are never cut; in a terminal the columns that do not fit its width are left out whole
    (stderr says which; --wide shows all); piped, every column."""
    key = sort.lstrip("-")
    if key not in LS_SORTS:
        raise ConfigError(f"--sort must be one of {', '.join(LS_SORTS)}, got {sort!r}")
    known = states_.SHOWN
    bad = [s for s in state or [] if s not in known]
    if bad:
        raise ConfigError(f"--state {bad[0]!r} is not a state; one of: {', '.join(known)}")
    store = JobStore.for_reading(State.home, lenient=True)
    if store.problem:
        print(f"warning: {store.problem}", file=sys.stderr)
    if store.writable:
        queue.sync(store)
    rows = []
    for rd in list_runs(State.home):
        row, job = rd.summary(), store.get(rd.id)
        row["state"] = states_.shown(row, job and job.state)
        row["job"] = job.state if job else None
        row["slurm_id"] = job.slurm_id if job else None
        row["attempts"] = job.attempts if job else 0
        row["imported"] = (rd.path / "imported.json").exists()   # read-only here (gpctl import)
        rows.append(row)
    store.close()
    rows = [r for r in rows if (not state or r["state"] in state) and (not preset or r["preset"] == preset)
            and (not group or r["group"] == group)]
    missing = [r for r in rows if r.get(key) is None]          # runs without a value go last, either way
    rows = sorted((r for r in rows if r.get(key) is not None), key=lambda r: r[key], reverse=sort.startswith("-"))
    rows += missing
    cols = ("id", "state", "device", "step", "samples", "lr_time", "lr", "batch", "last loss", "eval loss", "attempt",
            "snap")
    if as_json:
        print_json(rows)
        return
    if as_csv:
        import csv
        fields = ["id", "preset", "arm", "group", "state", "run_state", "job", "attempts", "device", "step", "steps", "samples", "lr_time",
                  "lr", "batch_size", "loss", "loss_ema", "eval_loss", "eval_error", "snap", "problem", "error"]
        w = csv.DictWriter(sys.stdout, fields, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        return
    cells = [[r["id"], r["state"] + (" (imported)" if r["imported"] else ""), r["device"] or "-", str(r["step"]), str(r["samples"]), _f(r["lr_time"], 1),
              f"{r['lr']:.4g}" if r["lr"] else "-", str(r["batch_size"] or "-"), _f(r["loss"]), _f(r["eval_loss"]),
              str(r["attempts"] or "-"), r.get("snap") or "-"] for r in rows]
    if not cells and not state and not preset and not group:
        print(f"no runs in {State.home / 'runs'} yet: gpctl run preset demo (gpctl presets lists them all)")
        return
    width = None if wide else _terminal_width()
    keep = fit_columns(cols, cells, width, LS_PRIORITY)
    err.print(f"runs in {State.home / 'runs'}" + (f"; {len(cols) - len(keep)} column(s) left out at {width} "
                                                   f"columns: {', '.join(c for c in cols if c not in keep)} "
                                                   f"(--wide shows all)" if len(keep) < len(cols) else ""),
              markup=False, highlight=False)
    idx = [cols.index(c) for c in keep]
    print(plain_table(tuple(keep), [[row[i] for i in idx] for row in cells], left=sum(i < 3 for i in idx)))


def _terminal_width() -> int | None:
    """stdout's terminal width; None when stdout is not a terminal (piped: every column)."""
    return shutil.get_terminal_size().columns if sys.stdout.isatty() else None


LS_PRIORITY = ("id", "state", "step", "last loss", "eval loss", "lr", "batch", "snap", "lr_time", "samples", "device", "attempt")


def fit_columns(cols: tuple[str, ...], cells: list[list[str]], width: int | None, priority: tuple[str, ...]) -> list[str]:
    """The columns of a plain_table that fit `width` (None: all), in the table's order: the first two
    in `priority` always (a run's id and state), then the others by priority while the line stays
    within the width."""
    if width is None:
        return list(cols)
    w = {c: max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(cols)}
    chosen, used = [], -2
    for c in priority:
        if len(chosen) >= 2 and used + 2 + w[c] > width:
            continue
        chosen.append(c)
        used += 2 + w[c]
    return [c for c in cols if c in chosen]


@app.command()
@friendly
def show(run: RunArg, as_json: JsonOpt = False,
         full_config: Annotated[bool, typer.Option("--config", help="Print the whole resolved config.toml too.")] = False,
         diff: Annotated[Optional[str], typer.Option("--diff", help="Another run: how the two differ in config, "
                                                     "code and environment.")] = None) -> None:
    """One run in full: state (and why, when a file is unreadable), progress, job and each attempt,
    the code it runs, how its config differs from its preset arm (or parent), checkpoints, events."""
    from gpctl.detail import diff_lines, run_info, run_lines
    rd = resolve(State.home, run)
    if diff is not None:
        for line in diff_lines(State.home, rd, resolve(State.home, diff)):
            out.print(line, markup=False)
        return
    info = run_info(State.home, rd)
    if as_json:
        print_json(info, default=str)
        return
    for line in run_lines(rd, info, full_config):
        out.print(line, markup=False)


@app.command()
@friendly
def lineage(run: Annotated[Optional[str], typer.Argument(help="A run (its tree only); none: every tree with a fork.")] = None,
            as_json: JsonOpt = False) -> None:
    """Which run was forked from which: trees of parents, forks and twins with their branch points
    (step, lr_time) and overrides, each run's state."""
    from dataclasses import asdict

    from gpctl.lineage import find, lineage as trees, lineage_text
    rid = resolve(State.home, run).id if run else None
    if as_json:
        roots = trees(State.home)
        print_json([asdict(r) for r in ([find(roots, rid)] if rid else roots)])
        return
    for line in lineage_text(State.home, rid):
        out.print(line, markup=False)


@app.command()
@friendly
def resume(run: RunArg,
           wait: Annotated[bool, typer.Option("--wait", help="Block until it ends.")] = False,
           foreground: Annotated[bool, typer.Option("--foreground", help="Train here instead of through the queue.")] = False) -> None:
    """Continue a run from its last checkpoint (re-enqueued; --foreground trains here)."""
    rd = resolve(State.home, run)
    if foreground:
        ops.resume_blocker(rd)
        states = train_in_foreground([rd], out, resume=True)
    else:
        out.print(ops.resume_job(State.home, rd))
        queue.ensure_worker()
        if not wait:
            return
        states = queue.wait_for([rd])
    final_table([rd])
    if states[0] not in states_.OK:
        raise typer.Exit(1)


@app.command()
def tui(poll: Annotated[float, typer.Option("--poll", help="Seconds between looks at the run directories.")] = 1.0,
        home_dir: Annotated[Optional[str], typer.Option("--home", help="Where runs live (the same as `gpctl --home X tui`).")] = None) -> None:
    """Live loss curves and steering in the terminal."""
    import math
    from gpctl.common import err
    if not (math.isfinite(poll) and 0.05 <= poll <= 3600):
        err.print(f"error: --poll must be seconds in [0.05, 3600], got {poll}", markup=False)
        raise typer.Exit(2)
    if home_dir is not None:
        if not home_dir.strip():
            err.print("error: --home is empty: give the folder where runs live", markup=False)
            raise typer.Exit(2)
        State.home = home(home_dir)
    from gpctl.tui.app import GpctlApp
    tui_app = GpctlApp(State.home, poll=poll)
    tui_app.run()
    if tui_app.return_code:     # it crashed: Textual printed the traceback above; say where it is kept
        from gpctl.common import err
        kept = f"its traceback is in {tui_app.crash_log}" if tui_app.crash_log else "its traceback is above"
        err.print(f"error: gpctl tui stopped on an unexpected error; {kept} (your runs are not affected)",
                  markup=False)
        raise typer.Exit(tui_app.return_code)


steer.register(app)  # after the core commands, so `gpctl --help` lists those first
compare.register(app)
export.register(app)
report.register(app)
queue.register(app)
repro.register(app)
data.register(app)


PANELS = {"Run": ("resume", "fork", "repro"), "Watch": ("ls", "show", "lineage", "logs", "tui"),
          "Steer": ("set", "drop", "raise", "stop", "checkpoint"), "Compare": ("tv", "plot", "figure", "export", "report", "import"),
          "Queue": ("worker", "cancel")}
EXAMPLES = {
    "ls": "gpctl ls --state running --sort loss   |   gpctl ls --json | jq '.[].id'",
    "show": "gpctl show demo-bs32 --config",
    "lineage": "gpctl lineage demo-bs32to512",
    "logs": "gpctl logs demo-bs32 -f",
    "tui": "gpctl tui --poll 0.5",
    "resume": "gpctl resume demo-bs32to512 --wait",
    "fork": "gpctl fork demo-bs512 --step 100 --set batch_size=32 --name bs32-at100",
    "repro": "gpctl repro --ci --out docs",
    "set": "gpctl set demo-bs512 lr=0.01 --wait",
    "drop": "gpctl drop demo-bs512 --batch-factor 16 --at-step 100 --twin",
    "raise": "gpctl raise demo-bs512 --lr-factor 10 --ramp 50",
    "stop": "gpctl stop demo-bs512 --wait",
    "checkpoint": "gpctl checkpoint demo-bs512 --when 'eval_loss<1.5'",
    "tv": "gpctl tv demo-bs32to512 demo-bs512 --match-loss --plot tv.png",
    "plot": "gpctl plot demo-bs32to512 demo-bs512 --x lr_time --out loss.png",
    "figure": "gpctl figure demo --out fig.png",
    "report": "gpctl report demo --out report_demo",
    "import": "gpctl --home laptop-runs import report_demo",
    "export": "gpctl export demo-bs32to512 demo-bs512 --format tensorboard --out tb && tensorboard --logdir tb",
    "worker": "gpctl worker --gpus 0,1 --jobs-per-gpu 2",
    "cancel": "gpctl cancel demo-bs512 --wait",
}
for _info in app.registered_commands:
    _name = _info.name or _info.callback.__name__.replace("_", "-")
    _info.rich_help_panel = next((p for p, names in PANELS.items() if _name in names), None)
    if _name in EXAMPLES:
        _info.epilog = f"Example: {EXAMPLES[_name]}"
    _info.context_settings = HELP


def main() -> None:
    try:
        app(prog_name="gpctl")   # also under `python -m gpctl`: completion and usage lines name `gpctl`
    except BrokenPipeError:      # a pipe closed outside a command's own handling (help text, typer's output)
        from gpctl.common import quiet_stdout
        quiet_stdout()
        sys.exit(0)


if __name__ == "__main__":
    sys.exit(main())
