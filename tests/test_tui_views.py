"""Issues 14 and 27: the footer shows the keys that apply to what is selected; small plots of any recorded
field beside the loss; a seed family as one table row; the detail screen follows log.txt."""
import asyncio
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from gpctl.cli import app as cli
from gpctl.runs import family
from gpctl.tui.app import GpctlApp
from gpctl.tui.rows import collapse_groups
from gpctl.tui.widgets.plot import DASHED, LossPlot, legend_lines, render
from tests.conftest import fixed_runs

RUN0, RUN1, RUN2 = "demo-bs32to512-000000", "demo-bs512-000001", "demo-bs512_seed2-000002"


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    fixed_runs(tmp_path / "home")
    return tmp_path / "home"


def _select(app, rid):
    app.table.move_cursor(row=app.table.get_row_index(rid))


def _footer(app) -> list[str]:
    from textual.widgets._footer import FooterKey
    return [k.action for k in app.query(FooterKey) if "-command-palette" not in k.classes]


def test_footer_shows_the_keys_that_apply(home):
    from engine.store.rundir import run_dir
    from textual.widgets._footer import FooterKey
    run_dir(home, RUN0).write_status(state="running")
    run_dir(home, RUN1).write_status(state="stopped")
    want = {RUN0: ["mark", "detail", "drop", "raise_noise", "stop", "help", "quit"],
            RUN1: ["mark", "detail", "resume", "fork", "help", "quit"],
            RUN2: ["mark", "detail", "fork", "cycle_x", "cycle_ema", "help", "quit"],
            "marked": ["mark", "detail", "drop", "raise_noise", "stop", "tv", "help", "quit"],
            "filter": ["close_filter"]}

    async def settled(pilot, app, expect):
        """The footer is rebuilt asynchronously: wait (up to 10 s on a slow CI box) for it to say what it
        should, and return what it finally says, so a wrong footer still fails, by its own words."""
        for _ in range(100):
            await pilot.pause(0.1)
            if _footer(app) == expect:
                break
        return _footer(app)

    async def go():
        app = GpctlApp(home, live=False)
        async with app.run_test(size=(80, 24)) as pilot:
            seen = {}
            for rid in (RUN0, RUN1, RUN2):
                _select(app, rid)
                seen[rid] = await settled(pilot, app, want[rid])
            app.marked |= {RUN1, RUN2}
            _select(app, RUN0)
            app.redraw()
            seen["running, two marked"] = await settled(pilot, app, want["marked"])
            width = sum(k.outer_size.width for k in app.query(FooterKey))
            await pilot.press("slash")
            seen["filter"] = await settled(pilot, app, want["filter"])
            await pilot.press("escape")
            seen["after escape"] = await settled(pilot, app, want["marked"])
            assert not app.query_one("#filter").has_class("visible") and app.focused is app.table
            return seen, width
    seen, width = asyncio.run(go())
    assert seen[RUN0] == want[RUN0]
    assert seen[RUN1] == want[RUN1]
    assert seen[RUN2] == want[RUN2]
    assert seen["running, two marked"] == want["marked"]
    assert width <= 80                      # the widest context, with ^p palette, fits 80 columns
    assert seen["filter"] == ["close_filter"] and seen["after escape"] == seen["running, two marked"]


def _records(rd, field):
    """The field against step, read straight from metrics.jsonl (not through the TUI's RunTail)."""
    recs = [json.loads(line) for line in rd.metrics_file.read_text().splitlines()]
    recs = [r for r in recs if field in r]
    return np.array([r["step"] for r in recs], float), np.array([r[field] for r in recs], float)


