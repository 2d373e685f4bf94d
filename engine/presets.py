"""Presets: one TOML file per experiment (figure), a base config plus named runs (the arms).

    [preset]                 figure, description, twin (the CPU twin's name); what it compares:
                             compares, reference, direction, baselines, departs (engine/contract.py)
    [base]                   any Config keys, shared by all arms
    [runs.<arm>]             per-arm keys, deep-merged over [base]
    [sweep]                  optional: seeds = 3 (or [0, 4]) and key = [values]: every arm at every
                             point of the product and every seed, named like `bs512-lr0.05-s1`
"""
from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from engine import contract
from engine.config import Config, ConfigError, apply_overrides, build, load_toml, merge
from engine.fs import is_name

_META_KEYS = {"figure", "description", "twin"}
_CONTRACT_KEYS = {"compares", "reference", "direction", "baselines", "departs"}


def preset_dirs() -> list[Path]:
    """Where presets are looked up: $GPCTL_PRESETS, ./presets, then the ones shipped with gpctl."""
    dirs = []
    if os.environ.get("GPCTL_PRESETS"):
        dirs += [Path(p) for p in os.environ["GPCTL_PRESETS"].split(os.pathsep) if p]
    dirs.append(Path.cwd() / "presets")
    dirs.append(Path(__file__).resolve().parent.parent / "presets")
    seen, out = set(), []
    for d in dirs:
        r = d.resolve()
        if r not in seen and r.is_dir():
            seen.add(r)
            out.append(r)
    return out


@dataclass
class Preset:
    name: str
    path: Path
    figure: str
    description: str
    twin: str
    base: dict
    runs: dict[str, dict]
    sweep: dict = field(default_factory=dict)    # the [sweep] table: key = [values], seeds = N or [..]
    contract: contract.Contract = field(default_factory=contract.Contract)
    _built: list | None = field(default=None, repr=False, compare=False)   # see expand()

    def configs(self, overrides: list[str] = (), arms: list[str] | None = None, check: bool = True,
                seeds: list[int] | None = None, sweep: dict[str, list[str]] | None = None) -> list[Config]:
        """The resolved, validated config of each run: each arm, or with seeds and a sweep, each arm
        at each point of the sweep's product and each seed (overrides apply to every run).

        check: also refuse a preset that would not be the experiment it says: an arm whose plan has a
        problem (engine/plan.py: a change that never fires, an online arm that repeats data, ...) or
        arms that differ in more than the knob the preset compares (engine/contract.py; all arms
        are compared, whichever are chosen).
        """
        out = [r.cfg for r in self.expand(overrides, arms, seeds, sweep)]
        if check:
            from engine import plan
            for cfg in out:
                plan.check(cfg, f"{self.path} [runs.{cfg.name}]")
            chosen = set(arms or self.runs)   # findings about arms not run here are not this run's concern
            bad = [f for f in contract.errors(self.findings(overrides, seeds, sweep))
                   if not f.arms or f.arms[0] in chosen]
            if bad:
                more = f" (and {len(bad) - 1} more: gpctl presets check {self.name})" if len(bad) > 1 else ""
                raise ConfigError(f"{self.path}: {bad[0].line()}{more}")
        return out

    def findings(self, overrides: list[str] = (), seeds: list[int] | None = None,
                 sweep: dict[str, list[str]] | None = None, runs: list[contract.Run] | None = None) -> list[contract.Finding]:
        """What engine/contract.py finds in all the arms (with these overrides, seeds and sweep; or
        in `runs`, an expand() of all the arms with them, when the caller has one)."""
        own_seeds, _ = preset_sweep(self.sweep, self.path)
        return contract.check(self.contract, runs if runs is not None else self.expand(overrides, None, seeds, sweep),
                              str(self.path), seeded=seeds is not None or own_seeds is not None)

    def expand(self, overrides: list[str] = (), arms: list[str] | None = None, seeds: list[int] | None = None,
               sweep: dict[str, list[str]] | None = None) -> list[contract.Run]:
        """Each run with its arm and sweep point (configs() without the checks)."""
        if self._built is not None and not overrides and arms is None and seeds is None and sweep is None:
            built, self._built = self._built, None   # load_preset's own expansion, handed over once:
            return built                             # its configs belong to no one else
        chosen = arms or list(self.runs)
        for arm in chosen:
            if arm not in self.runs:
                raise ConfigError(f"{self.path}: no run '{arm}' (runs: {', '.join(self.runs)})")
        own_seeds, own_sweep = preset_sweep(self.sweep, self.path)
        seeds = seeds if seeds is not None else own_seeds
        grid = {**own_sweep, **(sweep or {})}
        out = []
        for arm in chosen:
            for point in itertools.product(*([(k, v) for v in vals] for k, vals in grid.items())):
                label = "-".join(f"{_short(k)}{_label(v)}" for k, v in point)
                family = f"{arm}-{label}" if label else arm
                for seed in (seeds if seeds is not None else [None]):
                    data = merge(self.base, self.runs[arm])
                    data = apply_overrides(data, [*overrides, *(f"{k}={v}" for k, v in point)])
                    name = family if seed is None else f"{family}-s{seed}"
                    data["name"], data["preset"] = name, self.name
                    if seed is not None:
                        data["seed"] = seed
                    if grid or seeds is not None:
                        data["group"] = f"{self.name}.{family}"
                    where = f"{self.path} [runs.{arm}]" + (f" ({name})" if name != arm else "")
                    out.append(contract.Run(arm, label, build(data, where), "lr_ref" in data))
        names = [r.cfg.name for r in out]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ConfigError(f"{self.path}: two runs would both be named '{dup}' (give distinct sweep values)")
        return out


