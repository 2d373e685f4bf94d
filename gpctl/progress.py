"""Foreground training with one Rich progress bar per run."""
from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from engine.store.rundir import RunDir


def train_in_foreground(rds: list[RunDir], console: Console, resume: bool = False) -> list[str]:
    states = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("last loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        tasks = {rd.id: progress.add_task(rd.id, total=rd.config().steps, loss="-") for rd in rds}

        for rd in rds:
            task = tasks[rd.id]

            def update(t, task=task) -> None:   # t: engine.train.loop.Trainer
                loss = t.last_record.get("loss")
                progress.update(task, completed=t.step, loss=f"{loss:.4f}" if loss is not None else "-")

            from engine.train.loop import train   # torch: only when training here
            state = train(rd, resume=resume, on_progress=update)
            progress.update(task, description=f"{rd.id} [{state}]")
            states.append(state)
    return states
