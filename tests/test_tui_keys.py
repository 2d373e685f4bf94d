"""Issue 14: one source for every key (bindings, key screen, palette, README), every key driven by
Pilot, and the plot's joined lines, labelled markers and human ticks."""
import asyncio

import numpy as np
import pytest

from gpctl.tui import app as app_mod
from gpctl.tui.app import GpctlApp
from gpctl.tui.keys import KEYS, key_screen_text, markdown_table
from gpctl.tui.widgets import plot
from tests.conftest import REPO, fixed_runs


@pytest.fixture
def demo_home(tmp_path):
    fixed_runs(tmp_path / "home")
    return tmp_path / "home"


def test_bindings_key_screen_and_readme_table_are_one_list():
    actions = {b.action for b in GpctlApp.BINDINGS}
    assert actions == {action for _, _, action, _, _ in KEYS}
    assert all(hasattr(GpctlApp, f"action_{a}") for a in actions)
    lines = key_screen_text().splitlines()
    assert len(lines) == len(KEYS) + 2 and max(map(len, lines)) <= 76     # fits 80 columns inside the box
    assert markdown_table() in (REPO / "docs" / "tui.md").read_text()   # the TUI page's table is this one
    from gpctl.tui.keys import FOOTER
    assert {b.action for b in GpctlApp.BINDINGS if b.show} == {a for a, _ in FOOTER}   # a footer label each


def test_every_key_on_the_key_screen_reaches_its_action(demo_home, monkeypatch):
    called = []
    for _, _, action, _, _ in KEYS:
        if action == "quit":
            continue
        orig = getattr(GpctlApp, f"action_{action}")

        def spy(self, *a, _orig=orig, _name=action, **k):
            called.append(_name)
            return _orig(self, *a, **k)
        monkeypatch.setattr(GpctlApp, f"action_{action}", spy)

    async def go():
        app = GpctlApp(demo_home, live=False)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause()
            main = app.screen
            for key, _, action, _, _ in KEYS:
                if action == "quit":
                    continue
                await pilot.press(key.split(",")[-1])
                await pilot.pause()
                while app.screen is not main:            # a dialog, the key screen, the detail screen
                    await pilot.press("escape")
                    await pilot.pause()
                if app.focused is not app.table:        # the filter box keeps focus until Escape
                    await pilot.press("escape")
                    await pilot.pause()
            await pilot.press("q")
            await pilot.pause()
        return app.return_code
    assert asyncio.run(go()) == 0
    expected = [a for _, _, a, _, _ in KEYS if a != "quit"]
    assert list(dict.fromkeys(a for a in called if a in expected)) == expected   # (Escape also closes the filter)


def test_key_screen_scrolls_at_80x24(demo_home):
    async def go():
        app = GpctlApp(demo_home, live=False)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("question_mark")
            await pilot.pause()
            text = app.screen.query_one("#help-text").render()
            scroller = app.screen.query_one("VerticalScroll")
            assert str(text) == key_screen_text()
            assert scroller.max_scroll_y > 0 and scroller.outer_size.width <= 80
    asyncio.run(go())


def test_command_palette_finds_actions_and_runs(demo_home):
    async def go():
        app = GpctlApp(demo_home, live=False)
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.pause()
            provider = app_mod.ActionsAndRuns(app.screen)
            entries = {text: cb for text, cb, _ in provider._entries()}
            assert any(t.startswith("drop: drop the noise") for t in entries)
            assert any(t.startswith("fork: ") for t in entries) and any(t.startswith("tv: ") for t in entries)
            target = "demo-bs512_seed2-000002"
            entries[f"run {target}"]()
            await pilot.pause()
            assert app.table.selected_id == target
            await pilot.press("ctrl+p")
            await pilot.pause()
            await pilot.press(*"drop")
            await pilot.pause(0.5)
            from textual.command import CommandList
            options = app.screen.query_one(CommandList)
            texts = [str(options.get_option_at_index(i).prompt) for i in range(options.option_count)]
            assert any(t.startswith("drop: ") for t in texts), texts
    asyncio.run(go())


def test_sparse_series_is_a_joined_line():
    x = np.array([0.0, 25.0, 50.0, 75.0, 100.0])
    y = np.array([3.0, 1.0, 2.0, 0.5, 1.5])
    rows, _ = plot.render([(x, y, "red")], 40, 8)
    drawn = [any(r.plain[c] != " " for r in rows) for c in range(40)]
    assert all(drawn)                                            # every column between the ends
    lo, hi = plot.column_minmax(x, y, 0, 100, 80)
    assert np.isnan(lo).sum() == 75                               # 5 of 80 pixel columns have a point
    flo, fhi = plot.fill_gaps(lo, hi)
    assert not np.isnan(flo).any() and flo[40] == pytest.approx(2.0) and flo[20] == pytest.approx(
        np.interp(20, [0, 20, 40, 59, 79], [3.0, 1.0, 2.0, 0.5, 1.5]), abs=0.06)


def test_sparse_series_without_gap_filling_is_dots(monkeypatch):
    """Negative control for the test above."""
    monkeypatch.setattr(plot, "fill_gaps", lambda lo, hi: (lo, hi))
    x = np.array([0.0, 25.0, 50.0, 75.0, 100.0])
    rows, _ = plot.render([(x, np.array([3.0, 1.0, 2.0, 0.5, 1.5]), "red")], 40, 8)
    assert not all(any(r.plain[c] != " " for r in rows) for c in range(40))