_SHORT = {"batch_size": "bs", "lr": "lr", "micro_batch_size": "mbs"}


def _short(key: str) -> str:
    return _SHORT.get(key, key.split(".")[-1])


def _label(value: str) -> str:
    """A sweep value as part of a run name (letters, digits, _ . -)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", value.strip().strip('"').strip("'")).strip("_") or "_"


def parse_seeds(text: str) -> list[int]:
    """`--seeds 3` (seeds 0, 1, 2) or `--seeds 0,4,7`."""
    try:
        if "," not in text:
            n = int(text)
            if not 1 <= n <= 1000:
                raise ValueError
            return list(range(n))
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: give a count (3: seeds 0, 1, 2) or seeds like 0,4,7") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ConfigError(f"--seeds {text!r}: seeds must be distinct integers >= 0")
    return seeds


def parse_sweep(items: list[str]) -> dict[str, list[str]]:
    """`--sweep lr=0.1,0.05 --sweep batch_size=32,512`: each key's values (TOML text), in order.
    Commas inside brackets or quotes do not split (`--sweep 'data.augment=["crop"],[]'`)."""
    out: dict[str, list[str]] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--sweep {item!r}: expected key=v1,v2,...")
        key, text = item.split("=", 1)
        key = key.strip()
        values, depth, quote, cur = [], 0, "", ""
        for ch in text:
            if quote:
                quote = "" if ch == quote else quote
            elif ch in "\"'":
                quote = ch
            elif ch in "[{":
                depth += 1
            elif ch in "]}":
                depth -= 1
            elif ch == "," and depth == 0:
                values.append(cur.strip())
                cur = ""
                continue
            cur += ch
        values.append(cur.strip())
        if not key or any(not v for v in values):
            raise ConfigError(f"--sweep {item!r}: expected key=v1,v2,... with no empty value")
        if key in out:
            raise ConfigError(f"--sweep {key}: given twice")
        out[key] = values
    return out


def preset_sweep(table: dict, path: Path | str) -> tuple[list[int] | None, dict[str, list[str]]]:
    """A preset's [sweep] table: `seeds = 3` or `[0, 4]`, and `key = [values]` (dotted keys quoted)."""
    import json
    seeds = None
    grid: dict[str, list[str]] = {}
    for key, vals in table.items():
        if key == "seeds":
            if isinstance(vals, int) and not isinstance(vals, bool):
                seeds = parse_seeds(str(vals))
            elif isinstance(vals, list) and vals:
                seeds = parse_seeds(",".join(str(v) for v in vals))
            else:
                raise ConfigError(f"{path}: 'sweep.seeds' must be a count or a list of seeds")
        elif isinstance(vals, list) and vals:
            grid[key] = [json.dumps(v) for v in vals]
        else:
            raise ConfigError(f"{path}: 'sweep.{key}' must be a list of values")
    return seeds, grid


