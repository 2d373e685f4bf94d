"""The TUI driven by Textual's Pilot against run directories made by tiny runs."""
import asyncio
import json
import os

import pytest

from engine.store.rundir import RunDir
from engine.train.loop import train
from gpctl.tui.app import GpctlApp
from gpctl.tui.widgets.panels import COLUMNS
from gpctl.tui.widgets.plot import column_minmax, render
from tests.conftest import TINY_IMAGES, tiny


@pytest.fixture
def runs(tmp_path):
    home = tmp_path / "home"
    done = RunDir.create(home, tiny(TINY_IMAGES, "steps=8", "checkpoint_every=4", "eval_every=4", name="a"))
    assert train(done) == "done"
    done2 = RunDir.create(home, tiny(TINY_IMAGES, "steps=8", "checkpoint_every=4", "eval_every=4", "seed=1", name="b"))
    assert train(done2) == "done"
    live = RunDir.create(home, tiny(TINY_IMAGES, "steps=8", name="c"))
    live.write_status(state="running")   # as a worker's job would be: the TUI steers running runs only
    return home, done, done2, live


def run(coro):
    return asyncio.run(coro)


def _select(app, rid):
    app.table.move_cursor(row=app.table.get_row_index(rid))


def test_table_plot_axis_and_overlay(runs):
    home, a, b, c = runs

    async def go():
        app = GpctlApp(home, live=False)
        async with app.run_test(size=(160, 48)) as pilot:
            assert len(app.table.run_ids) == 3
            assert [app.table.get_row_at(i)[0].plain for i in range(4)][0] == "tiny · 3 runs"   # the preset's header
            assert [app.table.get_row_at(i)[1].plain for i in range(1, 4)] == ["done", "done", "running"]
            assert app.table.selected_id == a.id                  # the first run, not the header
            await pilot.press("up")                                # the header is passed over
            assert app.table.selected_id == a.id and app.table.cursor_row == 1
            _select(app, a.id)
            await pilot.pause()
            assert len(app.plot.series) == 1 and app.plot.series[0][3] == a.id
            assert app.plot.border_title == "loss vs step"
            await pilot.press("x")
            assert app.plot.border_title == "loss vs samples" and app.plot.x_label == "samples"
            await pilot.press("x", "x")
            assert app.plot.x_label == "wall"
            await pilot.press("space")
            _select(app, b.id)
            await pilot.pause()
            assert [s[3] for s in app.plot.series] == [b.id, a.id]   # the overlay has two series
            await pilot.press("l")
            assert app.plot.logy and app.plot.border_title.endswith("(log)")
            await pilot.press("v")
            assert len(app.plot.series) == 4
            await pilot.press("e")
            assert app.ema_i == 2
            await pilot.press("question_mark")
            assert app.screen.__class__.__name__ == "Help"
            await pilot.press("escape")
    run(go())


def test_keys_write_the_control_file(runs):
    home, a, b, c = runs

    async def go():
        app = GpctlApp(home, live=False)
        async with app.run_test(size=(160, 48)) as pilot:
            _select(app, c.id)
            await pilot.pause()
            await pilot.press("d")
            await pilot.press("enter")                       # default: lr 10
            await pilot.press("r")
            for _ in range(5):
                await pilot.press("backspace")
            await pilot.press(*"batch 2", "enter")
            await pilot.press("s")
            await pilot.press(*"lr=0.02 batch_size=32", "enter")
            await pilot.press("c", "t")
            await pilot.pause()
            assert app.screen.__class__.__name__ == "Confirm"       # stop asks first
            await pilot.press("y")
            await pilot.pause()
        lines = [json.loads(x) for x in c.control_file.read_text().splitlines()]
        strip = [{k: v for k, v in r.items() if k not in ("id", "time", "by")} for r in lines]
        assert strip == [{"set": {"lr": 0.005}}, {"set": {"batch_size": 8}}, {"set": {"lr": 0.02, "batch_size": 32}},
                         {"action": "checkpoint"}, {"action": "stop"}]
    run(go())


