"""A run's plan, without training: its schedule and its data stepped exactly as the loop steps them.

    p = plan(cfg)
    p.fired        each planned change with the step, lr_time and samples where it takes effect
    p.steps, p.samples, p.lr_time, p.final_lr      where and how the run ends
    p.epochs       passes over the arm's data (None for an endless synthetic stream)
    p.problems     why the run would not be the experiment its preset says it is

The loop below is the trainer's own arithmetic: `Schedule.due` then `Schedule.rates` at every
step boundary, `lr_time += base / lr_ref`, `ended()`; so a step printed here is the step at which the
run applies the change (a test checks this against a real run). It takes no model and no data.

A problem is one of:
  - a planned change that never fires before the run ends (it would be a silent no-op), or one that
    fires but changes nothing (its lr and batch size are the ones in force);
  - a warmup that does not end inside the run, or ends after a planned change (T0 would land in
    the warmup), and a ramp that does not end inside the run;
  - an online arm that draws more than `data.online_epochs` passes over a finite data set
    (online means every sample is fresh, "i.e., single epoch"), counted on the data on disk when it
    is there (CIFAR-5m's .npz headers, prepared C4 shards, ImageNet's train folders);
  - an offline subset larger than its data set, or one the arm sees fewer than twice (offline
    means repeated epochs);
  - a run that stops at `steps` before its `max_lr_time` (its LR-normalized horizon is not reached);
  - a cosine over `steps` cut short by `max_lr_time` (the arm is never annealed while others are).
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from engine.config import Change, Config, ConfigError
from engine.schedule import Schedule, advance, ended

# Training-set sizes of the real data sets, in samples (tokens for C4), for epoch accounting.
KNOWN_SIZES = {
    "cifar5m": 6_002_688,      # CIFAR-5m (Nakkiran et al.), part0 … part5; the eval set is cut from it
    "cifar10": 50_000,         # the train split (eval uses the test split)
    "imagenet": 1_281_167,     # ILSVRC-2012 train (eval uses val)
    "c4": 156_000_000_000,     # C4 en train: ~156B tokens (Dodge et al. 2021); a lower bound for GPT-2 BPE
}


@dataclass
class Fired:
    index: int          # position in cfg.changes
    change: Change
    step: int           # steps taken before it applies
    lr_time: float
    samples: int        # samples (tokens for LMs) seen before it applies
    changed: dict       # what changed: {"lr": [before, after], "batch_size": [...]}
    before: tuple[float, int] = (0.0, 0)   # (base lr, batch size) in force before it
    after: tuple[float, int] = (0.0, 0)    # (base lr it moves to, batch size) after it


@dataclass
class Plan:
    cfg: Config
    steps: int = 0
    samples: int = 0                 # samples (tokens for LMs) drawn by the end
    lr_time: float = 0.0
    final_lr: float = 0.0            # effective lr of the last step
    last_increment: float = 0.0      # lr_time the last step added (how far an end may overshoot)
    ended_by: str = "steps"          # "steps" | "max_lr_time"
    fired: list[Fired] = field(default_factory=list)
    unfired: list[int] = field(default_factory=list)
    data_size: int | None = None     # samples (tokens) the arm draws from; None = endless
    data_note: str = ""              # where data_size comes from
    source_size: int | None = None   # samples (tokens) of the whole data set an offline subset is cut from
    end_noise: tuple[float, int] = (0.0, 0)   # (base lr, batch size) at the end: the noise it lands on
    warmup_end: tuple[int, float] | None = None   # (step, lr_time) where the warmup ended; None: none
    problems: list[str] = field(default_factory=list)

    @property
    def epochs(self) -> float | None:
        return None if not self.data_size else self.samples / self.data_size


_PLANS: dict[str, Plan] = {}   # config JSON -> its plan: a preset's check and its arms' checks step each once


def plan(cfg: Config) -> Plan:
    """Step `cfg`'s schedule to the run's end (planned changes only; no control requests)."""
    import copy
    key = repr(cfg)      # a dataclass's repr names every field: equal configs, equal keys
    if key not in _PLANS:
        if len(_PLANS) > 256:
            _PLANS.clear()
        own = copy.copy(cfg)                  # the plan keeps its own changes (its Fired hold them);
        own.changes = [copy.copy(c) for c in cfg.changes]   # the rest it only reads, never keeps
        _PLANS[key] = _plan(own)
    q = copy.copy(_PLANS[key])   # the same numbers, for this (equal) config object
    q.cfg = cfg
    return q


def _plan(cfg: Config) -> Plan:
    p = Plan(cfg=cfg)
    sched = Schedule(cfg)
    tokens = cfg.data.seq_len if cfg.is_lm else 1
    step, samples, lr_time, lr, base = 0, 0, 0.0, 0.0, 0.0
    sc = cfg.schedule
    warm = sc.warmup_steps if sc.clock == "steps" else sc.warmup_lr_time
    hold = 0
    while not ended(cfg, step, lr_time):
        if warm and p.warmup_end is None and (step if sc.clock == "steps" else lr_time) >= warm - 1e-9 * warm:
            p.warmup_end = (step, lr_time)
        before = (sched.noise.base_lr, sched.batch_size)
        for i, ch, changed in sched.due(step, lr_time):
            p.fired.append(Fired(i, ch, step, lr_time, samples, changed, before,
                                 (sched.noise.base_lr, sched.batch_size)))
            before = (sched.noise.base_lr, sched.batch_size)
        lr, base = sched.rates(step, lr_time)
        samples += sched.batch_size * tokens
        lr_time += base / sched.lr_ref
        step += 1
        if hold:        # just after a jump: the event is within its margin; stepping is always exact
            hold -= 1
            continue
        k = _quiet(cfg, sched, step, lr_time, base / sched.lr_ref, warm if p.warmup_end is None else 0.0)
        if k > JUMP:     # a long stretch where nothing happens: taken in closed form (see _quiet)
            step, samples, lr_time = step + k, samples + k * sched.batch_size * tokens, advance(lr_time, base / sched.lr_ref, k)
            hold = 2     # _quiet's margin: it would answer 0 for these steps
    if warm and p.warmup_end is None and (step if sc.clock == "steps" else lr_time) >= warm - 1e-9 * warm:
        p.warmup_end = (step, lr_time)
    p.steps, p.samples, p.lr_time, p.final_lr = step, samples, lr_time, lr
    p.end_noise = (sched.noise.base_lr, sched.batch_size)
    p.last_increment = base / sched.lr_ref
    p.ended_by = "steps" if step >= cfg.steps else "max_lr_time"
    done = {f.index for f in p.fired}
    p.unfired = [i for i in range(len(cfg.changes)) if i not in done]
    p.data_size, p.data_note = data_size(cfg)
    if cfg.data.mode == "offline":
        p.source_size = source_size(cfg)[0]
    p.problems = _problems(p)
    return p


JUMP = 8   # steps: a quiet stretch longer than this is taken in one addition


def _quiet(cfg: Config, sched: Schedule, step: int, lr_time: float, inc: float, warm: float) -> int:
    """Steps from (step, lr_time) during which the loop above would only count: no ramp in progress,
    no planned change, no warmup end to record, no end, each step adding `inc` to lr_time; less a
    margin of 2 steps, so every event is still met by the stepped loop at its exact step. A jump of
    k steps adds inc to lr_time k times exactly as the trainer's float sum does (schedule.advance),
    so a plan still equals a real run's records bit for bit. A plan costs O(changes + binades), not
    O(steps): 10^9 steps or 20,000 changes in milliseconds (benchmarks/plan_speed.py)."""
    if sched.noise.ramp_len > 0 or inc <= 0:
        return 0
    bounds = [cfg.steps - step]
    at_step, at_time = sched.next_events()
    if at_step is not None:
        bounds.append(at_step - step)
    for target, slack in ((at_time, 1e-9 * max(1.0, abs(at_time or 0.0))),
                          (cfg.max_lr_time if cfg.max_lr_time > 0 else None, 1e-9 * max(1.0, cfg.max_lr_time)),
                          (warm if warm and cfg.schedule.clock == "lr_time" else None, 1e-9 * warm)):
        if target is not None:   # where `reached` (or the warmup's test) first holds, tolerance included
            bounds.append(int(max(0.0, (target - slack - lr_time) / inc)))
    if warm and cfg.schedule.clock == "steps":
        bounds.append(int(warm) - step)
    return max(0, min(bounds) - 2)


def _when(ch: Change) -> str:
    return f"at_step {ch.at_step}" if ch.at_step >= 0 else f"at_lr_time {ch.at_lr_time:g}"


def _problems(p: Plan) -> list[str]:
    cfg, out = p.cfg, []
    for i in p.unfired:
        out.append(f"changes[{i}] ({_when(cfg.changes[i])}) never fires: the run ends at step {p.steps}, "
                   f"lr_time {p.lr_time:.1f}")
    for f in p.fired:
        if f.before == f.after and "skipped" not in f.changed:
            out.append(f"changes[{f.index}] ({_when(f.change)}) changes nothing: lr {f.after[0]:g} and batch "
                       f"{f.after[1]} are already in force at step {f.step}")
        if f.change.ramp and f.change.lr and f.lr_time + f.change.ramp > p.lr_time + 1e-9 * max(1.0, p.lr_time):
            out.append(f"changes[{f.index}].ramp = {f.change.ramp:g} LR-normalized steps does not end inside the "
                       f"run: it starts at lr_time {f.lr_time:.1f}, the run ends at {p.lr_time:.1f}")
    sc = cfg.schedule
    warm, unit = (sc.warmup_steps, "steps") if sc.clock == "steps" else (sc.warmup_lr_time, "LR-normalized steps")
    if warm and p.warmup_end is None:
        key = "schedule.warmup_steps" if sc.clock == "steps" else "schedule.warmup_lr_time"
        out.append(f"'{key}' = {warm:g} {unit} does not end inside the run (it ends at step {p.steps}, "
                   f"lr_time {p.lr_time:.1f})")
    elif warm and p.fired and p.fired[0].step < p.warmup_end[0]:
        f = p.fired[0]
        key = "schedule.warmup_steps" if sc.clock == "steps" else "schedule.warmup_lr_time"
        out.append(f"'{key}' = {warm:g} {unit} runs past T0: changes[{f.index}] fires at step {f.step} "
                   f"(lr_time {f.lr_time:.1f}), the warmup ends at step {p.warmup_end[0]}")
    if cfg.max_lr_time > 0 and p.ended_by == "steps" and p.lr_time < cfg.max_lr_time - 1e-9:
        out.append(f"the horizon is not reached: 'steps' = {cfg.steps} ends the run at lr_time "
                   f"{p.lr_time:.1f}, before 'max_lr_time' = {cfg.max_lr_time:g}")
    sc = cfg.schedule
    if sc.kind == "cosine" and sc.clock == "steps" and p.ended_by == "max_lr_time":
        out.append(f"the cosine over 'steps' = {cfg.steps} is cut at step {p.steps} by 'max_lr_time' = "
                   f"{cfg.max_lr_time:g} (last lr {p.final_lr:.3g}, never annealed); "
                   f"use schedule.clock = \"lr_time\"")
    if cfg.data.mode == "online" and p.epochs is not None and p.epochs > cfg.data.online_epochs + 1e-12:
        unit = "tokens" if cfg.is_lm else "samples"
        out.append(f"the online arm repeats data: {p.samples:,} {unit} from {p.data_size:,} ({p.data_note}) "
                   f"is {p.epochs:.2f} epochs, more than 'data.online_epochs' = {cfg.data.online_epochs:g}")
    if cfg.data.mode == "offline":
        n = cfg.data.offline_size
        src, note = source_size(cfg)
        tokens = cfg.data.seq_len if cfg.is_lm else 1
        if src is not None and n * tokens > src:
            unit = f"sequences of {tokens} tokens" if cfg.is_lm else "samples"
            out.append(f"'data.offline_size' = {n:,} {unit} is more than the data set holds: "
                       f"{src // tokens:,} ({note})")
        elif p.epochs is not None and p.epochs < MIN_OFFLINE_EPOCHS:
            out.append(f"the offline arm sees its subset {p.epochs:.2f} times: offline means repeated epochs "
                       f"(at least {MIN_OFFLINE_EPOCHS:g}); lower 'data.offline_size' = {n:,} or train longer")
    return out


def compare_ends(plans: list[Plan]) -> list[str]:
    """Arms of one preset are compared on lr_time: they must end at the same LR-normalized time."""
    if len(plans) < 2:
        return []
    lo, hi = min(p.lr_time for p in plans), max(p.lr_time for p in plans)
    if hi - lo <= max(p.last_increment for p in plans) + 1e-9 * hi:
        return []
    ends = ", ".join(f"{p.cfg.name} {p.lr_time:.1f}" for p in plans)
    return [f"arms meant to be compared end at different LR-normalized times: {ends}"]


def check(cfg: Config, where: str) -> Config:
    """Raise ConfigError (one line) when the run would not be the experiment it says it is."""
    problems = plan(cfg).problems
    if problems:
        hint = " (lengthen the run, or --set changes=[] to run without it)" if "never fires" in problems[0] else ""
        raise ConfigError(f"{where}: {problems[0]}{hint}")
    return cfg


# ---------------------------------------------------------------- data accounting

MIN_OFFLINE_EPOCHS = 2.0       # an offline arm repeats its subset at least this often


def data_size(cfg: Config) -> tuple[int | None, str]:
    """(samples, or tokens for LMs, that the arm draws from; where that number comes from)."""
    dc = cfg.data
    tokens = dc.seq_len if cfg.is_lm else 1
    if dc.mode == "offline":
        return dc.offline_size * tokens, f"offline subset of {dc.offline_size:,}"
    return source_size(cfg)


def source_size(cfg: Config) -> tuple[int | None, str]:
    """(samples, or tokens for LMs, of the whole training set; where that number comes from): counted
    on disk when the data is there, else the published size, and the note says which."""
    dc = cfg.data
    if dc.source.startswith("synthetic"):
        return None, "endless synthetic stream"
    if dc.source == "cifar5m":
        local = _cifar5m_local(dc.path or "~/data/cifar5m")
        total, note = (local, "the parts on disk") if local else (KNOWN_SIZES["cifar5m"], "CIFAR-5m's published size")
        return total - dc.eval_samples, f"{note} less {dc.eval_samples:,} held out"
    if dc.source == "c4":
        local = _c4_prepared_tokens(dc.path, dc.seq_len)
        if local is not None:
            return local, f"the prepared shards in {dc.path}"
        return KNOWN_SIZES["c4"], "C4 en train's published size, ~156B tokens"
    if dc.source == "imagenet":
        folder = dc.path or "~/data/imagenet"
        local = _imagenet_local(folder)
        if local:
            prepared = (Path(os.path.expanduser(folder)) / "meta.json").is_file()
            return local, "the prepared train shards" if prepared else "the train folders on disk"
        return KNOWN_SIZES["imagenet"], "ImageNet train's published size"
    return KNOWN_SIZES[dc.source], "CIFAR-10 train"


def _c4_prepared_tokens(path: str, seq_len: int) -> int | None:
    """Tokens the training split of prepared shards (meta.json) gives, in whole seq_len blocks as the
    stream reads them; None when `path` holds no prepared shards (raw text is not counted)."""
    import json
    folder = Path(os.path.expanduser(path)) if path else None
    if folder is None or not (folder / "meta.json").is_file():
        return None
    try:
        meta = json.loads((folder / "meta.json").read_text())
        n = int(meta["splits"]["train"]["tokens"])
    except (OSError, ValueError, KeyError, TypeError):
        return None   # unreadable: the published size; training reports the real error
    return (n // seq_len) * seq_len


_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _imagenet_local(path: str) -> int:
    """Images in ImageNet's train/<class>/ folders at `path`, or in its prepared train shards
    (meta.json); 0 if there are none."""
    import json
    meta = Path(os.path.expanduser(path)) / "meta.json"
    if meta.is_file():
        try:
            return int(json.loads(meta.read_text())["splits"]["train"]["count"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0   # unreadable: the published size; training reports the real error
    root = Path(os.path.expanduser(path)) / "train"
    total = 0
    try:
        for cls in os.scandir(root):
            if cls.is_dir():
                total += sum(1 for f in os.scandir(cls.path) if f.name.lower().endswith(_IMAGE_SUFFIXES))
    except OSError:
        return 0
    return total


def _cifar5m_local(path: str) -> int:
    """Images in the CIFAR-5m parts at `path` (read from the .npy headers; 0 if none are there)."""
    import numpy as np

    def header(f) -> int:
        version = np.lib.format.read_magic(f)
        return int((np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                    else np.lib.format.read_array_header_2_0(f))[0][0])

    total, root = 0, Path(os.path.expanduser(path))
    npz = {p.name[: -len(".npz")]: p for p in root.glob("part*.npz")}
    npy = {p.name[: -len(".Y.npy")]: p for p in root.glob("part*.Y.npy") if (p.parent / p.name.replace(".Y.", ".X.")).exists()}
    for stem in sorted(set(npz) | set(npy)):      # a part in both forms counts once, as the loader reads it
        try:
            if stem in npy:
                with open(npy[stem], "rb") as f:
                    total += header(f)
            else:
                with zipfile.ZipFile(npz[stem]) as z, z.open("Y.npy") as f:
                    total += header(f)
        except (OSError, KeyError, ValueError, zipfile.BadZipFile):
            return 0  # unreadable: fall back to the published size; training reports the real error
    return total
