"""`gpctl export`: runs' records out to the formats other tools read (CSV, Parquet, TensorBoard)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from engine.config import ConfigError
from engine.store.rundir import RunDir, resolve
from gpctl.common import State, complete_run, friendly, out

FORMATS = ("csv", "parquet", "tensorboard")
SCALARS = {"loss": "train/loss", "lr": "train/lr", "batch_size": "train/batch_size", "lr_time": "train/lr_time",
           "samples": "train/samples", "eval_loss": "eval/loss", "eval_error": "eval/error"}


def export_tables(rd: RunDir, out_dir: Path, fmt: str) -> list[Path]:
    """`<run>.metrics.<ext>` (every record, train and eval, one column per field) and
    `<run>.events.<ext>` (time, event, step, lr_time, the sentence, and the event as JSON)."""
    import json

    import pandas as pd

    from engine.control import event_text
    from gpctl.runs import METRIC_COLUMNS
    recs = rd.metrics()[0]
    metrics = pd.DataFrame(recs)
    metrics = metrics[[c for c in METRIC_COLUMNS if c in metrics] + [c for c in metrics if c not in METRIC_COLUMNS]]
    events = pd.DataFrame([{"time": e.get("time"), "event": e["event"], "step": e.get("step"),
                            "lr_time": e.get("lr_time"), "text": event_text(e), "json": json.dumps(e)}
                           for e in rd.events()[0]], columns=["time", "event", "step", "lr_time", "text", "json"])
    paths = []
    for name, df in (("metrics", metrics), ("events", events)):
        path = out_dir / f"{rd.id}.{name}.{fmt}"
        if fmt == "csv":
            df.to_csv(path, index=False)
        else:
            df.to_parquet(path, index=False)
        paths.append(path)
    return paths


def export_tensorboard(rd: RunDir, out_dir: Path) -> Path:
    """TensorBoard event files in `<out>/<run>/` through TensorBoard's own writer (via torch's
    SummaryWriter): scalars train/* and eval/* by step, and every event as text at its step, so
    `tensorboard --logdir OUT` shows where the noise changed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:   # tensorboard itself is an optional dependency
        raise ConfigError(f"--format tensorboard needs the tensorboard package ({e}); "
                          f"pip install 'gpctl[export]'") from None
    from engine.control import event_text
    log_dir = out_dir / rd.id
    w = SummaryWriter(log_dir=str(log_dir))
    try:
        start = rd.status().get("started") or 0.0
        for r in rd.metrics()[0]:
            for key, tag in SCALARS.items():
                if r.get(key) is not None and (key.startswith("eval") == ("eval_loss" in r)):
                    w.add_scalar(tag, r[key], global_step=r["step"], walltime=start + r.get("wall", 0.0))
        for e in rd.events()[0]:
            w.add_text("events", event_text(e), global_step=e.get("step") or 0, walltime=e.get("time"))
    finally:
        w.close()
    return log_dir


@friendly
def export(runs: Annotated[list[str], typer.Argument(help="Runs to export (ids or unique prefixes).",
                                                      autocompletion=complete_run)],
           fmt: Annotated[str, typer.Option("--format", "-f", help="csv, parquet or tensorboard.")] = "csv",
           out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder to write into (created if missing).")] = Path("export")) -> None:
    """Write runs' records and events as CSV, Parquet or TensorBoard event files.

    In a notebook, the same data as DataFrames: from gpctl import runs; runs.load(HOME).metrics()
    """
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    rds = [resolve(State.home, r) for r in runs]
    out_dir.mkdir(parents=True, exist_ok=True)
    for rd in rds:
        written = [export_tensorboard(rd, out_dir)] if fmt == "tensorboard" else export_tables(rd, out_dir, fmt)
        for p in written:
            out.print(f"wrote {p}", markup=False)
    if fmt == "tensorboard":
        out.print(f"view: tensorboard --logdir {out_dir}", markup=False)


def register(app: typer.Typer) -> None:
    app.command()(export)
