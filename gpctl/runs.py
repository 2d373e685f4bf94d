"""Plain functions behind the CLI commands, and a small read API for notebooks.

    from gpctl import runs
    home = runs.load("gpctl-runs")              # or runs.load() for $GPCTL_HOME / ./gpctl-runs
    df = home.metrics()                         # one row per record: run, arm, family, seed, step, ...
    ev = home.events()                          # one row per event, with its sentence
    home.info()                                 # one row per run: what `gpctl ls --json` shows

It reads through engine/rundir.py, the same readers `ls` and the TUI use: an unreadable line is
skipped, never fatal, and the run's `problem` says so in info().
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from engine.config import Config, ConfigError
from engine.errors import DataMissing
from engine.presets import Preset, load_preset
from engine.rundir import RunDir, home as default_home, list_runs, resolve

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


def plan_runs(name: str, overrides: list[str], arms: list[str] | None = None, seeds: list[int] | None = None,
              sweep: dict[str, list[str]] | None = None) -> list[Config]:
    """The configs `gpctl run preset` would create (checked; nothing is written)."""
    preset = load_preset(name, check=False)  # the arms are checked below, with the overrides
    configs = preset.configs(overrides, arms, seeds=seeds, sweep=sweep)
    check_data(preset, configs)
    return configs


def create_runs(name: str, overrides: list[str], root: Path, arms: list[str] | None = None,
                seeds: list[int] | None = None, sweep: dict[str, list[str]] | None = None) -> list[RunDir]:
    """The preset's runs, created all or none (a failure part way removes those made)."""
    made: list[RunDir] = []
    try:
        for cfg in plan_runs(name, overrides, arms, seeds, sweep):
            made.append(RunDir.create(root, cfg))
    except BaseException:
        remove_runs(made)
        raise
    return made


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