def test_small_plots_of_recorded_fields_beside_the_loss(home):
    from engine.store.rundir import run_dir

    async def go():
        app = GpctlApp(home, live=False)
        async with app.run_test(size=(160, 48)) as pilot:
            _select(app, RUN0)
            await pilot.press("m")
            await pilot.pause()
            box = app.screen.query_one("#answer")
            assert box.value == "lr batch_size eval_error"           # the recorded ones, as a default
            assert "recorded: batch_size eval_error eval_loss loss lr" in str(app.screen.query_one("Label").render())
            box.value = "batch_size eval_error grad_norm"            # grad_norm: not recorded by this run
            await pilot.press("enter")
            await pilot.pause(0.3)
            plots = list(app.query("#metrics LossPlot").results(LossPlot))
            got = {p.y_label: p.series[0][:2] for p in plots}
            titles = [p.border_title for p in plots]
            text = "\n".join(str(p.render()) for p in plots)
            await pilot.press("m")                                    # hostile input: refused, nothing changes
            await pilot.pause()
            app.screen.query_one("#answer").value = "lr; rm -rf /"
            await pilot.press("enter")
            await pilot.pause()
            kept = app.metric_fields
            await pilot.press("q")
            return got, titles, text, kept
    got, titles, text, kept = asyncio.run(go())
    assert titles == ["batch_size vs step", "eval_error vs step", "grad_norm vs step"]
    x, y = _records(run_dir(home, RUN0), "batch_size")
    assert np.array_equal(got["batch_size"][0], x) and np.array_equal(got["batch_size"][1], y)
    assert y[0] == 32 and y[-1] == 512                               # the planned drop, as recorded
    x, y = _records(run_dir(home, RUN0), "eval_error")
    assert np.array_equal(got["eval_error"][0], x) and np.allclose(got["eval_error"][1], 0.3)
    assert len(got["grad_norm"][0]) == 0 and "512" in text           # an unrecorded field: an empty plot
    assert kept == ["batch_size", "eval_error", "grad_norm"]

    async def again():                                                # kept per home
        app = GpctlApp(home, live=False)
        async with app.run_test(size=(160, 48)) as pilot:
            await pilot.pause()
            return [p.y_label for p in app.query("#metrics LossPlot").results(LossPlot)]
    assert asyncio.run(again()) == ["batch_size", "eval_error", "grad_norm"]


def test_collapse_groups_means_and_agreement():
    rows = [{"id": "p-a_s1", "preset": "p", "arm": "a_s1", "state": "done", "step": 10, "steps": 10, "samples": 100,
             "lr_time": 1.0, "loss_ema": 1.0, "eval_loss": None, "lr": 0.1, "batch_size": 32, "created": 5, "device": "cpu"},
            {"id": "p-b", "preset": "p", "arm": "b", "state": "done", "step": 10, "steps": 10, "samples": 100,
             "lr_time": 1.0, "loss_ema": 9.0, "eval_loss": None, "lr": 0.1, "batch_size": 32, "created": 6, "device": None},
            {"id": "p-a_s2", "preset": "p", "arm": "a_s2", "state": "running", "step": 4, "steps": 12, "samples": 40,
             "lr_time": 0.5, "loss_ema": 2.0, "eval_loss": 3.0, "lr": 0.01, "batch_size": 32, "created": 7, "device": "cuda:1"}]
    out, groups = collapse_groups(rows, family)
    assert [r["id"] for r in out] == ["seeds:p:a", "p-b"] and groups == {"seeds:p:a": ["p-a_s1", "p-a_s2"]}
    g = out[0]
    assert (g["state"], g["step"], g["steps"], g["samples"], g["lr_time"]) == ("running", 4, 12, 40, 0.5)
    assert g["loss_ema"] == pytest.approx(1.5) and g["eval_loss"] == 3.0        # the mean of those that have one
    assert g["lr"] is None and g["batch_size"] == 32 and g["device"] == "cpu,cuda:1" and g["label"] == "a ×2"
    assert collapse_groups(rows[1:2], family) == (rows[1:2], {})                # a family of one stays a run
    broken = [dict(rows[1], id=f"x-{i}", preset="?", arm="?", state="unreadable") for i in range(2)]
    assert collapse_groups(broken, family) == (broken, {})                       # unreadable runs: never folded
    # issue 24: a run of the family that trains something else (here a raised lr, 3000 steps) is no seed
    recipes = {"p-a_s1": "r1", "p-a_s2": "r1", "p-a_s3": "r2", "p-b": "r9"}
    more = rows + [dict(rows[0], id="p-a_s3", arm="a_s3", loss_ema=50.0)]
    out, groups = collapse_groups(more, family, recipes.get)
    assert groups == {"seeds:p:a": ["p-a_s1", "p-a_s2"]} and [r["id"] for r in out] == ["seeds:p:a", "p-b", "p-a_s3"]
    assert out[0]["loss_ema"] == pytest.approx(1.5)                              # not averaged with 50


