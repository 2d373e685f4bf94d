"""Replay: a preset that re-runs a steered run without anyone steering it.

    text = preset_from_run(rd)      # TOML: the run's config, its applied requests as planned changes

Every control request the run applied becomes a planned change at the step where it took effect,
marked `manual` so it acts exactly as the request did (an lr set by hand is exact from then on).
Checkpoint requests become `checkpoint_at_steps` (their eval records are part of the run's books).
Stops are left out: a stopped and resumed run equals one that never stopped. A fork keeps its parent
checkpoint and overrides, so its replay starts where it did. Trained on the same machine, the replay's
records equal the steered run's bit for bit (a test checks it).
"""
from __future__ import annotations

from engine.config import dump_toml, to_dict
from engine.store.rundir import RunDir


def replayed_changes(rd: RunDir) -> tuple[list[dict], list[int]]:
    """(planned changes, checkpoint steps) from the run's applied control requests, in order."""
    changes, checkpoints = [], []
    for ev in rd.events()[0]:
        if ev.get("event") != "control" or ev.get("status") != "applied":
            continue
        if ev.get("action") == "checkpoint":
            checkpoints.append(int(ev["step"]))
            continue
        changed = ev.get("changed") or {}
        if not changed:
            continue  # a stop
        ch = {"at_step": int(ev["step"]), "manual": True}
        if "lr" in changed:
            ch["lr"] = float(changed["lr"][1])
            if ev.get("ramp"):
                ch["ramp"] = float(ev["ramp"])
        if "batch_size" in changed:
            ch["batch_size"] = int(changed["batch_size"][1])
        changes.append(ch)
    return changes, checkpoints


def preset_from_run(rd: RunDir) -> str:
    cfg = to_dict(rd.config())
    arm = cfg.pop("name") or "replay"
    cfg.pop("preset", None)
    changes, checkpoints = replayed_changes(rd)
    cfg["changes"] = list(cfg.get("changes", [])) + changes
    cfg["checkpoint_at_steps"] = sorted(set(cfg.get("checkpoint_at_steps", [])) | set(checkpoints))
    head = (f"# Replay of run {rd.id}: its config, and the {len(changes)} control request(s) it applied as\n"
            f"# planned changes at the steps where they took effect (written by `gpctl presets from-run`).\n")
    meta = {"preset": {"figure": f"replay of {rd.id}",
                       "description": f"run {rd.id} with its applied requests as planned changes"}}
    base = {"runs": {arm: cfg}}
    return head + dump_toml(meta) + "\n" + dump_toml(base)