def find_preset(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix == ".toml":
        if not p.is_file():
            raise ConfigError(f"{p}: no such preset file")
        return p
    for d in preset_dirs():
        cand = d / f"{name_or_path}.toml"
        if cand.is_file():
            return cand
    known = sorted({q.stem for d in preset_dirs() for q in d.glob("*.toml")})
    import difflib
    close = difflib.get_close_matches(name_or_path, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else " (see `gpctl presets`)"
    where = ", ".join(str(d) for d in preset_dirs()) or "no preset folder"
    raise ConfigError(f"unknown preset '{name_or_path}': no {name_or_path}.toml in {where}{hint}")


def load_preset(name_or_path: str, check: bool = True) -> Preset:
    path = find_preset(name_or_path)
    raw = load_toml(path)
    unknown = set(raw) - {"preset", "base", "runs", "sweep"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level table '{sorted(unknown)[0]}' (expected preset, base, runs, sweep)")
    meta = raw.get("preset", {})
    if not isinstance(meta, dict):
        raise ConfigError(f"{path}: 'preset' must be a table")
    bad = set(meta) - _META_KEYS - _CONTRACT_KEYS
    if bad:
        raise ConfigError(f"{path}: unknown key 'preset.{sorted(bad)[0]}'")
    for key in _META_KEYS:
        if key in meta and not isinstance(meta[key], str):
            raise ConfigError(f"{path}: 'preset.{key}' must be a string")
    for key in ("base", "runs", "sweep"):
        if not isinstance(raw.get(key, {}), dict):
            raise ConfigError(f"{path}: '{key}' must be a table ([{key}]), got {type(raw[key]).__name__}")
    runs = raw.get("runs", {})
    if not runs:
        raise ConfigError(f"{path}: needs at least one [runs.<name>] table")
    for arm, v in runs.items():
        if not isinstance(v, dict):
            raise ConfigError(f"{path}: 'runs.{arm[:40]}' must be a table ([runs.{arm[:40]}]), got {type(v).__name__}")
        if not is_name(arm):
            raise ConfigError(f"{path}: arm name {arm[:40]!r} is not a plain name (letters, digits, _ . -; "
                              "not empty, no '..')")
    preset = Preset(name=path.stem, path=path, figure=meta.get("figure", ""),
                    description=meta.get("description", ""), twin=meta.get("twin", ""),
                    base=raw.get("base", {}), runs=runs, sweep=raw.get("sweep", {}),
                    contract=contract.parse(meta, list(runs), str(path)))
    # every arm is validated now, so errors surface before anything runs; without the contract's
    # check, what it built is handed to the next expand() (a config that no one else holds)
    if check:
        preset.configs(check=True)
    else:
        preset._built = preset.expand()
    return preset


def list_presets() -> list[Preset]:
    seen: dict[str, Preset] = {}
    for d in preset_dirs():
        for p in sorted(d.glob("*.toml")):
            if p.stem not in seen:
                seen[p.stem] = load_preset(str(p), check=False)
    return sorted(seen.values(), key=lambda p: p.name)