def test_the_recipe_is_the_config_less_its_seed():
    from engine.contract import recipe
    from tests.conftest import TINY_IMAGES, tiny
    a, b = tiny(TINY_IMAGES, "seed=1", name="a_s1"), tiny(TINY_IMAGES, "seed=2", name="a_s2", preset="q")
    assert recipe(a) == recipe(b)                                   # seeds (and names, presets) of one arm
    assert recipe(tiny(TINY_IMAGES, "seed=1", "lr=0.1")) != recipe(a)
    assert recipe(tiny(TINY_IMAGES, "seed=1", "steps=3000")) != recipe(a)
    assert recipe(tiny(TINY_IMAGES, "seed=1", "eval_every=3")) == recipe(a)   # how often it is watched: same


def test_a_seed_family_as_one_row(home):
    from engine.store.rundir import run_dir

    async def go():
        app = GpctlApp(home, live=False)
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.pause()
            loss = {r["id"]: r["loss_ema"] for r in app.rows}
            _select(app, RUN2)
            await pilot.press("G")
            await pilot.pause()
            rows = [(r["id"], r.get("label")) for r in app.rows]
            header = app.table.get_row_at(0)[0].plain
            group = next(r for r in app.rows if r.get("members"))
            sel = app.table.selected_id                               # the group the selected run went into
            line = app.plot.series[-1]
            await pilot.press("space")
            marked = set(app.marked)
            await pilot.press("d")                                    # steering a group: refused, nothing sent
            await pilot.pause()
            screen = type(app.screen).__name__
            await pilot.press("G")
            await pilot.pause()
            back = (app.table.selected_id, len(app.rows))
            return loss, rows, group, sel, line, marked, screen, back, header
    loss, rows, group, sel, line, marked, screen, back, header = asyncio.run(go())
    assert header == "demo · 3 runs"                                   # runs, not rows
    gid = "seeds:demo:bs512"
    assert rows == [(RUN0, None), (gid, "bs512 ×2")] and sel == gid
    assert group["loss_ema"] == pytest.approx((loss[RUN1] + loss[RUN2]) / 2)
    assert line[3] == "bs512 (mean of 2 seeds)"                       # the plot draws the group's mean
    assert marked == {RUN1, RUN2} and screen != "Ask"
    assert [run_dir(home, r).control_file.read_text() for r in (RUN1, RUN2)] == ["", ""]
    assert back == (RUN1, 3)


async def _open_detail(app, pilot, rid):
    """Enter on `rid`: the detail screen's log widget."""
    from textual.widgets import Log
    _select(app, rid)
    await pilot.press("enter")
    await pilot.pause()
    return app.screen.query_one(Log)


def test_detail_screen_follows_the_log(home):
    from engine.store.rundir import run_dir
    rd = run_dir(home, RUN0)
    rd.log("step 1: loss 2.5")

    async def go():
        app = GpctlApp(home, live=False)
        async with app.run_test(size=(120, 40)) as pilot:
            log = await _open_detail(app, pilot, RUN0)
            first = list(log.lines)
            rd.log("step 2: loss 2.4")
            with open(rd.log_file, "a") as f:
                f.write("step 3: lo")                                 # a line still being written
            await pilot.pause(1.3)
            second = list(log.lines)
            await pilot.press("f")                                    # pause
            with open(rd.log_file, "a") as f:
                f.write("ss 2.3\n")
            await pilot.pause(1.3)
            paused = (list(log.lines), log.border_title)
            await pilot.press("f")                                    # follow again: what came meanwhile
            await pilot.pause()
            return first, second, paused, list(log.lines), log.border_title
    first, second, paused, last, title = asyncio.run(go())
    assert first == ["step 1: loss 2.5"]
    assert second == ["step 1: loss 2.5", "step 2: loss 2.4"]
    assert paused == (second, "log.txt — paused (f follows)")
    assert last == second + ["step 3: loss 2.3"] and title == "log.txt — following (f pauses)"