def test_garbage_in_every_dialog_never_crashes_and_writes_nothing(runs):
    """Issue 11: `ramp=abc` crashed the TUI, `lr=abc` was sent; now each is refused with a notice."""
    home, a, b, c = runs
    answers = {"s": ["ramp=abc lr=0.01", "lr=abc", "lr=0.001,0.002", "batch_size=12.5", "lr=-1", "ramp=5",
                     "momentum=0.9", "lr=1e999", "batch_size=" + "9" * 400, "=", "lr="],
               "d": ["lr inf", "lr -2", "lr 0.5", "lr 0", "batch abc", "batch 0", "foo", "batch 1e400"],
               "r": ["lr nan", "batch 3", "lr 1", "x y z"]}

    async def go():
        app = GpctlApp(home, live=False)
        seen, notify = [], app.notify
        app.notify = lambda message, **kw: (seen.append((message, kw.get("severity"))), notify(message, **kw))[1]
        async with app.run_test(size=(160, 48)) as pilot:
            _select(app, c.id)
            await pilot.pause()
            for key, texts in answers.items():
                for text in texts:
                    await pilot.press(key)
                    await pilot.pause()
                    app.screen.query_one("Input").value = text     # as typed (typing 400 keys took a minute)
                    await pilot.press("enter")
                    await pilot.pause()
                    assert app.screen.__class__.__name__ != "Ask"     # the dialog closed, the app lives
            assert app.is_running
            errors = [m for m, sev in seen if sev == "error"]
            assert len(errors) == sum(len(v) for v in answers.values()), "\n".join(f"{m} [{s}]" for m, s in seen)
        assert c.control_file.read_text() == ""
    run(go())


def test_a_run_that_is_not_running_is_not_steered_from_the_tui(runs, tmp_path):
    home, a, b, c = runs
    c.write_status(state="created")

    async def go():
        app = GpctlApp(home, live=False)
        async with app.run_test(size=(160, 48)) as pilot:
            _select(app, c.id)
            await pilot.pause()
            await pilot.press("d", "enter")
            await pilot.pause()
            assert any("is created, not running" in n.message for n in app._notifications)
        assert c.control_file.read_text() == ""
    run(go())


def test_done_run_refuses_and_events_pane_shows_acks(runs):
    home, a, b, c = runs

    async def go():
        app = GpctlApp(home, live=False)
        async with app.run_test(size=(160, 48)) as pilot:
            _select(app, a.id)
            await pilot.pause()
            await pilot.press("t", "y")
            await pilot.pause()
            assert a.control_file.read_text() == ""
            assert any("is done: it takes no more requests" in n.message for n in app._notifications)
            assert "checkpoint" in "\n".join(str(line) for line in app.events_pane.lines)
    run(go())


def test_fork_cancel_and_filter(runs, monkeypatch):
    home, a, b, c = runs
    from gpctl import queue
    monkeypatch.setattr(queue, "ensure_worker", lambda *a, **k: False)

    async def go():
        app = GpctlApp(home, live=False)
        async with app.run_test(size=(160, 48)) as pilot:
            _select(app, a.id)
            await pilot.pause()
            await pilot.press("f")
            await pilot.press(*"lr=0.005", "enter")
            await pilot.pause()
            assert len(app.table.run_ids) == 4
            forked = [r for r in app.rows if r["arm"] == "a-fork8"]
            assert forked and forked[0]["state"] == "queued"
            _select(app, forked[0]["id"])
            await pilot.pause()
            await pilot.press("C", "n")                          # asked, and declined: nothing happens
            await pilot.pause()
            assert [r["state"] for r in app.rows if r["id"] == forked[0]["id"]] == ["queued"]
            await pilot.press("C", "y")
            await pilot.pause()
            assert [r["state"] for r in app.rows if r["id"] == forked[0]["id"]] == ["cancelled"]
            await pilot.press("slash", *"fork")
            await pilot.pause()
            assert len(app.table.run_ids) == 1
            assert app.query_one("#status").render().plain.endswith("filter 'fork'")
            await pilot.press("escape")                           # Escape closes the filter and clears it
            await pilot.pause()
            assert len(app.table.run_ids) == 4 and not app.query_one("#filter").has_class("visible")
            assert app.filter_text == "" and app.table.has_focus
    run(go())


def test_minmax_downsampling_keeps_extremes():
    import numpy as np
    x = np.arange(1000, dtype=float)
    y = np.zeros(1000)
    y[500] = 10.0
    lo, hi = column_minmax(x, y, 0, 999, 10)
    assert hi.max() == 10.0 and lo.min() == 0.0
    rows, (x0, x1, y0, y1) = render([(x, y, "red")], 20, 5)
    assert (x0, x1, y0, y1) == (0.0, 999.0, 0.0, 10.0) and len(rows) == 5
    assert sum(ch != " " for row in rows for ch in row.plain) > 20


