"""Snapshots of the TUI (pytest-textual-snapshot): the main screen at 80x24, 120x40 and 160x48, the key
screen, the detail screen (with its followed log), an overlay, a seed group drawn as its mean, a seed
group as one row, and the small plots of other fields beside the loss.

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


def test_main_screen_120x40(app, snap_compare):
    assert snap_compare(app, terminal_size=(120, 40))


def test_key_screen_80x24(app, snap_compare):
    """The generated key screen fits 80 columns and scrolls (issue 14: it was garbled at every size)."""
    assert snap_compare(app, press=["question_mark"], terminal_size=(80, 24))


@pytest.fixture
def fixed_home_app(monkeypatch):
    """The detail screen prints the run's folder: a home at a fixed path keeps the snapshot the same."""
    import shutil
    from pathlib import Path
    home = Path("/tmp/gpctl-snapshot-home")
    shutil.rmtree(home, ignore_errors=True)
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    monkeypatch.setattr(panels, "gpu_stats", lambda: None)
    first = fixed_runs(home)[0]
    for line in ("step 50: planned change batch 32 -> 512", "step 100: eval loss 1.0123 error 0.3000",
                 "step 200: done"):
        first.log(line)
    yield GpctlApp(home, live=False)
    monkeypatch.undo()
    time.tzset()
    shutil.rmtree(home, ignore_errors=True)


def test_detail_screen_120x40(fixed_home_app, snap_compare):
    """Enter: the run's whole story (config diff, events as sentences) above its log, followed."""
    assert snap_compare(fixed_home_app, press=["enter"], terminal_size=(120, 40))


def test_seed_mean_and_band_160x48(app, snap_compare):
    """The two bs512 seeds marked, drawn as their mean with a min-max band (g)."""
    assert snap_compare(app, press=["down", "space", "down", "space", "g"], terminal_size=(160, 48))


def test_small_plots_beside_the_loss_80x24(app, snap_compare):
    """m, Enter: lr, batch_size and eval_error beside the loss (three per row when narrow)."""
    assert snap_compare(app, press=["m", "enter"], terminal_size=(80, 24))


def test_seed_group_as_one_row_120x40(app, snap_compare):
    """G: the two bs512 seeds as one row (their mean loss), selected and drawn as mean and band."""
    assert snap_compare(app, press=["down", "G"], terminal_size=(120, 40))


@pytest.fixture
def forked_app(tmp_path, monkeypatch):
    """fixed_runs with a fork and a twin of the dropped run (as tests/test_tui_views.py makes them)."""
    from tests.test_tui_views import _tree_home
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    monkeypatch.setattr(panels, "gpu_stats", lambda: None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    home = tmp_path / "home"
    fixed_runs(home)
    _tree_home(home)
    yield GpctlApp(home, live=False)
    monkeypatch.undo()
    time.tzset()


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
def test_lineage_screen(forked_app, snap_compare, size):
    """Issue 27: L on the dropped run: its tree (a twin at step 50, a fork at 100), its own footer;
    two marks numbered 1 and 2 underneath."""
    assert snap_compare(forked_app, press=["space", "down", "space", "up", "L"], terminal_size=size)
