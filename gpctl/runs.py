"""Plain functions behind the CLI commands, and a small read API for notebooks.

    from gpctl import runs
    home = runs.load("gpctl-runs")              # or runs.load() for $GPCTL_HOME / ./gpctl-runs
    df = home.metrics()                         # one row per record: run, arm, family, seed, step, ...
    ev = home.events()                          # one row per event, with its sentence
    home.info()                                 # one row per run: what `gpctl ls --json` shows

It reads through engine/store/rundir.py, the same readers `ls` and the TUI use: an unreadable line is
skipped, never fatal, and the run's `problem` says so in info().
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from engine.config import Config, ConfigError
from engine.errors import DataMissing
from engine.presets import Preset, load_preset
from engine.store.rundir import RunDir, home as default_home, list_runs, resolve

if TYPE_CHECKING:
    import pandas as pd

METRIC_COLUMNS = ["step", "samples", "lr_time", "wall", "lr", "batch_size", "loss", "eval_loss", "eval_error",
                  "unique_samples"]
RUN_COLUMNS = ["run", "preset", "arm", "family", "seed", "parent", "group"]


def check_data(preset: Preset, configs: list[Config]) -> None:
    """Stop before anything is created if a real preset's data is missing, naming the CPU twin."""
    for cfg in configs:
        try:
            from engine.data import preflight
            preflight(cfg)
        except DataMissing as e:
            twin = f"; or run its CPU twin: gpctl run preset {preset.twin}" if preset.twin and \
                preset.twin != preset.name else ""
            raise DataMissing(f"{preset.name}: {e}{twin}") from None


def data_missing(cfg: Config) -> str | None:
    """The one line `gpctl run` would stop with for this arm's data, or None when it is there."""
    from engine.data import preflight
    try:
        preflight(cfg)
    except DataMissing as e:
        return str(e)
    return None


def data_status(cfg: Config) -> dict:
    """What data an arm reads and whether it is there: {source, path, missing (the one line, or
    None), bytes on disk (None for synthetic data or when absent)}. Looks at files only."""
    import os

    dc = cfg.data
    default = {"cifar5m": "~/data/cifar5m", "cifar10": "~/data", "imagenet": "~/data/imagenet", "c4": "~/data/c4"}
    if dc.source.startswith("synthetic"):
        return {"source": dc.source, "path": "", "missing": None, "bytes": None}
    path = Path(os.path.expanduser(dc.path or default.get(dc.source, "")))
    missing = data_missing(cfg)
    size = None
    if missing is None and path.is_dir():
        size = 0
        for root, _, files in os.walk(path):
            for f in files:
                try:
                    size += os.stat(os.path.join(root, f)).st_size
                except OSError:
                    pass
    return {"source": dc.source, "path": str(path), "missing": missing, "bytes": size}


def plan_runs(name: str, overrides: list[str], arms: list[str] | None = None, seeds: list[int] | None = None,
              sweep: dict[str, list[str]] | None = None) -> list[Config]:
    """The configs `gpctl run preset` would create (checked; nothing is written)."""
    preset = load_preset(name, check=False)  # the arms are checked below, with the overrides
    configs = preset.configs(overrides, arms, seeds=seeds, sweep=sweep)
    check_data(preset, configs)
    return configs


def create_runs(name: str, overrides: list[str], root: Path, arms: list[str] | None = None,
                seeds: list[int] | None = None, sweep: dict[str, list[str]] | None = None,
                backend: str = "local") -> list[RunDir]:
    """The preset's runs, created all or none (a failure part way removes those made)."""
    made: list[RunDir] = []
    configs = plan_runs(name, overrides, arms, seeds, sweep)
    if backend != "slurm":
        check_local(configs)
    try:
        for cfg in configs:
            made.append(RunDir.create(root, cfg))
    except BaseException:
        remove_runs(made)
        raise
    return made


def check_local(configs: list[Config]) -> None:
    """Refuse, before anything is created, what only Slurm can run: a run over several nodes."""
    for cfg in configs:
        if cfg.nodes > 1:
            raise ConfigError(f"{cfg.name}: nodes = {cfg.nodes} spans several machines, which only the Slurm "
                              f"backend starts (--backend slurm), or set nodes=1")


def remove_runs(rds: list[RunDir]) -> None:
    """Remove run folders that were just made and never queued (a create or enqueue that failed)."""
    import shutil
    for rd in rds:
        shutil.rmtree(rd.path, ignore_errors=True)


def family(arm: str, group: str = "") -> str:
    """The seed family a run belongs to: its group (`--seeds`, `--sweep`: `bs512-lr0.05-s1` is a
    seed of `bs512-lr0.05`) or, for runs made without one, its arm less a seed suffix (`high`,
    `high_s2` and `bs512_seed2` are seeds of `high` and `bs512`, as the presets and `gpctl repro` name them)."""
    if group:
        return group.split(".", 1)[-1]
    return re.sub(r"[_-](s|seed)\d+$", "", arm)