def test_human_ticks_markers_and_legend():
    assert [plot.human(v, "wall") for v in (42, 200, 3900)] == ["42s", "3m20s", "1h05m"]
    assert [plot.human(v, "samples") for v in (512, 102400, 1_234_567, 3.2e9)] == ["512", "102k", "1.23M", "3.2G"]
    assert plot.human(0.25, "lr_time") == "0.25" and plot.human(200, "step") == "200"
    from gpctl.tui.data import RunTail

    class Events(RunTail):
        def __init__(self, events):
            self.events = events
    t = Events([{"event": "schedule", "step": 50, "samples": 1600, "changed": {"batch_size": [32, 512]}},
                {"event": "control", "status": "applied", "step": 120, "changed": {"lr": [0.05, 0.005]}},
                {"event": "control", "status": "rejected", "step": 130, "changed": {"lr": [0.005, 9.0]}},
                {"event": "fork", "step": 100}])
    assert t.markers("step") == [(50.0, "batch 32→512 @ 50"), (120.0, "lr 0.05→0.005 @ 120"), (100.0, "fork @ 100")]
    lines = plot.legend_lines([("━ demo-bs32to512-000000", "cyan"), ("│1 batch 32→512 @ 50", "bold"),
                               ("━ demo-bs512-000001", "magenta")], 50)
    assert [line.plain for line in lines] == ["━ demo-bs32to512-000000  │1 batch 32→512 @ 50",
                                              "━ demo-bs512-000001"]


def _status(app):
    return app.query_one("#status").render().plain


def test_the_view_is_kept_per_home_between_uses(demo_home, tmp_path, monkeypatch):
    import json

    from gpctl.tui.keys import state_file
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    async def use(keys, quit_=True):
        app = GpctlApp(demo_home, live=False)
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.pause()
            if keys:
                await pilot.press(*keys)
                await pilot.pause()
            seen = (_status(app), app.table.selected_id, set(app.marked), app.with_eval)
            if quit_:
                await pilot.press("q")
                await pilot.pause()
        return seen

    defaults = asyncio.run(use([], quit_=False))
    assert defaults[0] == "x step · EMA 0.8 · sort created ↑ · 3 runs, 0 running"
    left = asyncio.run(use(["down", "space", "down", "x", "e", "o", "O", "v"]))
    assert left[0] == "x samples · EMA 0.9 · sort step ↓ · 3 runs, 0 running" and left[3]
    assert asyncio.run(use([], quit_=False)) == left                 # as it was left
    assert state_file(demo_home).parent == tmp_path / "cache" / "gpctl" / "tui"
    assert not any(p.name.startswith("tui") for p in demo_home.iterdir())   # nothing written in the home
    # a hostile or broken state file: the defaults, and no error
    state_file(demo_home).write_text(json.dumps({"x_axis": "../../etc", "ema_i": 99, "sort_key": "rm -rf",
                                                 "marked": ["../../x", 5, "demo-nope"], "selected": 7,
                                                 "logy": "yes", "filter": ["x"]}))
    assert asyncio.run(use([], quit_=False)) == (defaults[0], defaults[1], set(), False)
    state_file(demo_home).write_text("{not json")
    assert asyncio.run(use([], quit_=False))[0] == defaults[0]


def test_queue_view_shows_what_gpctl_queue_prints(demo_home):
    from engine.store.jobs import JobStore
    from engine.store.rundir import list_runs
    from gpctl.queue import queue_rows, queue_text

    rds = list_runs(demo_home)
    store = JobStore(demo_home)
    store.enqueue(rds[0].id, rds[0].path)
    store.enqueue(rds[1].id, rds[1].path, priority=5)
    expect = queue_text(queue_rows(store))
    store.close()
    assert expect.splitlines()[1].split()[:3] == ["1", rds[1].id, "queued"]   # priority 5 first

    async def go():
        app = GpctlApp(demo_home, live=False)
        async with app.run_test(size=(160, 40)) as pilot:
            await pilot.press("Q")
            await pilot.pause()
            return str(app.screen.query_one("#help-text").render())
    text = asyncio.run(go())
    assert text.splitlines()[0] == f"queue of {demo_home}"
    assert [line.split()[:3] for line in text.splitlines()[2:]] == [line.split()[:3] for line in expect.splitlines()]


def test_seeds_of_one_family_are_one_mean_line_with_a_band(demo_home):
    from engine.analysis.curves import train_curve
    from engine.store.rundir import run_dir

    seeds = ["demo-bs512-000001", "demo-bs512_seed2-000002"]

    async def go(press_g):
        app = GpctlApp(demo_home, live=False)
        async with app.run_test(size=(160, 48)) as pilot:
            await pilot.pause()
            for rid in seeds:
                app.table.move_cursor(row=app.table.get_row_index(rid))
                await pilot.press("space")
            if press_g:
                await pilot.press("g")
            await pilot.pause()
            return [(x, y, label) for x, y, _, label in app.plot.series], _status(app)
    separate, _ = asyncio.run(go(False))
    assert [label for *_, label in separate] == [seeds[1], seeds[0]]        # negative control: two lines
    grouped, status = asyncio.run(go(True))
    assert [label for *_, label in grouped] == ["", "bs512 (mean of 2 seeds)"] and "seeds: mean" in status
    curves = [train_curve(run_dir(demo_home, rid), "step", 0.8) for rid in seeds]
    ys = np.stack([np.interp(curves[0][0], cx, cy) for cx, cy in curves])
    x, mean, _ = grouped[1]
    assert np.allclose(x, curves[0][0]) and np.allclose(mean, ys.mean(0))   # the mean, checked with numpy
    bx, by, _ = grouped[0]
    assert np.allclose(np.sort(by), np.sort(np.concatenate([ys.min(0), ys.max(0)])))   # the band: min and max