def test_runs_sit_under_a_header_per_preset_that_the_cursor_passes_over(home):
    from engine.store.rundir import RunDir
    from tests.conftest import TINY_IMAGES, tiny
    other = RunDir.create(home, tiny(TINY_IMAGES, name="x", preset="zz"))

    async def go():
        app = GpctlApp(home, live=False)
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.pause()
            t = app.table
            firsts = [t.get_row_at(i)[0].plain.strip() for i in range(t.row_count)]
            _select(app, RUN2)
            await pilot.press("down")
            below = t.selected_id
            await pilot.press("up")
            above = t.selected_id
            await pilot.press("up", "up", "up")
            top = (t.selected_id, t.cursor_row)
            return firsts, below, above, top
    firsts, below, above, top = asyncio.run(go())
    assert firsts == ["demo · 3 runs", "bs32to512-000000", "bs512-000001", "bs512_seed2-000002",
                      "zz · 1 run", other.id[len("zz-"):]]
    assert (below, above) == (other.id, RUN2) and top == (RUN0, 1)


def test_fork_dialog_words_are_the_cli_flags():
    from gpctl.tui.steering import fork_words
    assert fork_words("--step 100 --name bs32-at100 batch_size=32 lr=0.01".split()) == \
        (100, None, "bs32-at100", ["batch_size=32", "lr=0.01"])
    assert fork_words(["--lr-time", "2.5"]) == (None, 2.5, None, [])
    for words, msg in ((["--step", "x"], "--step needs a whole number, got 'x'"), (["--step"], "--step needs a value"),
                       (["--at", "3"], "unknown option '--at'"), (["lr"], "expected KEY=VALUE, got 'lr'"),
                       (["--step", "3", "--lr-time", "1"], "--step and --lr-time: give one")):
        with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            fork_words(words)


def test_detail_screen_says_when_the_log_is_empty_until_it_is_not(home):
    from engine.store.rundir import run_dir
    rd = run_dir(home, RUN1)

    async def go():
        app = GpctlApp(home, live=False)
        async with app.run_test(size=(120, 40)) as pilot:
            log = await _open_detail(app, pilot, RUN1)
            before = log.border_title
            rd.log("step 1: loss 2.5")
            await pilot.pause(1.3)
            return before, log.border_title, list(log.lines)
    before, after, lines = asyncio.run(go())
    assert before == "log.txt (empty so far) — following (f pauses)"
    assert after == "log.txt — following (f pauses)" and lines == ["step 1: loss 2.5"]


def test_hostile_field_names_and_many_fields_never_crash_the_small_plots(home):
    """A record with markup-like, non-identifier and thousands of numeric keys: the TUI keeps at most
    MAX_FIELDS plottable names, shows them as text, and goes on."""
    from engine.store.rundir import run_dir
    from gpctl.tui.data import MAX_FIELDS
    rd = run_dir(home, RUN0)
    junk = {f"f{i}": i for i in range(3000)}
    rd.append_metrics([{"step": 201, "samples": 1, "lr_time": 201.0, "wall": 1.0, "loss": 1.0, "[/bold]": 1.0,
                        "a b": 2.0, **junk}])

    async def go():
        app = GpctlApp(home, live=False)
        async with app.run_test(size=(120, 40)) as pilot:
            _select(app, RUN0)
            await pilot.pause()
            fields = app.tail(RUN0).fields()
            await pilot.press("m")
            await pilot.pause()
            prompt = str(app.screen.query_one("Label").render())
            app.screen.query_one("#answer").value = "f1 f2"
            await pilot.press("enter")
            await pilot.pause(0.3)
            plots = [p.y_label for p in app.query("#metrics LossPlot").results(LossPlot)]
            return fields, prompt, plots, app.is_running
    fields, prompt, plots, alive = asyncio.run(go())
    assert "[/bold]" not in fields and "a b" not in fields and len(fields) <= MAX_FIELDS
    assert prompt.startswith("plot beside the loss") and plots == ["f1", "f2"] and alive


def test_markup_typed_anywhere_is_text(home):
    """`[/x]` in the filter crashed the TUI (the status line parsed it as markup); typed into the
    filter, the zoom and the set dialogs it is shown as typed and the app goes on."""
    async def go():
        app = GpctlApp(home, live=False)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("slash", *"[/x]")
            await pilot.pause(0.3)
            status = str(app.query_one("#status").render())
            await pilot.press("escape", "Z", *"[/x]", "enter")
            await pilot.pause(0.3)
            toast = app._notifications and list(app._notifications)[-1].message
            return status, toast, app.is_running
    status, toast, alive = asyncio.run(go())
    assert status.endswith("filter '[/x]'") and toast == "expected 'FROM TO' with FROM < TO, got '[/x]'" and alive