@pytest.mark.parametrize("size", [(160, 48), (80, 24)])
def test_tui_in_a_real_terminal_under_tmux(runs, size):
    import shutil
    import subprocess
    import sys
    import time
    if shutil.which("tmux") is None:
        pytest.skip("tmux not installed (apt-get install tmux)")
    home, a, b, c = runs
    session = f"gpctl-test-{a.id[-6:]}-{size[0]}"
    gpctl = [sys.executable, "-m", "gpctl", "--home", str(home), "tui"]
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", str(size[0]), "-y", str(size[1]),
                    " ".join(gpctl)], check=True)

    def screen():
        return subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True).stdout

    def wait_for(text, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in screen():
                return screen()
            time.sleep(0.3)
        raise AssertionError(f"{text!r} not on screen:\n{screen()}")

    try:
        shown = wait_for("loss vs step")
        for rd in (a, b, c):   # the table shows ids without the preset prefix (the preset column has it)
            assert rd.id.removeprefix("tiny-") in shown
        assert "events: " in shown
        assert any(ch in shown for ch in "⡀⡄⠆⠃⣀⠤⠒⠉⢀")   # braille dots: the plot is drawn
        subprocess.run(["tmux", "send-keys", "-t", session, "x"], check=True)
        wait_for("loss vs samples")
        subprocess.run(["tmux", "send-keys", "-t", session, "q"], check=True)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


def test_a_live_run_grows_past_10000_steps_in_tmux_and_no_cell_is_ever_cut(tmp_path):
    """Issue 27's end-to-end: `gpctl tui` in two real terminals (80x24 and 120x40) watches one real
    training process from step 0 to 12000 (samples to 24000: five digits each). Every screen either
    terminal shows must have one whole token under each column it shows, a (step, samples) the run
    recorded, never going back (a step cut to 1200 after 9900 had been shown, or a sample count
    missing its last digit, fails), and an ETA whole with its unit; at the end every cell equals
    `gpctl ls --json`. (A run of it once caught the first frame at 120 columns drawn in the wide
    layout, lr_time cut to "lr_", fixed in GpctlApp.compose; that frame lasts milliseconds, so this
    test does not catch it every time.)"""
    import re
    import shutil
    import subprocess
    import sys
    import time
    if shutil.which("tmux") is None:
        pytest.skip("tmux not installed (apt-get install tmux)")
    home = tmp_path / "home"
    rd = RunDir.create(home, tiny(TINY_IMAGES, "steps=12000", "batch_size=2", "eval_every=3000", "log_every=100",
                                  "checkpoint_every=0", 'model.name="cnn"', "model.width=2", "model.depth=1",
                                  "data.image_size=4", "data.eval_samples=8", "threads=1"),
                       run_id="tiny-grow-000000")
    recorded = {(s, 2 * s) for s in range(1, 12001)}   # every step's record (batch 2: samples = 2 x step)
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    sessions = {size: f"gpctl-grow-{size[0]}-{tmp_path.name[-6:]}" for size in ((80, 24), (120, 40))}
    for (w, h), name in sessions.items():
        subprocess.run(["tmux", "new-session", "-d", "-s", name, "-x", str(w), "-y", str(h),
                        f"{sys.executable} -m gpctl --home {home} tui --poll 0.2"], check=True, env=env)

    def screen(name):
        return subprocess.run(["tmux", "capture-pane", "-p", "-t", name], capture_output=True, text=True).stdout

    def row(text):
        lines = [re.split(r"[│╭╮╰╯]", ln)[0] for ln in text.splitlines()]   # the table's part of a line
        head = next((ln.split() for ln in lines if ln.split()[:2] == ["run", "state"]), None)
        cells = next((ln.split() for ln in lines if ln.split()[:1] == ["grow-000000"]), None)   # the table's row
        if head is None or cells is None:
            return None
        assert len(cells) == len(head), (head, cells, text)  # one whole token under every column shown
        return dict(zip(head, cells))

    trainer = None
    try:
        deadline = time.monotonic() + 60
        while any(row(screen(n)) is None for n in sessions.values()) and time.monotonic() < deadline:
            time.sleep(0.2)
        trainer = subprocess.Popen([sys.executable, "-m", "engine", "train", str(rd.path)], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.STDOUT, cwd=str(rd.path))
        seen = {n: [(0, 0)] for n in sessions.values()}
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and not all(p[-1] == (12000, 24000) for p in seen.values()):
            for name in sessions.values():
                r = row(screen(name))
                if r and r["step"] != "0":
                    pair = (int(r["step"]), int(r["samples"]))
                    assert pair in recorded, (name, r, "a (step, samples) the run never recorded: a cut cell?")
                    assert pair >= seen[name][-1], (name, r, seen[name][-1])
                    assert re.fullmatch(r"-|\d+s", r["ETA"]), (name, r)
                    seen[name].append(pair)
            time.sleep(0.25)
        assert trainer.wait(timeout=60) == 0
        time.sleep(1.0)
        final = {name: row(screen(name)) for name in sessions.values()}
        listed = json.loads(subprocess.run([sys.executable, "-m", "gpctl", "--home", str(home), "ls", "--json"],
                                           capture_output=True, text=True, check=True).stdout)[0]
    finally:
        for name in sessions.values():
            subprocess.run(["tmux", "kill-session", "-t", name], capture_output=True)
        if trainer and trainer.poll() is None:
            trainer.kill()
    for name, pairs in seen.items():
        assert pairs[-1] == (12000, 24000) and len(set(pairs)) >= 10, (name, pairs)    # it watched the run grow
        assert any(0 < s < 10000 for s, _ in pairs) and any(s >= 10000 for s, _ in pairs)   # across the fifth digit
        f = final[name]
        assert f["state"] == listed["state"] == "done"
        assert (int(f["step"]), int(f["samples"])) == (listed["step"], listed["samples"]) == (12000, 24000)
        assert f["eval"] == f"{listed['eval_loss']:.4f}" and float(f["lr"]) == listed["lr"]
        assert int(f["batch"]) == listed["batch_size"] == 2


def test_zoom_sort_resume_enqueue_and_tv_keys(runs, monkeypatch):
    home, a, b, c = runs
    from gpctl import queue
    monkeypatch.setattr(queue, "ensure_worker", lambda *a, **k: False)

    async def go():
        app = GpctlApp(home, live=False)
        async with app.run_test(size=(160, 48)) as pilot:
            _select(app, a.id)
            await pilot.pause()
            full = app.plot.series[0][0].copy()
            await pilot.press("z")
            cut = full[-1] - (full[-1] - full[0]) * 0.25
            assert list(app.plot.series[0][0]) == [v for v in full if v >= cut] == [7.0, 8.0]
            await pilot.press("Z", *"2 5", "enter")
            assert app.x_range == (2.0, 5.0) and list(app.plot.series[0][0]) == [2.0, 3.0, 4.0, 5.0]
            await pilot.press("Z", *"5 2", "enter")                    # refused: FROM must be < TO
            assert app.x_range == (2.0, 5.0) and any("expected 'FROM TO'" in n.message for n in app._notifications)
            await pilot.press("x")                     # a new axis drops the range; the zoom (last 25 %) stays
            assert app.x_range is None and list(app.plot.series[0][0]) == [16.0 * 7, 16.0 * 8]
            await pilot.press("x", "x", "x")                           # back to step
            await pilot.press("o")
            assert app.sort_key == "step"
            _select(app, c.id)
            await pilot.pause()
            await pilot.press("u")
            await pilot.pause()
            assert [r["state"] for r in app.rows if r["id"] == c.id] == ["queued"]
            _select(app, a.id)
            await pilot.press("u")
            assert any("is already done" in n.message for n in app._notifications)
            await pilot.press("n")
            await pilot.pause()
            options = app.screen.query_one("#options")
            demo = next(i for i, o in enumerate(app.screen.options) if o.startswith("demo "))
            options.highlighted = demo
            await pilot.press("enter")
            await pilot.pause()
            await pilot.press(*"nope=1", "enter")                      # a bad override: one line, nothing made
            await pilot.pause()
            assert not [r for r in app.rows if r["preset"] == "demo"]
            assert any(n.severity == "error" and "nope" in n.message for n in app._notifications)
            await pilot.press("n")
            await pilot.pause()
            app.screen.query_one("#options").highlighted = demo
            await pilot.press("enter")
            await pilot.pause()
            await pilot.press(*"steps=60", "enter")
            await pilot.pause()
            demo_rows = [r for r in app.rows if r["preset"] == "demo"]
            assert len(demo_rows) == 3 and all(r["state"] == "queued" and r["steps"] == 60 for r in demo_rows)
            _select(app, a.id)
            await pilot.press("space")
            _select(app, b.id)
            await pilot.press("space", "T")
            await app.workers.wait_for_complete()
            await pilot.pause()
            table = str(app.screen.query_one("#tv-table").render()).splitlines()
            assert [line.split()[1:3] for line in table[1:]][0] == [a.id, "4"] and 0 <= app.screen.rows[0]["tv"] <= 1
    run(go())


def test_table_loss_is_the_ema_of_the_last_records(tmp_path):
    """The table's loss column: EMA 0.8 over the last 64 step records (from the file's tail only)."""
    rd = RunDir.create(tmp_path, tiny(TINY_IMAGES, name="e"))
    losses = [2.0 + ((7 * i) % 11) / 10 for i in range(300)]
    rd.append_metrics([{"step": i + 1, "samples": 16 * (i + 1), "lr_time": i + 1.0, "wall": 0.1, "lr": 0.05,
                        "batch_size": 16, "loss": v} for i, v in enumerate(losses)])
    rd.append_metrics([{"step": 300, "samples": 4800, "lr_time": 300.0, "wall": 1.0, "eval_loss": 1.5}])
    s = None
    for v in losses[-64:]:
        s = v if s is None else 0.8 * s + 0.2 * v
    summary = rd.summary()
    assert summary["loss_ema"] == pytest.approx(s, rel=1e-12) and summary["loss"] == losses[-1]
    assert summary["eval_loss"] == 1.5


def test_a_crash_exits_non_zero_and_says_where_its_traceback_is(tmp_path, monkeypatch):
    """Issue 12: the TUI exited with status 0 after a crash."""
    from textual.app import App
    from typer.testing import CliRunner

    from gpctl.cli import app as cli
    from gpctl.tui.app import GpctlApp

    def boom(self):
        raise RuntimeError("injected fault in refresh_data")
    monkeypatch.setattr(GpctlApp, "refresh_data", boom)
    monkeypatch.setattr(GpctlApp, "run", lambda self: App.run(self, headless=True, size=(100, 30)))
    home = tmp_path / "home"
    home.mkdir()
    res = CliRunner().invoke(cli, ["--home", str(home), "tui"])
    assert res.exit_code == 1, res.output
    log = home / "tui.log"
    assert res.stderr.strip().splitlines()[-1] == (f"error: gpctl tui stopped on an unexpected error; its traceback "
                                                   f"is in {log} (your runs are not affected)")
    assert "RuntimeError: injected fault in refresh_data" in log.read_text()
    monkeypatch.undo()                                   # negative control: a clean run exits 0
    monkeypatch.setattr(GpctlApp, "run", lambda self: App.run(self, headless=True, size=(100, 30), auto_pilot=_quit))
    res = CliRunner().invoke(cli, ["--home", str(home), "tui"])
    assert res.exit_code == 0, res.output


async def _quit(pilot):
    await pilot.pause()
    await pilot.press("q")


def test_enter_opens_the_runs_whole_story(runs):
    """Issue 14: a run's config diff, events as sentences and log tail, one key away."""
    from engine.store.fork import fork
    home, a, b, c = runs
    child = fork(home, a, step=4, overrides=["lr=0.01"], name="a-low")
    child.log("hello from the child's log")

    async def go():
        app = GpctlApp(home, live=False)
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.pause()
            _select(app, child.id)
            await pilot.press("enter")
            await pilot.pause()
            assert app.screen.__class__.__name__ == "Detail"
            text = app.screen.query_one("#detail-text").render().plain
            log = "\n".join(app.screen.query_one("#detail-log").lines)
            assert text.splitlines()[0] == f"{child.id}  tiny/a-low  created"
            assert f"config, where it differs from its parent {a.id}:" in text
            assert "  lr = 0.01    (was 0.05)" in text
            assert log.splitlines()[-1] == "hello from the child's log"
            await pilot.press("escape")
            _select(app, a.id)
            await pilot.press("enter")
            await pilot.pause()
            text = app.screen.query_one("#detail-text").render().plain
            assert "ended done at step 8" in text and f"fork {child.id} made at step 4 with lr=0.01" in text
    run(go())


def test_sort_has_a_direction_puts_missing_values_last_and_shows_in_the_status_line(runs):
    home, a, b, c = runs

    async def go():
        app = GpctlApp(home, live=False)
        async with app.run_test(size=(160, 48)) as pilot:
            await pilot.pause()
            await pilot.press("o", "o")                        # step, then the loss EMA
            await pilot.pause()
            status = app.query_one("#status").render().plain
            assert status == "x step · EMA 0.8 · sort loss_ema ↑ · 3 runs, 1 running" + \
                (f" · {len(app.table.hidden_columns)} columns hidden (Enter)" if app.table.hidden_columns else "")
            order = [r["id"] for r in app.rows]
            la, lb = (next(r["loss_ema"] for r in app.rows if r["id"] == x.id) for x in (a, b))
            assert order == ([a.id, b.id] if la <= lb else [b.id, a.id]) + [c.id]      # c has none: last
            shown = lambda: [k for k in (app.table.coordinate_to_cell_key((i, 0)).row_key.value   # noqa: E731
                                         for i in range(app.table.row_count)) if not k.startswith("preset:")]
            assert shown() == order
            app.table.move_cursor(row=app.table.get_row_index(a.id))
            await pilot.press("O")
            await pilot.pause()
            assert [r["id"] for r in app.rows] == order[:2][::-1] + [c.id]            # still last
            assert "sort loss_ema ↓" in app.query_one("#status").render().plain
            assert shown() == [r["id"] for r in app.rows]     # reordered in place, not rebuilt
            assert app.table.selected_id == a.id               # the cursor stays on its run
            await pilot.press("o", "o", "o", "o")              # back to creation order, still descending: newest first
            await pilot.pause()
            created = [r["id"] for r in sorted(app.rows, key=lambda r: r["created"])]
            assert shown() == created[::-1] and "sort created ↓" in app.query_one("#status").render().plain
            await pilot.press("O")
            await pilot.pause()
            assert shown() == created and "sort created ↑" in app.query_one("#status").render().plain
            assert app.table.selected_id == a.id
    run(go())


def test_an_empty_home_says_what_to_type(tmp_path):
    async def go():
        app = GpctlApp(tmp_path / "none", live=False)
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.pause()
            assert app.query_one("#status").render().plain == (
                f"no runs in {tmp_path / 'none' / 'runs'} yet: gpctl run preset demo (gpctl presets lists them all)")
    run(go())


def test_the_tui_sees_a_cancel_made_by_the_cli(runs):
    """Issue 14: after `gpctl cancel` the TUI still showed the old state (it did not watch jobs.db)."""
    from engine.store.jobs import JobStore
    home, a, b, c = runs
    store = JobStore(home)
    store.enqueue(c.id, c.path)
    c.write_status(state="created")

    async def go():
        app = GpctlApp(home, poll=0.1)
        async with app.run_test(size=(160, 48)) as pilot:
            for _ in range(50):
                await pilot.pause(0.05)
            assert [r["state"] for r in app.rows if r["id"] == c.id] == ["queued"]
            store.request_cancel(c.id)                       # what `gpctl cancel` does to a queued job
            for _ in range(100):
                await pilot.pause(0.05)
                if [r["state"] for r in app.rows if r["id"] == c.id] == ["cancelled"]:
                    break
            assert [r["state"] for r in app.rows if r["id"] == c.id] == ["cancelled"]
    run(go())


def test_tv_panel_computes_in_a_thread_with_a_marked_first(runs):
    """Issue 14: TV was a 20-second toast with A and B chosen alphabetically."""
    home, a, b, c = runs

    async def go():
        app = GpctlApp(home, live=False)
        async with app.run_test(size=(160, 48)) as pilot:
            await pilot.pause()
            for rid in (b.id, a.id):                       # B marked first: it is A
                _select(app, rid)
                await pilot.press("space")
            await pilot.press("T")
            await pilot.pause()
            panel = app.screen
            assert str(panel.query_one("#tv-head").render()) == f"TV of {b.id} (A) to {a.id} (B)"
            for _ in range(600):
                if panel.rows is not None:
                    break
                await pilot.pause(0.1)
            table = str(panel.query_one("#tv-table").render()).splitlines()
            progress = str(panel.query_one("#tv-progress").render())
            return panel.rows, table, progress
    rows, table, progress = run(go())
    assert rows and {r["run_a"] for r in rows} == {b.id} and {r["run_b"] for r in rows} == {a.id}
    # the pairs kept within 2 % of B's loss, and what was dropped, said in the same line
    head = f"{len(rows)} pairs matched by loss; gap = loss A − loss B"
    assert progress == head or (progress.startswith(head + "; main: ") and "pairs dropped, losses more than 2 % "
                                                                          "of B's apart" in progress)
    assert all(abs(r["match_gap"]) <= 0.02 * r["loss_b"] + 1e-12 for r in rows)
    assert table[0].split() == ["curve", "run", "A", "step", "A", "step", "B", "loss", "A", "loss", "B", "gap", "TV"]
    assert [line.split()[1] for line in table[1:]] == [b.id] * len(rows)
    assert all(0 <= r["tv"] <= 1 for r in rows)


def test_tv_panel_follows_a_training_run_and_ends_with_gpctl_tvs_rows(runs, monkeypatch):
    """Issue 30: TV while the runs train. A is "running" and its checkpoints appear one at a time (the
    test moves them in); the panel, computing off the UI thread, shows each look's pairs, says it is
    following, and once A has ended stops with the rows `gpctl tv` computes for the same checkpoints."""
    import os
    import shutil

    from gpctl.compare import tv_rows
    from engine.levels import MATCH_MAX_GAP
    home, a, b, c = runs
    monkeypatch.setattr(GpctlApp, "TV_POLL", 0.3)
    held = home.parent / "held"
    held.mkdir()
    files = sorted(b.checkpoints.iterdir())
    for f in files:
        shutil.move(str(f), held / f.name)
    steps = sorted({f.name[:12] for f in files})
    assert len(steps) >= 2
    b.write_status(state="running", pid=os.getpid())
    seen = []

    async def go():
        app = GpctlApp(home, live=False)
        async with app.run_test(size=(160, 48)) as pilot:
            await pilot.pause()
            for rid in (b.id, a.id):                       # A = b (running), B = a
                _select(app, rid)
                await pilot.press("space")
            await pilot.press("T")
            panel = app.screen
            for step in steps + [None]:
                for _ in range(300):                       # the look after the last move has shown it
                    await pilot.pause(0.05)
                    progress = str(panel.query_one("#tv-progress").render())
                    n = len(panel.rows or [])
                    if panel.rows is not None and n == len(seen) and "following" in progress or \
                            (step is None and "following" not in progress and panel.rows):
                        break
                seen.append(list(panel.rows or []))
                if step is None:
                    break
                assert f"following {b.id}: look " in progress
                for f in sorted(held.glob(step + "*")):
                    shutil.move(str(f), b.checkpoints / f.name)
                if step == steps[-1]:
                    b.write_status(state="done")
            await app.workers.wait_for_complete()
            return panel.rows, str(panel.query_one("#tv-progress").render())
    rows, progress = run(go())
    assert [len(r) for r in seen[:2]] == [0, 1]        # nothing before the first checkpoint; its pair after it
    _, whole = tv_rows(b, a, None, "loss", None, MATCH_MAX_GAP, True, 0, "auto")
    key = lambda r: (r["step_a"], r["step_b"], r["tv"])   # noqa: E731
    assert sorted(map(key, rows)) == sorted(map(key, whole)) and whole
    assert "following" not in progress


def test_fork_dialog_takes_a_step_a_name_and_overrides(runs, monkeypatch):
    """Issue 14: the fork dialog took overrides only; it takes the CLI's --step and --name too, and
    offers the latest checkpoint."""
    home, a, b, c = runs
    from gpctl import queue
    monkeypatch.setattr(queue, "ensure_worker", lambda *a, **k: False)

    async def go():
        app = GpctlApp(home, live=False)
        async with app.run_test(size=(160, 48)) as pilot:
            _select(app, a.id)
            await pilot.pause()
            await pilot.press("f")
            await pilot.pause()
            box = app.screen.query_one("#answer")
            offered = box.value
            box.value = "--step x"                                    # refused in one line, nothing made
            await pilot.press("enter")
            await pilot.pause()
            await pilot.press("f")
            await pilot.pause()
            app.screen.query_one("#answer").value = "--step 4 --name a-at4 lr=0.01"
            await pilot.press("enter")
            await pilot.pause()
            errors = [n.message for n in app._notifications if n.severity == "error"]
            return offered, errors, [r for r in app.rows if r["arm"] == "a-at4"]
    offered, errors, made = asyncio.run(go())
    assert offered == "--step 8 " and errors == ["fork failed: --step needs a whole number, got 'x'"]
    assert len(made) == 1 and made[0]["state"] == "queued"
    from engine.store.rundir import run_dir
    cfg = run_dir(home, made[0]["id"]).config()
    assert (cfg.parent, cfg.lr, cfg.parent_overrides) == (a.id, 0.01, ["lr=0.01"])
    assert cfg.parent_checkpoint == str(dict(a.list_checkpoints())[4].resolve())   # step 4's, not the latest (8)


@pytest.mark.parametrize("size", [(80, 24), (120, 40), (160, 48)])
def test_a_growing_run_never_has_a_cut_cell_and_agrees_with_ls_json(tmp_path, size):
    """Opened on a fresh run, the table follows it from step 1 to five digits of steps and six of
    samples: every shown cell is whole on screen (the column grew), equals `gpctl ls --json`'s value,
    and a column that cannot fit whole is left out and counted in the status line."""
    from typer.testing import CliRunner

    from gpctl.cli import app as cli

    home = tmp_path / "home"
    rd = RunDir.create(home, tiny(TINY_IMAGES, "steps=20000", "lr=0.05", name="grow"))
    rd.write_status(state="running", started=1000.0, updated=1000.0)

    def advance(step):
        rd.append_metrics([{"step": step, "samples": 16 * step, "lr_time": step * 1.0, "wall": 0.1,
                            "lr": 0.05, "batch_size": 16, "loss": 2.5}])
        rd.write_status(state="running", started=1000.0, updated=1000.0 + step / 14.6)

    def screen_row(app, rid):
        t = app.table
        y = t.get_row_index(rid) + 1                   # + the column labels' line
        return t.render_line(y - int(t.scroll_y)).text

    async def go():
        app = GpctlApp(home, live=False)
        async with app.run_test(size=size) as pilot:
            for step in (1, 9, 120, 1200, 16642):
                advance(step)
                app.refresh_data()
                await pilot.pause()
                res = CliRunner().invoke(cli, ["--home", str(home), "ls", "--json"])
                assert res.exit_code == 0 and res.stdout, (res.output, res.stderr, res.exception)
                listed = json.loads(res.stdout) if res.stdout.lstrip().startswith("[") else pytest.fail(repr(res.stdout[:300]))
                (mine,) = [r for r in listed if r["id"] == rd.id]
                line = screen_row(app, rd.id)
                shown = dict(zip(app.table._cols, app.table.get_row(rd.id)))
                assert shown["step"] == str(mine["step"]) == str(step)
                if "samples" in shown:
                    assert shown["samples"] == str(mine["samples"]) == str(16 * step)
                if "lr" in shown:
                    assert shown["lr"] == "0.05" and mine["lr"] == 0.05
                for col, cell in shown.items():      # whole on screen, every one
                    text = cell.plain if hasattr(cell, "plain") else str(cell)
                    assert text.strip() in line, (col, text, line)
                hidden = app.table.hidden_columns
                assert set(app.table._cols) | set(hidden) == set(COLUMNS)
                status = str(app.query_one("#status").render())
                assert (f"{len(hidden)} column" in status) == bool(hidden)
            if size[0] == 80:
                assert app.table.hidden_columns        # 80 columns cannot hold all twelve
            assert shown["ETA"].endswith("s")          # "(20000 - 16642) / rate" with its unit, whole
    run(go())


def test_steering_keys_refuse_before_any_dialog_and_toasts_are_sentences(runs):
    """On a done run d, r, s, t and C say why at once (no dialog opens); on a running one the toast of
    a sent request is words ('batch_size 512'), and a bad factor says what was expected."""
    home, a, b, c = runs

    async def go():
        app = GpctlApp(home, live=False)
        async with app.run_test(size=(120, 40)) as pilot:
            _select(app, a.id)
            await pilot.pause()
            for key in ("d", "r", "s", "t", "C"):
                before = len(app._notifications)
                await pilot.press(key)
                await pilot.pause()
                assert type(app.screen).__name__ not in ("Ask", "Confirm"), key        # no dialog opened
                assert len(app._notifications) == before + 1, key
            messages = [n.message for n in app._notifications]
            assert sum("is done: it takes no more requests" in m for m in messages) == 4
            assert any(m.startswith(f"{a.id} has no queued or running job to cancel") for m in messages)
            _select(app, c.id)
            await pilot.pause()
            await pilot.press("d")
            await pilot.pause()
            app.screen.query_one("Input").value = "lr abc"
            await pilot.press("enter")
            await pilot.pause()
            assert list(app._notifications)[-1].message == "expected a number after 'lr', got 'abc'"
            await pilot.press("d")
            await pilot.pause()
            app.screen.query_one("Input").value = "batch 16"
            await pilot.press("enter")
            await pilot.pause()
            last = list(app._notifications)[-1].message
            assert last.startswith(f"{c.id}: sent batch_size 256 (request ") and "{" not in last
        assert a.control_file.read_text() == ""
        assert json.loads(c.control_file.read_text().splitlines()[-1])["set"] == {"batch_size": 256}
    run(go())
