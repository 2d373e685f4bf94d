"""What a preset compares, and the proof that its arms differ in nothing else.

A figure compares arms that differ in one noise knob. A preset says so in its [preset] table:

    compares  = "batch_size"           # the knob(s) the arms may differ in: batch_size | lr | mode
    reference = "bs512"                # the constant arm the changed arms land on (the low-noise arm
                                       # for a drop, the high-noise arm for a raise)
    direction = "drop"                 # what every planned change does: drop | raise (noise)
    baselines = ["bs512_seed2"]        # seeds of the reference (or {seed_arm = "arm"} for other arms)
    departs   = { "schedule.warmup_lr_time" = "why" }   # departures from App. A, by key, with reasons

`check(preset)` returns findings, each with a level ("error": the preset is not its experiment;
"declared": a departure the preset names, printed, not refused), the key, the arms and their
values. The rules:

  - every arm equals the reference in every key that changes what is trained, except the declared
    knobs (`batch_size`; `lr`; `mode`: data.mode and the offline subset) and the seed of a baseline;
    keys that change only how fast or how often it is watched (device, compile, eval_every,
    checkpoints, ...) may differ. `steps` may differ on an lr figure (arms there end at the same
    LR-normalized time, which engine/plan.py proves), `micro_batch_size` and `noise_micro` where the
    model has no BatchNorm (accumulation is then exact);
  - each planned change moves the noise in the declared direction, and a changed arm ends at the
    reference's noise (lr to a relative 1e-9, batch exactly); the reference itself never changes;
  - an lr figure names `lr_ref` in the preset (else every arm's clock counts in its own lr);
  - baselines differ from their arm in the seed only, and in it; offline arms share one subset size;
  - every arm's own plan (engine/plan.py) has no problem.
Presets with one arm compare nothing and need no declaration.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.config import Config, ConfigError, to_dict

KNOBS = {"batch_size": ("batch_size",), "lr": ("lr",), "mode": ("data.mode", "data.offline_size")}
DIRECTIONS = ("drop", "raise")

# Keys that change how a run is executed or watched, never what it trains.
NEUTRAL = {
    "name", "preset", "group", "notify", "parent", "parent_checkpoint", "parent_overrides", "changes",
    "device", "gpus", "nodes", "gpu_memory", "threads", "compile", "compile_mode", "compile_backend",
    "channels_last", "model.pad_vocab", "model.attention", "log_every", "eval_every", "checkpoint_every", "checkpoint_at_steps",
    "checkpoint_at_lr_times", "checkpoint_at_losses", "checkpoint_loss_tol", "data.workers", "data.hold",
    "noise_scale",
    "control.max_lr_factor", "control.max_batch_size", "control.share_with_group", "control.poll_ms",
}
_BATCHNORM_MODELS = ("resnet18",)     # models whose forward depends on the micro-batch


@dataclass
class Contract:
    compares: tuple[str, ...] = ()
    reference: str = ""
    direction: str = ""
    baselines: dict[str, str] = field(default_factory=dict)   # seed arm -> the arm it is a seed of
    departs: dict[str, str] = field(default_factory=dict)     # key -> reason

    @property
    def declared(self) -> bool:
        return bool(self.compares)


@dataclass
class Finding:
    level: str                 # "error" | "declared"
    key: str                   # the config key (or "preset.<key>") the finding is about
    arms: list[str]
    values: list
    message: str
    reason: str = ""           # for "declared": the preset's reason

    def line(self) -> str:
        return self.message + (f" (declared: {self.reason})" if self.reason else "")

    def as_json(self) -> dict:
        return {"level": self.level, "key": self.key, "arms": self.arms, "values": self.values,
                "message": self.message, **({"reason": self.reason} if self.reason else {})}


def parse(meta: dict, arms: list[str], where: str) -> Contract:
    """The [preset] table's comparison keys, checked against the preset's arms (one-line errors)."""
    c = Contract()
    compares = meta.get("compares", [])
    compares = [compares] if isinstance(compares, str) else compares
    if not isinstance(compares, list) or not all(isinstance(k, str) for k in compares):
        raise ConfigError(f"{where}: 'preset.compares' must be a knob or a list of knobs ({', '.join(KNOBS)})")
    for k in compares:
        if k not in KNOBS:
            raise ConfigError(f"{where}: 'preset.compares' = {k!r} is not one of {', '.join(KNOBS)}")
    c.compares = tuple(compares)
    for key in ("reference", "direction"):
        v = meta.get(key, "")
        if not isinstance(v, str):
            raise ConfigError(f"{where}: 'preset.{key}' must be a string")
        setattr(c, key, v)
    if c.reference and c.reference not in arms:
        raise ConfigError(f"{where}: 'preset.reference' = {c.reference!r} is not an arm (runs: {', '.join(arms)})")
    if c.direction and c.direction not in DIRECTIONS:
        raise ConfigError(f"{where}: 'preset.direction' = {c.direction!r} is not one of {', '.join(DIRECTIONS)}")
    if c.compares and not c.reference:
        raise ConfigError(f"{where}: 'preset.compares' needs 'preset.reference' (the arm the others are compared with)")
    base = meta.get("baselines", [])
    if isinstance(base, list) and all(isinstance(b, str) for b in base):
        c.baselines = {b: c.reference for b in base}
    elif isinstance(base, dict) and all(isinstance(v, str) for v in base.values()):
        c.baselines = dict(base)
    else:
        raise ConfigError(f"{where}: 'preset.baselines' must be a list of arms (seeds of the reference) "
                          f"or a table seed_arm = \"arm\"")
    for seed_arm, of in c.baselines.items():
        for a in (seed_arm, of):
            if a not in arms:
                raise ConfigError(f"{where}: 'preset.baselines' names {a!r}, which is not an arm "
                                  f"(runs: {', '.join(arms)})")
    departs = meta.get("departs", {})
    if not isinstance(departs, dict) or not all(isinstance(v, str) and v.strip() for v in departs.values()):
        raise ConfigError(f"{where}: 'preset.departs' must be a table key = \"reason\"")
    c.departs = dict(departs)
    return c


def flat(cfg: Config, memo: dict | None = None) -> dict:
    """The config as dotted keys (lists kept whole). memo (id -> dict, for configs that live as long
    as it): the reference is flattened once for all the arms compared with it."""
    if memo is not None:
        if id(cfg) not in memo:
            memo[id(cfg)] = (cfg, flat(cfg))    # the config is kept with it: its id stays its own
        return memo[id(cfg)][1]
    out: dict = {}

    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[prefix + k] = v
    walk(to_dict(cfg), "")
    return out


def recipe(cfg: Config) -> str:
    """A short fingerprint of what a run trains, less its seed and name: seeds of one arm share it,
    a run with any other difference (a raised lr, another length) does not."""
    import hashlib
    import json
    kept = {k: v for k, v in flat(cfg).items() if k not in NEUTRAL and k != "seed"}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _close(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return abs(float(a) - float(b)) <= 1e-9 * max(abs(float(a)), abs(float(b)))
        except (TypeError, ValueError):
            return False
    return a == b


class _Collect:
    def __init__(self, contract: Contract):
        self.contract, self.found = contract, []

    def add(self, key: str, arms: list[str], values: list, message: str, excusable: bool = True) -> None:
        """excusable: a departure the preset may declare (preset.departs); never the comparison itself
        (where a change lands, its direction, a baseline's seed, lr_ref)."""
        reason = self.contract.departs.get(key, "") if excusable else ""
        self.found.append(Finding("declared" if reason else "error", key, arms, values, message, reason))


@dataclass
class Run:
    arm: str
    point: str               # the sweep point's label ("" without a sweep)
    cfg: Config
    lr_ref_given: bool       # the preset (or an override) names lr_ref, rather than the arm's lr standing in


def check(contract: Contract, runs: list[Run], where: str = "", seeded: bool = False) -> list[Finding]:
    """Findings for the runs of one preset. The arms of each sweep point are compared with the
    reference at the same point (and the same seed). seeded: the seeds are set for every arm
    (--seeds, [sweep] seeds): a seed family gives the spread, and a baseline arm's seed is not its own."""
    from engine.plan import plan

    out = _Collect(contract)
    arms = list(dict.fromkeys(r.arm for r in runs))
    if len(arms) < 2:
        return out.found
    if not contract.declared:
        out.add("preset.compares", arms, [], f"the preset compares {len(arms)} arms but does not say in "
                "what: set preset.compares (batch_size, lr or mode), preset.reference and, for changes, "
                "preset.direction")
        return out.found
    plans = {id(r.cfg): plan(r.cfg) for r in runs}
    for point in dict.fromkeys(r.point for r in runs):
        _check_point(contract, [(r.arm, r.cfg) for r in runs if r.point == point], plans, out, seeded)
    _check_lr_ref(contract, runs, out)
    matched = {f.key for f in out.found}
    for key, reason in contract.departs.items():   # declared departures with nothing to excuse: shown
        if key not in matched:
            out.found.append(Finding("declared", key, [], [], f"departs from App. A in '{key}'", reason))
    # each finding once: sweep points and seeds repeat the same difference
    seen, unique = set(), []
    for f in out.found:
        sig = (f.level, f.key, tuple(f.arms), repr(f.values))
        if sig not in seen:
            seen.add(sig)
            unique.append(f)
    return unique


def _check_point(contract: Contract, at: list[tuple[str, Config]], plans: dict, out: _Collect,
                 seeded: bool = False) -> None:
    refs = [cfg for a, cfg in at if a == contract.reference]
    memo: dict = {}
    if not refs:
        return   # the reference is not at this point (an --arms choice): nothing to compare with
    knobs = {k for knob in contract.compares for k in KNOBS[knob]}
    lr_figure = "lr" in contract.compares
    for arm, cfg in at:
        of = contract.baselines.get(arm)
        if of is not None:      # a seed baseline: compared with its own arm, at the same point
            ref = next((c for a, c in at if a == of and (not seeded or c.seed == cfg.seed)), None)
            if ref is None:
                continue
        elif arm == contract.reference:
            _check_reference(contract, cfg, plans[id(cfg)], out)
            continue
        else:                   # compared with the reference of the same seed (sweep seeds), if any
            ref = next((r for r in refs if r.seed == cfg.seed), refs[0])
        a, b = flat(cfg, memo), flat(ref, memo)
        other = of or contract.reference
        for key in sorted(set(a) | set(b)):
            if key == "changes" and of is not None:
                if a["changes"] != b["changes"]:
                    out.add("changes", [arm, of], [a["changes"], b["changes"]],
                            f"the baseline {arm} does not make {of}'s planned changes: it must differ in "
                            f"the seed only", excusable=False)
                continue
            if key in NEUTRAL or (key in knobs and of is None) or _close(a.get(key), b.get(key)):
                continue
            if key == "seed" and of is not None:
                continue
            if key == "steps" and lr_figure and of is None:
                continue
            if key == "data.offline_size" and "offline" not in (a["data.mode"], b["data.mode"]):
                continue
            if key in ("micro_batch_size", "noise_micro") and cfg.model.name not in _BATCHNORM_MODELS:
                continue
            if key == "lr_ref" and (lr_figure or (cfg.lr_ref == cfg.lr and ref.lr_ref == ref.lr)):
                continue   # lr figures: reported once, by _check_lr_ref; else it follows the lr's difference
            why = " (a seed baseline differs from its arm in the seed only)" if of else ""
            out.add(key, [arm, other], [a.get(key), b.get(key)],
                    f"{arm} differs from {other} in '{key}': {_show(a.get(key))} vs {_show(b.get(key))}, "
                    f"not only in {_knobs(contract, of)}{why}")
        if of is not None and cfg.seed == ref.seed and not seeded:
            out.add("seed", [arm, of], [cfg.seed, ref.seed],
                    f"the baseline {arm} has the seed of {of} ({cfg.seed}): it is the same run, not a seed "
                    f"baseline", excusable=False)
        if of is None:
            _check_changes(contract, arm, cfg, plans[id(cfg)], ref, out)
    offline = [(a, c) for a, c in at if c.data.mode == "offline"]
    sizes = {c.data.offline_size for _, c in offline}
    if len(sizes) > 1:
        out.add("data.offline_size", [a for a, _ in offline], [c.data.offline_size for _, c in offline],
                "offline arms have different subsets: " + ", ".join(f"{a} {c.data.offline_size:,}" for a, c in offline))


def _check_reference(contract: Contract, cfg: Config, p, out: _Collect) -> None:
    if cfg.changes:
        out.add("changes", [contract.reference], [len(cfg.changes)],
                f"the reference {contract.reference} changes its noise ({len(cfg.changes)} planned changes): "
                f"it must be the constant arm the others are compared with", excusable=False)
    for msg in p.problems:
        out.add(_problem_key(msg), [contract.reference], [], f"{contract.reference}: {msg}")


def _check_changes(contract: Contract, arm: str, cfg: Config, p, ref: Config, out: _Collect) -> None:
    for msg in p.problems:
        out.add(_problem_key(msg), [arm], [], f"{arm}: {msg}")
    if not cfg.changes:
        return
    if not contract.direction:
        out.add("preset.direction", [arm], [], f"{arm} changes its noise but the preset does not say in which "
                f"direction: set preset.direction = \"drop\" or \"raise\"")
        return
    allowed = {k for k in ("lr", "batch_size") if k in contract.compares}
    for f in p.fired:
        (lr0, b0), (lr1, b1) = f.before, f.after
        for k, moved in (("lr", lr1 != lr0), ("batch_size", b1 != b0)):
            if moved and k not in allowed:
                out.add(f"changes[{f.index}].{k}", [arm], [[lr0, b0], [lr1, b1]],
                        f"{arm}: changes[{f.index}] ({_change_words(f)}) changes '{k}', which the figure does "
                        f"not compare ({' and '.join(contract.compares)})", excusable=False)
        # noise goes up with the lr and down with the batch size
        ups = [k for k, up in (("lr", lr1 > lr0 * (1 + 1e-12)), ("batch_size", b1 < b0)) if up]
        downs = [k for k, dn in (("lr", lr1 < lr0 * (1 - 1e-12)), ("batch_size", b1 > b0)) if dn]
        wrong = ups if contract.direction == "drop" else downs
        for k in wrong:
            out.add(f"changes[{f.index}].{k}", [arm], [[lr0, b0], [lr1, b1]],
                    f"{arm}: changes[{f.index}] ({_change_words(f)}) raises the noise on a \"drop\" figure"
                    if contract.direction == "drop" else
                    f"{arm}: changes[{f.index}] ({_change_words(f)}) lowers the noise on a \"raise\" figure", excusable=False)
    if p.fired:
        lr_end, b_end = p.end_noise
        if not _close(float(lr_end), float(ref.lr)):
            out.add("lr", [arm, contract.reference], [lr_end, ref.lr],
                    f"{arm} ends at lr {lr_end:g}, not at the reference {contract.reference}'s {ref.lr:g}: "
                    f"after its change it must train as the reference does", excusable=False)
        if b_end != ref.batch_size:
            out.add("batch_size", [arm, contract.reference], [b_end, ref.batch_size],
                    f"{arm} ends at batch {b_end}, not at the reference {contract.reference}'s {ref.batch_size}: "
                    f"after its change it must train as the reference does", excusable=False)


def _check_lr_ref(contract: Contract, runs: list[Run], out: _Collect) -> None:
    if "lr" not in contract.compares:
        return
    declared = {r.arm for r in runs if r.lr_ref_given}
    missing = [r.arm for r in runs if not r.lr_ref_given]
    refs = {r.cfg.lr_ref for r in runs}
    if missing:
        out.add("lr_ref", sorted(set(missing), key=missing.index), [],
                f"an lr figure must name 'lr_ref' (the lr its LR-normalized steps count in): without it "
                f"{', '.join(dict.fromkeys(missing))} count in their own lr and end at the 'same' lr_time "
                f"after different work", excusable=False)
    elif len(refs) > 1:
        out.add("lr_ref", sorted(declared), sorted(refs),
                f"arms count LR-normalized steps in different lr_ref: {', '.join(f'{r:g}' for r in sorted(refs))}", excusable=False)


def _problem_key(msg: str) -> str:
    for key in ("schedule.warmup_steps", "schedule.warmup_lr_time", "data.offline_size", "data.online_epochs",
                "max_lr_time", "steps"):
        if f"'{key}'" in msg:
            return key
    if msg.startswith("changes["):
        return msg.split(" ", 1)[0].split(".")[0].rstrip(":")
    if "online arm repeats data" in msg:
        return "data.online_epochs"
    if "offline arm sees" in msg:
        return "data.offline_size"
    return "plan"


def _change_words(f) -> str:
    (lr0, b0), (lr1, b1) = f.before, f.after
    parts = ([f"lr {lr0:g} -> {lr1:g}"] if lr0 != lr1 else []) + ([f"batch {b0} -> {b1}"] if b0 != b1 else [])
    return ", ".join(parts) or "nothing"


def _knobs(contract: Contract, of: str | None) -> str:
    return "the seed" if of else " and ".join(contract.compares)


def _show(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list):
        return "[" + ", ".join(_show(x) for x in v) + "]"
    return repr(v) if isinstance(v, str) else str(v)


def errors(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.level == "error"]