# ---------------------------------------------------------------- issue 27: the faces
"""Issue 27: the TUI's context right everywhere and the views k9s, lazygit and nvitop users reach for:
a footer per screen, marks numbered in order, every shown run's change markers in its colour, eval
series told from train without colour, a legend that says what it left out, j/k, y (OSC 52), more
table rows, search in the detail log, and the lineage view (also `gpctl lineage`)."""


async def _open(pilot, rid, *keys):
    """Select `rid`, press `keys`, let the screen settle."""
    _select(pilot.app, rid)
    for key in keys:
        await pilot.press(key)
    await pilot.pause(0.3)


def _keys(screen) -> list[str]:
    from textual.widgets._footer import FooterKey
    return [k.description for k in screen.query(FooterKey) if "-command-palette" not in k.classes]


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
def test_each_screen_has_its_own_footer(home, size):
    """The detail screen's footer showed the main screen's keys (`f Fork`, `d Drop`) where f follows
    the log; now each screen that stays open shows its own keys."""
    from engine.store.rundir import run_dir
    run_dir(home, RUN0).write_status(state="running")

    async def go():
        app = GpctlApp(home, live=False)
        async with app.run_test(size=size) as pilot:
            _select(app, RUN0)
            await pilot.pause(0.2)
            main = _keys(app.screen)
            await pilot.press("enter")
            await pilot.pause(0.3)
            detail = _keys(app.screen)
            await pilot.press("escape")
            await pilot.press("question_mark")
            await pilot.pause(0.3)
            help_keys = _keys(app.screen)
            await pilot.press("escape")
            await pilot.press("L")
            await pilot.pause(0.3)
            lineage = _keys(app.screen)
            return main, detail, help_keys, lineage
    main, detail, help_keys, lineage = asyncio.run(go())
    assert "Drop" in main and "Fork" not in main      # the control: the main footer has the steering keys
    assert detail == ["Close", "Follow", "Reload", "Search log", "Next"]
    assert help_keys == ["Close"] and lineage == ["Select run", "Close"]


def test_marks_are_numbered_in_the_order_T_reads_them(home):
    async def go():
        app = GpctlApp(home, live=False)
        async with app.run_test(size=(120, 40)) as pilot:
            for rid in (RUN2, RUN0):            # marked out of the table's order
                _select(app, rid)
                await pilot.press("space")
            await pilot.pause(0.2)
            cells = {rid: str(app.table.get_cell(rid, "run")) for rid in (RUN0, RUN1, RUN2)}
            return cells, app._marked_rows()
    cells, marks = asyncio.run(go())
    assert marks == {RUN2: "1", RUN0: "2"}
    assert cells[RUN2].startswith("1 ") and cells[RUN0].startswith("2 ") and cells[RUN1].startswith("  ")


def test_every_shown_runs_change_markers_in_its_colour(home):
    """Only the selected run's markers were drawn; a marked run's drop was invisible."""
    from engine.store.rundir import run_dir
    with open(run_dir(home, RUN1).events_file, "a") as f:
        f.write(json.dumps({"event": "control", "status": "applied", "time": 1.0, "step": 120, "samples": 61440,
                            "lr_time": 120.0, "changed": {"lr": [0.05, 0.005]}}) + "\n")

    async def go():
        app = GpctlApp(home, live=False)
        async with app.run_test(size=(120, 40)) as pilot:
            _select(app, RUN1)
            await pilot.press("space")
            _select(app, RUN0)
            await pilot.pause(0.2)
            return list(app.plot.markers), [(s[2], s[3]) for s in app.plot.series]
    markers, series = asyncio.run(go())
    colour = dict((label, c) for c, label in series)
    assert markers == [(50.0, "batch 32→512 @ 50", colour[RUN0]), (120.0, "lr 0.05→0.005 @ 120", colour[RUN1])]
    assert colour[RUN0] != colour[RUN1]


