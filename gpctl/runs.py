"""Plain functions behind the CLI commands, so tests (and the TUI) can call them too."""
from __future__ import annotations

from pathlib import Path

from engine.config import Config
from engine.errors import DataMissing
from engine.presets import Preset, load_preset
from engine.rundir import RunDir


def check_data(preset: Preset, configs: list[Config]) -> None:
    """Stop before anything is created if a real preset's data is missing, naming the CPU twin."""
    for cfg in configs:
        try:
            from engine.data import preflight
            preflight(cfg)
        except DataMissing as e:
            twin = f"; or run its CPU twin: gpctl run preset {preset.twin}" if preset.twin and \
                preset.twin != preset.name else ""
            raise DataMissing(f"{preset.name}: {e}{twin}") from None


def create_runs(name: str, overrides: list[str], root: Path, arms: list[str] | None = None) -> list[RunDir]:
    preset = load_preset(name, check=False)  # the arms are checked below, with the overrides
    configs = preset.configs(overrides, arms)
    check_data(preset, configs)
    return [RunDir.create(root, cfg) for cfg in configs]
