"""What a preset's arms will cost before they run: wall time and GPU-hours per arm, from a step time
measured on this machine.

The step time of an arm at a batch size is measured by a probe: the arm's own config, shortened to
PROBE_STEPS steps at that batch (no eval, no checkpoint), trained by the engine's own loop in a
temporary run directory on the chosen device; the time per step is read from the records' wall
clock after the first WARM steps (start-up, allocation, compilation). When the arm's data is not on
this machine the probe reads synthetic data of the same shape and says so. Each measurement is
cached in HOME/cache/step_times.json, keyed by everything that sets a step's cost (model, batch,
micro-batch, precision, compile, input shape, device, torch version).

An arm's time is the sum over its stretches at one batch size (planned changes move it) of steps ×
step time; GPU-hours are that time × the GPUs it asks for. Evals and checkpoints are not counted.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from engine.config import Config, to_dict
from engine.plan import Plan

PROBE_STEPS = 8
WARM = 3


@dataclass
class Cost:
    arm: str
    stretches: list[tuple[int, int, float]]   # (batch size, steps, seconds per step)
    gpus: int
    source: str                                 # where the step times come from

    @property
    def seconds(self) -> float:
        return sum(steps * sec for _, steps, sec in self.stretches)

    @property
    def gpu_hours(self) -> float:
        return self.seconds * self.gpus / 3600


def stretches(pl: Plan) -> list[tuple[int, int]]:
    """(batch size, steps) in order: the arm's planned batch changes cut it into stretches."""
    out, batch, at = [], pl.cfg.batch_size, 0
    for f in pl.fired:
        new = f.after[1]
        if new != batch and f.step > at:
            out.append((batch, f.step - at))
            at = f.step
        batch = new
    out.append((batch, pl.steps - at))
    merged: list[tuple[int, int]] = []
    for b, n in out:
        if n <= 0:
            continue
        if merged and merged[-1][0] == b:
            merged[-1] = (b, merged[-1][1] + n)
        else:
            merged.append((b, n))
    return merged


def key(cfg: Config, batch: int, device: str) -> str:
    """What sets a step's cost, as a short hash (the cache's key)."""
    import torch
    d = to_dict(cfg)
    what = {"model": d["model"], "batch": batch, "micro": cfg.micro_batch_size, "precision": cfg.precision,
            "compile": [cfg.compile, cfg.compile_mode], "device": device, "torch": torch.__version__,
            "input": [cfg.data.image_size, cfg.data.seq_len, cfg.is_lm], "optim": d["optim"]["name"]}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _probe_config(cfg: Config, batch: int, device: str) -> tuple[Config, str]:
    """The arm's config as a probe: PROBE_STEPS steps at `batch`, nothing else planned; synthetic
    data of the same shape when the arm's own is not here."""
    from engine.data import preflight
    from engine.errors import DataMissing
    c = copy.deepcopy(cfg)
    c.steps, c.batch_size, c.changes, c.eval_every, c.checkpoint_every = PROBE_STEPS, batch, [], 0, 0
    c.checkpoint_at_steps, c.checkpoint_at_lr_times, c.checkpoint_at_losses, c.max_lr_time = [], [], [], 0.0
    c.device, c.notify, c.name, c.preset = device, "", f"probe-{cfg.name}", "probe"
    c.micro_batch_size = cfg.micro_batch_size if cfg.micro_batch_size and batch % cfg.micro_batch_size == 0 else 0
    note = ""
    try:
        preflight(c)
    except DataMissing:
        c.data.source, c.data.path = ("synthetic_tokens" if cfg.is_lm else "synthetic_images"), ""
        note = " (synthetic data of the same shape: the arm's data is not here)"
    return c, note


def probe(cfg: Config, batch: int, device: str) -> tuple[float, str]:
    """Seconds per training step of `cfg` at `batch` on `device`, measured now; and a note."""
    from engine.store.rundir import RunDir
    from engine.train.loop import train
    c, note = _probe_config(cfg, batch, device)
    with tempfile.TemporaryDirectory(prefix="gpctl-probe-") as tmp:
        rd = RunDir.create(Path(tmp), c, run_id="probe")
        state = train(rd)
        recs = rd.train_records()
        if state != "done" or len(recs) < WARM + 2:
            raise RuntimeError(f"the probe of {cfg.name} at batch {batch} ended {state}: "
                               f"{rd.status().get('error') or 'too few records'}")
        a, b = recs[WARM], recs[-1]
        return (b["wall"] - a["wall"]) / (b["step"] - a["step"]), note


def step_times(cfg: Config, batches: list[int], device: str, home: Path | None,
               measure: Callable[[Config, int, str], tuple[float, str]] | None = None) -> dict[int, tuple[float, str]]:
    """{batch: (seconds per step, where it comes from)}: from the home's cache, else measured (by
    `measure`, the probe by default)."""
    measure = measure or probe
    path = home / "cache" / "step_times.json" if home else None
    cache: dict = {}
    if path and path.is_file():
        try:
            cache = json.loads(path.read_text())
        except (OSError, ValueError):
            cache = {}
    out, changed = {}, False
    for b in batches:
        k = key(cfg, b, device)
        hit = cache.get(k)
        if isinstance(hit, dict) and isinstance(hit.get("seconds"), (int, float)) and hit["seconds"] > 0:
            out[b] = (float(hit["seconds"]), f"cached probe on {device}{hit.get('note', '')}")
            continue
        sec, note = measure(cfg, b, device)
        cache[k] = {"seconds": sec, "note": note, "measured": time.time(), "arm": cfg.name, "batch": b}
        out[b], changed = (sec, f"probe on {device}{note}"), True
    if path and changed:
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
            os.replace(tmp, path)
        except OSError:
            pass      # a read-only home: measured, not kept
    return out


def cost(pl: Plan, device: str, home: Path | None,
         measure: Callable[[Config, int, str], tuple[float, str]] | None = None) -> Cost:
    parts = stretches(pl)
    times = step_times(pl.cfg, sorted({b for b, _ in parts}), device, home, measure)
    sources = sorted({src for _, src in times.values()})
    return Cost(pl.cfg.name, [(b, n, times[b][0]) for b, n in parts], max(1, pl.cfg.gpus), "; ".join(sources))