def test_eval_is_dashed_so_256_colours_tell_it_from_train(home):
    """`cyan` and `bright_cyan` both render as 38;5;80 in 256 colours: the eval series is drawn
    with every third cell column left empty, and its legend glyph is ┄."""
    x = np.arange(200.0)
    y = np.linspace(2.0, 1.0, 200)
    solid, _ = render([(x, y, "cyan")], 30, 6)
    dashed, _ = render([(x, y, "cyan", DASHED)], 30, 6)
    used = lambda rows: [c for c in range(30) if any(r.plain[c] != " " for r in rows)]   # noqa: E731
    assert used(solid) == list(range(30))
    assert used(dashed) == [c for c in range(30) if c % 3 != 2]

    async def go():
        app = GpctlApp(home, live=False)
        async with app.run_test(size=(160, 48)) as pilot:
            await _open(pilot, RUN1, "v")
            return [(s[2], s[3], s[4:]) for s in app.plot.series], app.plot.render().plain.splitlines()[0]
    series, legend = asyncio.run(go())
    assert series == [("cyan", RUN1, ()), ("bright_cyan", f"{RUN1} eval", (DASHED,))]
    assert legend.split("  ")[:2] == [f"━ {RUN1}", f"┄ {RUN1} eval"]


def test_a_legend_that_cannot_fit_says_how_many_it_left_out():
    items = [(f"━ run-{i:02d}", "cyan") for i in range(12)]
    full = legend_lines(items, 40)
    assert len(full) == 3                                  # 4 items a line
    cut = [str(t) for t in legend_lines(items, 40, max_lines=2)]
    assert cut == ["━ run-00  ━ run-01  ━ run-02  ━ run-03", "━ run-04  ━ run-05  ━ run-06  +5 more"]
    assert [str(t) for t in legend_lines(items[:8], 40, max_lines=2)] == [str(t) for t in full[:2]]   # all fit


def test_j_k_y_and_more_table_rows(home):
    from engine.presets import load_preset
    from engine.store.rundir import RunDir
    cfg = load_preset("demo").configs()[1]
    for i in range(12):                  # more runs than 80x24 shows (created, never trained)
        RunDir.create(home, cfg, run_id=f"demo-extra-{i:06d}")

    async def go():
        app = GpctlApp(home, live=False)
        async with app.run_test(size=(80, 24)) as pilot:
            _select(app, RUN0)
            await pilot.press("j")
            down = app.table.selected_id
            await pilot.press("k")
            up = app.table.selected_id
            await pilot.press("y")
            await pilot.pause(0.1)
            copied = app.clipboard
            before = app.table.size.height
            await pilot.press("plus")
            await pilot.pause(0.3)
            taller = app.table.size.height
            await pilot.press("plus")
            await pilot.pause(0.3)
            return down, up, copied, before, taller, app.table.size.height
    down, up, copied, before, taller, back = asyncio.run(go())
    assert (down, up, copied) == (RUN1, RUN0, RUN0)
    assert (before, taller, back) == (7, 14, 7)      # rows of the table, header line included


def test_search_in_the_detail_log(home):
    from engine.store.rundir import run_dir
    rd = run_dir(home, RUN0)
    with open(rd.log_file, "a") as f:
        f.write("".join(f"line {i}{' needle' if i in (40, 90) else ''}\n" for i in range(150)))

    async def go():
        app = GpctlApp(home, live=False)
        async with app.run_test(size=(120, 40)) as pilot:
            await _open(pilot, RUN0, "enter")
            await pilot.press("slash")
            await pilot.pause(0.2)
            for ch in "NEEDLE":
                await pilot.press(ch)
            await pilot.press("enter")
            await pilot.pause(0.3)
            detail = app.screen
            from textual.widgets import Log
            log = detail.query_one(Log)
            first = (detail.found, str(log.border_title), detail.following)
            await pilot.press("n")
            await pilot.pause(0.2)
            second = (detail.found, round(log.scroll_offset.y))
            await pilot.press("n")
            await pilot.pause(0.2)
            return first, second, detail.found
    first, second, wrapped = asyncio.run(go())
    assert first == (40, "log.txt — 'NEEDLE': line 41, match 1 of 2 (n: next, f: follow)", False)
    assert second == (90, 88)
    assert wrapped == 40


