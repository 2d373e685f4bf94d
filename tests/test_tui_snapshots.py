"""Snapshots of the TUI's main screen (pytest-textual-snapshot) at 80x24 and 160x48.

The input is fixed_runs: run ids, times and curves are the same on every machine, the clock is UTC
and the GPU panel reads "no GPU". After an intended change of the screen, or a Textual upgrade,
regenerate with `pytest tests/test_tui_snapshots.py --snapshot-update` and look at the SVGs.
"""
import time

import pytest

from gpctl.tui.app import GpctlApp
from gpctl.tui.widgets import panels
from tests.conftest import fixed_runs


@pytest.fixture
def app(tmp_path, monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    monkeypatch.setattr(panels, "gpu_stats", lambda: None)
    home = tmp_path / "home"
    fixed_runs(home)
    yield GpctlApp(home, live=False)
    monkeypatch.undo()
    time.tzset()


def test_main_screen_80x24(app, snap_compare):
    assert snap_compare(app, terminal_size=(80, 24))


def test_main_screen_160x48(app, snap_compare):
    assert snap_compare(app, terminal_size=(160, 48))


def test_overlay_eval_and_log_y_160x48(app, snap_compare):
    """The dropped run with batch 512 marked: two series, eval loss as a second series, log-y."""
    assert snap_compare(app, press=["space", "down", "v", "l"], terminal_size=(160, 48))