class Runs:
    """Some runs of one home, read as pandas DataFrames (pandas is imported on first use)."""

    def __init__(self, rds: list[RunDir]):
        self.rds = rds

    def __len__(self) -> int:
        return len(self.rds)

    @property
    def ids(self) -> list[str]:
        return [rd.id for rd in self.rds]

    def _labels(self, rd: RunDir) -> dict:
        try:
            cfg = rd.config()
            return {"run": rd.id, "preset": cfg.preset, "arm": cfg.name, "family": family(cfg.name, cfg.group),
                    "seed": cfg.seed, "parent": cfg.parent or None, "group": cfg.group or None}
        except ConfigError:
            return {"run": rd.id, "preset": None, "arm": None, "family": None, "seed": None, "parent": None,
                    "group": None}

    def info(self) -> "pd.DataFrame":
        import pandas as pd
        rows = [{**self._labels(rd), **{k: v for k, v in rd.summary().items() if k not in ("id", "preset", "arm")}}
                for rd in self.rds]
        return pd.DataFrame(rows)

    def metrics(self) -> "pd.DataFrame":
        """Every step and eval record; `kind` is "train" or "eval"."""
        import pandas as pd
        frames = []
        for rd in self.rds:
            recs = rd.metrics()[0]
            if not recs:
                continue
            df = pd.DataFrame(recs)
            df.insert(0, "kind", ["eval" if "eval_loss" in r else "train" for r in recs])
            for i, (k, v) in enumerate(self._labels(rd).items()):
                df.insert(i, k, v)
            frames.append(df)
        if not frames:
            return pd.DataFrame(columns=RUN_COLUMNS + ["kind"] + METRIC_COLUMNS)
        df = pd.concat(frames, ignore_index=True)
        return df[RUN_COLUMNS + ["kind"] + [c for c in df.columns if c not in RUN_COLUMNS + ["kind"]]]

    def events(self) -> "pd.DataFrame":
        """Every event, with `text` the sentence `gpctl show` prints."""
        import pandas as pd

        from engine.control import event_text
        rows = [{"run": rd.id, "time": e.get("time"), "event": e["event"], "step": e.get("step"),
                 "lr_time": e.get("lr_time"), "text": event_text(e)} for rd in self.rds for e in rd.events()[0]]
        return pd.DataFrame(rows, columns=["run", "time", "event", "step", "lr_time", "text"])


def load(home: str | Path | None = None, runs: list[str] | None = None, preset: str | None = None) -> Runs:
    """The runs of a home (default $GPCTL_HOME or ./gpctl-runs): all, those named (ids or unique
    prefixes), or those of one preset."""
    root = default_home(home)
    rds = [resolve(root, r) for r in runs] if runs else list_runs(root)
    if preset:
        rds = [rd for rd in rds if Runs([rd])._labels(rd)["preset"] == preset]
    return Runs(rds)


# ------------------------------------------------------------------ operations both faces call


def resume_blocker(rd: RunDir) -> None:
    """Raise ConfigError (one line) when `rd` cannot be resumed: it is done, or it has records but no
    checkpoint and cannot start again from its beginning (engine/store/rundir.py restart_blocker)."""
    origin = rd.imported()
    if origin is not None:
        raise ConfigError(f"run {rd.id} was imported from {origin.get('from', 'a report')} and is read-only here: "
                          f"it resumes in the home it ran in (or fork it: gpctl fork {rd.id})")
    if rd.status().get("state") == "done":
        raise ConfigError(f"run {rd.id} is already done (step {rd.summary()['step']})")
    if not rd.list_checkpoints() and rd.metrics_size() > 0:
        from engine.store.rundir import restart_blocker
        why = restart_blocker(rd)
        if why:
            raise ConfigError(f"run {rd.id} has records but no checkpoint in {rd.checkpoints}: it cannot resume: "
                              f"{why} (its records are kept; fork it or start a new run)")


def resume_job(home: Path, rd: RunDir) -> str:
    """Queue `rd` to continue from its last checkpoint (or, lost before its first, to start again from
    its beginning); the sentence that says which. What `gpctl resume` and the TUI's `u` both do.
    Raises ConfigError when it cannot (resume_blocker; already queued or running)."""
    from engine.store.jobs import JobStore
    resume_blocker(rd)
    restart = not rd.list_checkpoints() and rd.metrics_size() > 0
    store = JobStore(home)
    try:
        job = store.get(rd.id)
        if job and job.state == "running" and _stranded(store, job):   # its process and worker are gone
            store.finish(job.id, "lost", error="its process and its worker were gone (found by gpctl resume)")
            job = store.get(rd.id)
        if job and job.state in ("queued", "running"):
            raise ConfigError(f"run {rd.id} is already {job.state}")
        store.enqueue(rd.id, rd.path, gpus=rd.config().gpus, resume=True)
    finally:
        store.close()
    return (f"{rd.id}: queued to resume from its last checkpoint" if not restart else
            f"{rd.id}: queued to start again from its beginning (lost before its first checkpoint; "
            f"its records so far are dropped)")


def _stranded(store, job) -> bool:
    """A local job recorded `running` whose process and worker are both gone from this host (a
    worker that died on a full disk never recorded its end): nothing will ever end it but this."""
    import socket

    from engine.fs import pid_alive
    if job.backend != "local" or job.host != socket.gethostname():
        return False
    worker = next((w for w in store.workers() if w["id"] == job.worker), None)
    worker_alive = worker is not None and not worker["stopped"] and pid_alive(worker["pid"])
    return not pid_alive(job.pid) and not worker_alive


# The snap's reference and control and a figure's axis live in engine/analysis (the worker announces
# snaps too); imported when used, so that `gpctl --help` never loads numpy.
def latest_runs(home: Path, preset: str) -> dict[str, RunDir]:
    from engine.store.rundir import latest_runs as newest
    return newest(home, preset)


def figure_axis(p, x: str | None) -> str:
    from engine.analysis.curves import figure_axis as axis
    return axis(p, x)


def measure_snap(home: Path, rd: RunDir, ref: RunDir | None = None, control: RunDir | None = None,
                 x: str | None = None) -> dict:
    """`gpctl snap` and the TUI's S (engine.analysis.snap.measure)."""
    from engine.analysis.snap import measure
    return measure(home, rd, ref, control, x)