def _tree_home(home):
    """RUN0 forked at step 100 with an override, and a twin of it at step 50 (made as the launcher does)."""
    from safetensors.numpy import save_file

    from engine.store.ckptmeta import FORMAT
    from engine.store.fork import fork
    from engine.store.rundir import run_dir
    parent = run_dir(home, RUN0)
    for step in (50, 100):                       # checkpoint files with only the metadata lineage reads
        path = parent.checkpoint_path(step)
        meta = {"gpctl": FORMAT, "step": str(step), "samples": str(step * 32), "lr_time": json.dumps(step / 2)}
        save_file({"w": np.zeros(1, np.float32)}, str(path), metadata=meta)
        save_file({"w": np.zeros(1, np.float32)}, str(path).replace(".safetensors", ".state.safetensors"))
    a = fork(home, parent, step=100, overrides=["batch_size=512"], name="bs512at100", run_id="demo-bs512at100-aaaaaa")
    b = fork(home, parent, step=50, name="bs32to512-twin50", run_id="demo-bs32to512-twin50-bbbbbb")
    b.append_event("twin_of", run=parent.id, request="r1", step=50, lr_time=25.0)
    return a, b


def test_lineage_cli_and_tui(home):
    _tree_home(home)
    runner = CliRunner()
    res = runner.invoke(cli, ["--home", str(home), "lineage"])
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines() == [
        f"{RUN0}  done",
        "├─ demo-bs32to512-twin50-bbbbbb  created  twin @ step 50 (lr_time 25.0): unsteered",
        "└─ demo-bs512at100-aaaaaa  created  fork @ step 100 (lr_time 50.0): batch_size=512",
        "",
        "2 runs with no forks (gpctl ls)"]
    one = runner.invoke(cli, ["--home", str(home), "lineage", "demo-bs512at100"])
    assert one.stdout.splitlines()[-1].endswith("batch_size=512  ◀")
    js = json.loads(runner.invoke(cli, ["--home", str(home), "lineage", RUN0, "--json"]).stdout)
    assert [(c["id"], c["how"], c["step"]) for c in js[0]["children"]] == [
        ("demo-bs32to512-twin50-bbbbbb", "twin", 50), ("demo-bs512at100-aaaaaa", "fork", 100)]

    async def go():
        app = GpctlApp(home, live=False)
        async with app.run_test(size=(80, 24)) as pilot:
            await _open(pilot, RUN0, "L")
            from textual.widgets import Tree
            tree = app.screen.query_one(Tree)
            labels = [str(n.label) for n in (tree.get_node_at_line(i) for i in range(tree.last_line + 1)) if n]
            at = tree.cursor_node.data
            await pilot.press("down", "down")
            await pilot.press("enter")
            await pilot.pause(0.3)
            return labels, at, app.table.selected_id, type(app.screen).__name__
    labels, at, selected, screen = asyncio.run(go())
    assert at == RUN0 and labels[0] == f"{RUN0}  done"
    assert labels[1:] == ["demo-bs32to512-twin50-bbbbbb  created  twin @ step 50 (lr_time 25.0): unsteered",
                          "demo-bs512at100-aaaaaa  created  fork @ step 100 (lr_time 50.0): batch_size=512"]
    assert selected == "demo-bs512at100-aaaaaa" and screen == "Screen"


def test_a_long_question_wraps_inside_its_dialog_at_80_columns(home):
    """A stop's question is longer than the dialog is wide: it wraps onto more lines, never clipped."""
    from engine.store.rundir import run_dir
    from textual.widgets import Label
    run_dir(home, RUN0).write_status(state="running")

    async def go():
        app = GpctlApp(home, live=False)
        async with app.run_test(size=(80, 24)) as pilot:
            _select(app, RUN0)
            await pilot.press("t")
            await pilot.pause(0.3)
            label = app.screen.query(Label).first()
            return type(app.screen).__name__, str(label.render()), label.size
    name, text, size = asyncio.run(go())
    assert name == "Confirm" and text == f"stop {RUN0}? (it checkpoints and ends; gpctl resume continues it)"
    assert size.width < len(text) <= size.width * size.height and size.height >= 2


class _FakeNVML:
    """pynvml's calls gpu_stats makes, answering for two GPUs; process `pid` holds 3 GiB on GPU 1."""

    def __init__(self, pid):
        from types import SimpleNamespace as NS
        self.NS, self.pid = NS, pid

    def nvmlInit(self): pass
    def nvmlShutdown(self): pass
    def nvmlDeviceGetCount(self): return 2
    def nvmlDeviceGetHandleByIndex(self, i): return i
    def nvmlDeviceGetMemoryInfo(self, h): return self.NS(used=(5 + h) * 2**30, total=80 * 2**30)
    def nvmlDeviceGetUtilizationRates(self, h): return self.NS(gpu=[10, 87][h])

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return [self.NS(pid=self.pid, usedGpuMemory=3 * 2**30), self.NS(pid=1, usedGpuMemory=2**30)] if h == 1 else []


