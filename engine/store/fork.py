"""Fork a run at one of its checkpoints into a new run that shares its past.

The child starts from the parent's checkpoint — weights, optimizer, RNG, stream position, schedule
— with its `--set` overrides applied from its first step; its records continue the parent's clocks
(step, samples, lr_time), so plotted together the branch leaves the trunk at T0. With no overrides
it continues exactly as the parent would.
"""
from __future__ import annotations

from pathlib import Path

from engine.store.ckptmeta import read_meta
from engine.config import ConfigError, apply_overrides, build, to_dict
from engine.store.rundir import RunDir, new_run_id


def pick_checkpoint(parent: RunDir, step: int | None = None, lr_time: float | None = None) -> tuple[int, Path]:
    """The checkpoint at `step`, the one nearest `lr_time`, or the latest."""
    found = parent.list_checkpoints()
    if not found:
        raise ConfigError(f"run {parent.id} has no checkpoint to fork from")
    if step is not None:
        hit = [c for c in found if c[0] == step]
        if not hit:
            raise ConfigError(f"run {parent.id} has no checkpoint at step {step} "
                              f"(checkpoints: {', '.join(str(s) for s, _ in found)})")
        return hit[0]
    if lr_time is not None:
        return min(found, key=lambda c: abs(read_meta(c[1])["lr_time"] - lr_time))
    return found[-1]


def fork(root: Path, parent: RunDir, *, step: int | None = None, lr_time: float | None = None,
         overrides: list[str] = (), name: str | None = None, run_id: str | None = None) -> RunDir:
    at, path = pick_checkpoint(parent, step, lr_time)
    pcfg = parent.config()
    data = to_dict(pcfg)
    data = apply_overrides(data, list(overrides))
    data.update(name=name or f"{pcfg.name}-fork{at}", parent=parent.id, parent_checkpoint=str(path.resolve()),
                parent_overrides=list(overrides))
    cfg = build(data, f"fork of {parent.id}")
    child = RunDir.create(root, cfg, run_id=run_id or new_run_id(cfg.preset or "run", cfg.name))
    parent.append_event("forked", child=child.id, step=at, checkpoint=path.name, overrides=list(overrides))
    return child


def twin_name(parent_name: str, step: int) -> str:
    """The arm name of a run's unsteered twin forked at `step` (see engine.launch.twins)."""
    return f"{parent_name}-twin{step}"


def children(root: Path, run: RunDir) -> list[str]:
    from engine.store.rundir import list_runs

    out = []
    for rd in list_runs(root):
        try:
            if rd.config().parent == run.id:
                out.append(rd.id)
        except ConfigError:
            continue
    return out
