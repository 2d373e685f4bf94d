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


def _torch_version() -> str:
    """torch's version without importing it (`gpctl queue` looks up step times and stays fast)."""
    from importlib import metadata
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        import torch
        return torch.__version__


def key(cfg: Config, batch: int, device: str) -> str:
    """What sets a step's cost, as a short hash (the cache's key)."""
    d = to_dict(cfg)
    what = {"model": d["model"], "batch": batch, "micro": cfg.micro_batch_size, "precision": cfg.precision,
            "compile": [cfg.compile, cfg.compile_mode], "device": device, "torch": _torch_version(),
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


def _cache_path(home: Path | None) -> Path | None:
    return home / "cache" / "step_times.json" if home else None


def _read_cache(path: Path | None) -> dict:
    if path and path.is_file():
        try:
            cache = json.loads(path.read_text())
            return cache if isinstance(cache, dict) else {}
        except (OSError, ValueError):
            return {}
    return {}


def _write_cache(path: Path, cache: dict) -> None:
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass      # a read-only home: measured, not kept


def _said(hit: dict, device: str) -> str:
    """Where a cached step time came from, in words."""
    if hit.get("run"):
        return f"recorded by run {hit['run']} on {device}"
    return f"cached probe on {device}{hit.get('note', '')}"


def step_times(cfg: Config, batches: list[int], device: str, home: Path | None,
               measure: Callable[[Config, int, str], tuple[float, str]] | None | bool = None
               ) -> dict[int, tuple[float, str]]:
    """{batch: (seconds per step, where it comes from)}: from the home's cache (a probe's, or what an
    earlier run of the same model and batch recorded: record_run), else measured (by `measure`, the
    probe by default; measure=False: not measured, the batch is left out)."""
    if measure is not False:
        measure = measure or probe
    path = _cache_path(home)
    cache = _read_cache(path)
    out, changed = {}, False
    for b in batches:
        k = key(cfg, b, device)
        hit = cache.get(k)
        if isinstance(hit, dict) and isinstance(hit.get("seconds"), (int, float)) and hit["seconds"] > 0:
            out[b] = (float(hit["seconds"]), _said(hit, device))
            continue
        if measure is False:
            continue
        sec, note = measure(cfg, b, device)
        cache[k] = {"seconds": sec, "note": note, "measured": time.time(), "arm": cfg.name, "batch": b}
        out[b], changed = (sec, f"probe on {device}{note}"), True
    if path and changed:
        _write_cache(path, cache)
    return out


def run_step_times(recs: list[dict], skip: int = WARM) -> dict[int, float]:
    """{batch: median seconds per step} from a run's train records (wall, step, batch_size): the
    differences of consecutive records within one attempt (wall never goes back) at one batch, the
    first `skip` records of each attempt and each stretch left out (start-up, compilation)."""
    import statistics
    per: dict[int, list[float]] = {}
    since = 0
    for a, b in zip(recs, recs[1:]):
        since += 1
        if b["wall"] <= a["wall"] or b["step"] <= a["step"] or a["batch_size"] != b["batch_size"]:
            since = 0             # another attempt (a resume) or a batch change: warm up again
            continue
        if since <= skip:
            continue
        per.setdefault(int(b["batch_size"]), []).append((b["wall"] - a["wall"]) / (b["step"] - a["step"]))
    return {bs: statistics.median(v) for bs, v in per.items() if len(v) >= 3}


def device_kind(device: str | None) -> str:
    """The cache's device word for a run's device ("cuda:1" -> "cuda")."""
    return "cuda" if str(device or "").startswith("cuda") else "cpu"


def record_run(home: Path, cfg: Config, recs: list[dict], device: str | None, run_id: str) -> dict[int, float]:
    """Keep what a finished run measured, per batch, where a probe's numbers are kept: later cost
    estimates and the queue's ETAs of the same model and batch use it (a probe's entry is replaced:
    a whole run is the better measurement). Returns what was kept."""
    got = run_step_times(recs)
    if not got:
        return {}
    path = _cache_path(home)
    cache = _read_cache(path)
    kind = device_kind(device)
    for b, sec in got.items():
        cache[key(cfg, b, kind)] = {"seconds": sec, "run": run_id, "measured": time.time(), "arm": cfg.name, "batch": b}
    _write_cache(path, cache)
    return got


def estimate(cfg: Config, home: Path, device: str, steps_left: int | None = None) -> tuple[float, str] | None:
    """(seconds, where from) for `cfg`'s steps (or its last `steps_left`) from cached step times
    only, never a probe; None when a batch it trains at has none."""
    from engine.plan import plan
    parts = stretches(plan(cfg))
    times = step_times(cfg, sorted({b for b, _ in parts}), device, home, measure=False)
    if any(b not in times for b, _ in parts):
        return None
    if steps_left is not None:                      # the last steps_left steps of the stretches
        drop, kept = sum(n for _, n in parts) - steps_left, []
        for b, n in parts:
            take = max(0, n - max(0, drop))
            drop -= n
            if take:
                kept.append((b, take))
        parts = kept
    return sum(n * times[b][0] for b, n in parts), "; ".join(sorted({src for _, src in times.values()}))


def cost(pl: Plan, device: str, home: Path | None,
         measure: Callable[[Config, int, str], tuple[float, str]] | None = None) -> Cost:
    parts = stretches(pl)
    times = step_times(pl.cfg, sorted({b for b, _ in parts}), device, home, measure)
    sources = sorted({src for _, src in times.values()})
    return Cost(pl.cfg.name, [(b, n, times[b][0]) for b, n in parts], max(1, pl.cfg.gpus), "; ".join(sources))