def test_a_running_runs_own_gpu_memory_and_utilisation(home, monkeypatch):
    """nvitop's per-process view, in the table's gpu column: the memory of the processes in the run's
    job's session (the worker starts each job in its own) and its GPUs' utilisation; a process of
    someone else on the same GPU (pid 1) is not counted."""
    import subprocess
    import sys
    from engine.store.jobs import JobStore
    from gpctl.tui.widgets.panels import gpu_cell
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)     # a job's process, its own session
    try:
        monkeypatch.setitem(sys.modules, "pynvml", _FakeNVML(proc.pid))
        store = JobStore(home)
        jid = store.enqueue(RUN0, home / "runs" / RUN0)
        store.update(jid, state="running", pid=proc.pid, devices="1")
        store.close()

        async def go():
            app = GpctlApp(home, live=False)
            async with app.run_test(size=(148, 40)) as pilot:
                await pilot.pause(0.2)
                return dict(app.gpu_use), str(app.table.get_cell(RUN0, "gpu")), str(app.table.get_cell(RUN1, "gpu"))
        use, cell, other = asyncio.run(go())
    finally:
        proc.kill()
    assert use == {RUN0: {"used_gib": 3.0, "util": 87}}
    assert (cell, other) == ("3.0G 87%", "-") and gpu_cell(None) == "-"


def test_S_says_whether_the_run_snapped_and_draws_the_fit(home):
    """Issue 30's snap in the TUI: S on the dropped run gives gpctl snap's sentence (the same
    measure, run in a thread) and draws the reference's held-out points shifted by the fitted tau;
    S on the reference itself is refused in one line and draws nothing."""
    runner = CliRunner()
    want = json.loads(runner.invoke(cli, ["--home", str(home), "snap", RUN0, "--json"]).stdout)
    assert want["verdict"] == "snapped" and want["ref"] == RUN1 and 20 <= want["tau"] <= 40

    async def go():
        app = GpctlApp(home, live=False)
        shown = []
        app.notify = lambda message, **kw: shown.append(message)
        async with app.run_test(size=(160, 48)) as pilot:
            await _open(pilot, RUN0, "S")
            await app.workers.wait_for_complete()
            await pilot.pause(0.2)
            fit = [s for s in app.plot.series if s[3].endswith("(snap fit)")]
            await _open(pilot, RUN1, "S")
            await app.workers.wait_for_complete()
            await pilot.pause(0.2)
            after = [s for s in app.plot.series if s[3].endswith("(snap fit)")]
            return shown, fit, after
    shown, fit, after = asyncio.run(go())
    assert shown[1] == want["sentence"]
    ((x, y, colour, label, dash),) = fit
    ex, ey = _records(run_dir_of(home, RUN1), "eval_loss")
    assert label == f"{RUN1} eval +{want['tau']:.0f} step (snap fit)" and dash == DASHED
    assert np.allclose(x, ex + want["tau"]) and np.allclose(y, ey)
    assert shown[-1] == f"snap: run {RUN1} is its own reference; give --ref another run" and after == []


def run_dir_of(home, rid):
    from engine.store.rundir import run_dir
    return run_dir(home, rid)


def test_the_tv_panel_draws_tv_on_the_figures_axis():
    """Figs. 7/8: TV against A's steps on a batch figure, against A's lr_time on an lr figure (whose arms
    meet at equal LR-normalized time); the baseline against C's; pairs sorted along the axis."""
    from gpctl.tui.dialogs import tv_series
    rows = [{"curve": "main", "step_a": 200, "lr_time_a": 5.0, "tv": 0.2},
            {"curve": "main", "step_a": 100, "lr_time_a": 2.5, "tv": 0.3},
            {"curve": "baseline", "step_a": 150, "lr_time_a": 7.5, "tv": 0.1}]
    series, label = tv_series(rows, "step")
    assert [s[0].tolist() for s in series] == [[100, 200], [150]] and [s[1].tolist() for s in series] == [[0.3, 0.2], [0.1]]
    assert label == "steps of A (C: of C), at matched loss"
    series, label = tv_series(rows, "lr_time")
    assert [s[0].tolist() for s in series] == [[2.5, 5.0], [7.5]] and label.startswith("lr_time of A")
