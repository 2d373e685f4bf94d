"""Presets: one TOML file per experiment (figure), a base config plus named runs (the arms).

    [preset]                 figure, description, twin (the CPU twin's name), needs (data note)
    [base]                   any Config keys, shared by all arms
    [runs.<arm>]             per-arm keys, deep-merged over [base]
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from engine.config import Config, ConfigError, apply_overrides, build, load_toml, merge

_META_KEYS = {"figure", "description", "twin"}


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

    def configs(self, overrides: list[str] = (), arms: list[str] | None = None, check: bool = True) -> list[Config]:
        """The resolved, validated config of each arm (overrides apply to every arm).

        check: also step each arm's plan (engine/plan.py) and refuse one that would not be the
        experiment it says (a change that never fires, an online arm that repeats data, ...).
        """
        from engine import plan
        chosen = arms or list(self.runs)
        for arm in chosen:
            if arm not in self.runs:
                raise ConfigError(f"{self.path}: no run '{arm}' (runs: {', '.join(self.runs)})")
        out = []
        for arm in chosen:
            data = merge(self.base, self.runs[arm])
            data = apply_overrides(data, list(overrides))
            data["name"], data["preset"] = arm, self.name
            where = f"{self.path} [runs.{arm}]"
            cfg = build(data, where)
            out.append(plan.check(cfg, where) if check else cfg)
        return out


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
    unknown = set(raw) - {"preset", "base", "runs"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level table '{sorted(unknown)[0]}' (expected preset, base, runs)")
    meta = raw.get("preset", {})
    bad = set(meta) - _META_KEYS
    if bad:
        raise ConfigError(f"{path}: unknown key 'preset.{sorted(bad)[0]}'")
    for key in _META_KEYS:
        if key in meta and not isinstance(meta[key], str):
            raise ConfigError(f"{path}: 'preset.{key}' must be a string")
    runs = raw.get("runs", {})
    if not runs or not all(isinstance(v, dict) for v in runs.values()):
        raise ConfigError(f"{path}: needs at least one [runs.<name>] table")
    preset = Preset(name=path.stem, path=path, figure=meta.get("figure", ""),
                    description=meta.get("description", ""), twin=meta.get("twin", ""),
                    base=raw.get("base", {}), runs=runs)
    preset.configs(check=check)  # validate every arm now, so errors surface before anything runs
    return preset


def list_presets() -> list[Preset]:
    seen: dict[str, Preset] = {}
    for d in preset_dirs():
        for p in sorted(d.glob("*.toml")):
            if p.stem not in seen:
                seen[p.stem] = load_preset(str(p), check=False)
    return sorted(seen.values(), key=lambda p: p.name)
