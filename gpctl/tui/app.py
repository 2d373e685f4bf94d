"""The gpctl TUI: every run's loss live, on the right x-axis, and one key to steer.

    runs table (grouped by preset)  |  loss plot (selected + marked runs, change markers)
    filter                          |  small plots of other fields (m: lr, batch_size, eval_error, …)
                                    |  events of the selected run
                                    |  GPUs
    footer: the keys that apply to what is selected
A thread worker polls the run directories (only new bytes) and posts a merged message; the UI
redraws only when something changed. Every action calls the same functions as the CLI.

This module is the screen (layout, data, drawing, footer); beside it: rows.py (what is read from
the home, filtered, folded), view.py (view keys and the view state kept per home), steering.py
(steering and queue keys), keys.py (the one list of keys), dialogs.py, data.py (a run's series),
widgets/ (table, plot, panels).
"""
from __future__ import annotations

import itertools
import os
import time
from pathlib import Path

import numpy as np

from functools import partial

from textual import on, work
from textual.app import App, ComposeResult
from textual.command import DiscoveryHit, Hit, Hits, Provider
from textual.containers import Grid, Horizontal, Vertical
from textual.message import Message
from textual.widgets import Header, Input, Static

from engine.store.jobs import JobStore
from engine.store.state import ENDED
from engine.store.rundir import RunDir, list_runs, run_dir
from gpctl.tui.data import RunTail
from gpctl.tui.dialogs import Detail, Help, Lineage, TvPanel
from gpctl.tui.keys import FOOTER, KEYS, bindings, footer_actions, key_screen_text
from gpctl.tui.rows import collapse_groups, filter_sort, load_rows, stamp
from gpctl.tui.steering import SteeringKeys, queue_action
from gpctl.tui.view import EMAS, ViewKeys
from gpctl.tui.widgets.panels import ContextFooter, EventsPane, GpuPanel, RunsTable
from gpctl.tui.widgets.plot import COLORS, DASHED, LossPlot, eval_color



class DataChanged(Message):
    """New records or states, with the rows the poll thread computed (the UI thread only filters,
    sorts and draws them); many merge into one, the latest, while the UI is busy."""

    def __init__(self, rows: list[dict]):
        super().__init__()
        self.rows = rows

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, DataChanged)


class ActionsAndRuns(Provider):
    """The command palette (ctrl+p): every action of the key screen, by name or words of what it
    does (`drop`, `fork`, `tv`), and every run (selects it)."""

    def _entries(self):
        app = self.app
        for _, shown, action, label, desc in KEYS:
            yield f"{action.replace('_', ' ')}: {desc}", partial(app.run_action, action), f"key {shown}"
        for r in app._all_rows:
            yield f"run {r['id']}", partial(app.select_run, r["id"]), f"{r['state']}, step {r['step']}"

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for text, callback, help_text in self._entries():
            score = matcher.match(text)
            if score > 0:
                yield Hit(score, matcher.highlight(text), callback, help=help_text)

    async def discover(self) -> Hits:
        for text, callback, help_text in self._entries():
            yield DiscoveryHit(text, callback, help=help_text)


class GpctlApp(ViewKeys, SteeringKeys, App):
    CSS_PATH = "app.tcss"
    TITLE = "gpctl"
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (150, "-wide")]   # screen classes used by app.tcss
    BINDINGS = bindings()        # gpctl/tui/keys.py: the one list of keys (key screen, palette, docs/tui.md)
    COMMANDS = App.COMMANDS | {ActionsAndRuns}

    def __init__(self, home: Path, poll: float = 1.0, live: bool = True):
        super().__init__()
        self.home, self.poll, self.live = home, poll, live
        self.tails: dict[str, RunTail] = {}
        self.rows: list[dict] = []
        self.marked: set[str] = set()
        self._mark_seq: dict[str, int] = {}
        self._mark_counter = itertools.count()
        self.x_axis, self.ema_i, self.logy, self.with_eval, self.zoom_i = "step", 1, False, False, 0
        self.x_range: tuple[float, float] | None = None   # on the current x-axis; z and x reset it
        self.filter_text, self.sort_key, self.sort_desc = "", None, False
        self.seed_mean = False             # g: seeds of one family as their mean and min-max band
        self.collapse_seeds = False        # G: a seed family as one table row
        self._groups: dict[str, list[str]] = {}   # collapsed row id -> its runs
        self._recipes: dict[str, str] = {}        # run id -> what it trains less its seed (config.toml never changes)
        self.metric_fields: list[str] = []  # m: small plots of these fields beside the loss
        self._footer_context: frozenset | None = None
        self._plotted = None
        self._states: dict[str, str] = {}
        self._all_rows: list[dict] = []    # every run, before the filter (as the poll thread last saw them)

    def notify(self, message: str, *, title: str = "", severity="information", timeout: float | None = None,
               markup: bool = False) -> None:
        """Toasts carry what people typed and what files held: shown as text, never as markup."""
        super().notify(message, title=title, severity=severity, timeout=timeout, markup=markup)

    # ------------------------------------------------------------------ crashes
    crash_log: Path | None = None
    jobs_problem: str | None = None     # why jobs.db could not be read (load_rows), shown in the status line

    def _handle_exception(self, error: Exception) -> None:
        """An unexpected error ends the app with return code 1 (Textual's rule); first keep its
        traceback in a file `gpctl tui` names when it exits, since the screen it was on is gone."""
        import traceback
        text = "".join(traceback.format_exception(error))
        for where in (self.home / "tui.log", Path.home() / ".cache" / "gpctl" / "tui.log"):
            try:
                where.parent.mkdir(parents=True, exist_ok=True)
                with open(where, "a") as f:
                    f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} gpctl tui crashed\n{text}")
                self.crash_log = where
                break
            except OSError:
                continue
        super()._handle_exception(error)

    # ------------------------------------------------------------------ layout
    def compose(self) -> ComposeResult:
        # the breakpoint class before the first frame: Textual sets it on the first resize, after one
        # frame in the class-less (wide) layout, where a 120-column terminal saw lr_time cut to "lr_"
        width = self.size.width
        self.screen.set_class(width < 150, "-narrow")
        self.screen.set_class(width >= 150, "-wide")
        yield Header()
        with Horizontal(id="main"):
            with Vertical(id="left"):
                yield Input(placeholder="filter runs…", id="filter")
                yield RunsTable(id="runs")
            with Vertical(id="right"):
                yield Static("", id="status", markup=False)
                yield LossPlot(id="plot")
                yield Grid(id="metrics")
                yield EventsPane(id="events", wrap=False, markup=False)
                yield GpuPanel(id="gpus")
        yield ContextFooter()

    @property
    def table(self) -> RunsTable:
        return self.query_one(RunsTable)

    @property
    def plot(self) -> LossPlot:
        return self.query_one(LossPlot)

    @property
    def events_pane(self) -> EventsPane:
        return self.query_one(EventsPane)

    def on_mount(self) -> None:
        self.table.focus()
        self.load_state()
        self.refresh_data()
        if self._restore_sel in self.table.rows:
            self.table.move_cursor(row=self.table.get_row_index(self._restore_sel))
        self.gpu_refresh()
        if self.live:
            self.tail_worker()
            self.set_interval(5.0, self.gpu_refresh)

    # ------------------------------------------------------------------ data
    @work(thread=True, exclusive=True)
    def tail_worker(self) -> None:
        """Poll the run directories; post a (mergeable) message when something changed."""
        seen, cache, last = None, {}, 0.0
        while self.is_running:
            key = [rd.change_key() for rd in list_runs(self.home)] + [stamp(self.home / "jobs.db"),
                                                                       stamp(self.home / "jobs.db-wal")]
            if key != seen or time.monotonic() - last > 5.0:
                seen, last = key, time.monotonic()
                self.post_message(DataChanged(self.load_rows(cache)))   # the disk work, off the UI thread
            time.sleep(self.poll)

    def on_data_changed(self, message: DataChanged) -> None:
        self.apply_rows(message.rows)

    def refresh_data(self) -> None:
        """Re-read every run now (after an action of ours changed something) and redraw."""
        self.apply_rows(self.load_rows())

    def load_rows(self, cache: dict | None = None) -> list[dict]:
        rows, self.jobs_problem = load_rows(self.home, cache)     # the problem: shown in the status line
        return rows

    def apply_rows(self, rows: list[dict]) -> None:
        """Filter, sort and show rows (no disk reads: keys like sort and filter come here directly)."""
        self._all_rows = rows
        for r in rows:
            r["gpu"] = self.gpu_use.get(r["id"])
        rows = filter_sort(rows, self.filter_text, self.sort_key, self.sort_desc)
        ended = {r["id"] for r in rows if r["state"] in ("done", "failed", "diverged", "lost")
                 and self._states.get(r["id"]) in ("running", "queued")}
        if ended:
            self.bell()               # a run you watched just ended, failed, diverged or was lost
        self._states = {r["id"]: r["state"] for r in rows}
        self._groups = {}
        if self.collapse_seeds:
            from gpctl.runs import family
            rows, self._groups = collapse_groups(rows, family, self._recipe)
        self.rows = rows
        self.table.show(rows, self._marked_rows())
        self.redraw()

    def _recipe(self, rid: str) -> str:
        """What the run trains, less its seed (engine.contract.recipe): seeds fold only when it agrees."""
        if rid not in self._recipes:
            from engine.config import ConfigError
            from engine.contract import recipe
            try:
                self._recipes[rid] = recipe(run_dir(self.home, rid).config())
            except (ConfigError, OSError):
                self._recipes[rid] = f"unreadable:{rid}"   # never folded with anything
        return self._recipes[rid]

    def _marked_rows(self) -> dict[str, str]:
        """Marked rows and their marks: a run's number in the order of marking (1 is TV's A), and ●
        for a collapsed seed group all of whose runs are marked."""
        order = sorted(self.marked, key=lambda r: self._mark_seq.get(r, -1))
        marks = {rid: str(i + 1) for i, rid in enumerate(order)}
        marks.update({gid: "●" for gid, members in self._groups.items() if set(members) <= self.marked})
        return marks

    def tail(self, run_id: str) -> RunTail:
        if run_id not in self.tails:
            self.tails[run_id] = RunTail(run_dir(self.home, run_id))
        t = self.tails[run_id]
        t.poll()
        return t

    def redraw(self) -> None:
        if not self.query(RunsTable):      # the app is closing: a late RowHighlighted finds its widgets gone
            return
        sel = self.table.selected_id
        series, markers, drawn = [], [], []
        for i, members in enumerate(self._draw_groups(sel)):
            color = COLORS[i % len(COLORS)]
            drawn.append((members, color))
            curves = [self.tail(rid).series(self.x_axis, EMAS[self.ema_i]) for rid in members]
            if len(members) > 1:     # seeds of one family: the min-max band (dim), then the mean over it
                from gpctl.figures import seed_band
                xs, lo, mid, hi = seed_band(curves)
                l, h = self._window(xs)
                keep = (xs >= l) & (xs <= h)
                order = np.argsort(np.concatenate([xs[keep], xs[keep]]), kind="stable")
                series.append((np.concatenate([xs[keep], xs[keep]])[order],
                               np.concatenate([lo[keep], hi[keep]])[order], f"dim {color}", ""))
                series.append((xs[keep], mid[keep], color, f"{self._family(members[0])} (mean of {len(members)} seeds)"))
            else:
                x, y = curves[0]
                lo, hi = self._window(x)
                keep = (x >= lo) & (x <= hi)
                series.append((x[keep], y[keep], color, members[0]))
            for rid in members:
                t = self.tail(rid)
                if self.with_eval:    # dashed as well as brighter: 256 colours render cyan and bright_cyan alike
                    ex, ey = t.series(self.x_axis, 0, evals=True)
                    lo, hi = self._window(ex)
                    keep = (ex >= lo) & (ex <= hi)
                    series.append((ex[keep], ey[keep], eval_color(color), rid + " eval", DASHED))
            # every drawn line's change markers, numbered in its colour (a seed group: its first run's)
            markers += [(x, label, color) for x, label in self.tail(members[0]).markers(self.x_axis)]
        series += self._snap_series(sel)
        self.plot.set_data(series, markers, self.x_axis, self.logy)
        self._draw_metrics(drawn, markers)
        self._update_footer()
        self.query_one("#status", Static).update(
            self.status_text() if self.rows or self.filter_text else
            f"no runs in {self.home / 'runs'} yet: gpctl run preset demo (gpctl presets lists them all)")
        if sel:
            row = next((r for r in self.rows if r["id"] == sel), {})
            first = self._groups.get(sel, [sel])[0]    # a seed group: its first run's events
            events = self.tail(first).events
            shown_key = (sel, len(events), row.get("problem"))
            if shown_key != getattr(self, "_events_shown", None):   # rewriting 200 lines per refresh costs
                self._events_shown = shown_key
                title = first if first == sel else f"{first} (1 of {len(self._groups[sel])} seeds)"
                self.events_pane.show(title, events, row.get("problem"))

    def _draw_metrics(self, drawn: list[tuple[list[str], str]], markers) -> None:
        """The small plots: each field of `m` for the runs the loss plot draws, in the same colours,
        on the same x-axis and window, with the same change markers (numbered as in its legend)."""
        if not self.metric_fields:
            return
        for plot, field in zip(self.query("#metrics LossPlot").results(LossPlot), self.metric_fields):
            series = []
            for members, color in drawn:
                for rid in members:
                    x, y = self.tail(rid).field_series(self.x_axis, field)
                    lo, hi = self._window(x)
                    keep = (x >= lo) & (x <= hi) & np.isfinite(y)
                    series.append((x[keep], y[keep], color, ""))
            plot.set_data(series, markers, self.x_axis, False)

    def _family(self, rid: str) -> str:
        from gpctl.runs import family
        row = next((r for r in self._all_rows if r["id"] == rid), None)
        return family(row["arm"], row.get("group") or "") if row else rid

    def _draw_groups(self, sel: str | None) -> list[list[str]]:
        """What the loss plot draws, one list of runs per line: the selected row's runs first (a
        collapsed seed group: all of them, as their mean), then the marked runs. With `g` or `G` on,
        the seeds of one family (same preset, arms that differ only by a seed suffix, or one --seeds
        group) are one line: their mean, with the min-max band."""
        first = self._groups.get(sel) or ([sel] if sel else [])
        shown = first + sorted((m for m in self.marked if m not in first), key=lambda r: self._mark_seq.get(r, -1))
        if not (self.seed_mean or self.collapse_seeds):
            return ([first] if first else []) + [[rid] for rid in shown[len(first):]]
        rows = {r["id"]: r for r in self._all_rows}
        groups: dict[tuple, list[str]] = {}
        for rid in shown:
            r = rows.get(rid)
            key = (r["preset"], self._family(rid)) if r else (rid,)
            groups.setdefault(key, []).append(rid)
        return list(groups.values())

    def action_close_filter(self) -> None:
        box = self.query_one("#filter", Input)
        if box.has_class("visible") or box.value:
            box.value = ""
            box.remove_class("visible")
            self.filter_text = ""
            self.table.focus()
            self.apply_rows(self._all_rows)

    # ------------------------------------------------------------------ the contextual footer
    def on_descendant_focus(self, event) -> None:
        self._update_footer()                 # into or out of the filter box: its keys, or the table's

    def footer_context(self) -> frozenset:
        if self.query_one("#filter", Input).has_focus:
            return frozenset({"filter"})
        ctx = set()
        sel = self.table.selected_id
        if sel:
            ctx.add("row")
            state = next((r["state"] for r in self.rows if r["id"] == sel), "")
            if sel in self._groups:
                ctx.add("group")
            else:
                ctx.add("run")
                ctx |= {"running"} if state == "running" else {"queued"} if state == "queued" else set()
                if state in ENDED and state != "done":
                    ctx.add("resumable")
                if state in ENDED:
                    ctx.add("ended")
        if 2 <= len(self.marked) <= 3:
            ctx.add("pair")
        if sum(need in ctx and need not in ("row", "run") for _, need in FOOTER) <= 1:
            ctx.add("view")                 # room for the view keys
        return frozenset(ctx)

    def footer_actions(self) -> list[str]:
        return footer_actions(set(self._footer_context or self.footer_context()))

    def _update_footer(self) -> None:
        ctx = self.footer_context()
        if ctx != self._footer_context:
            self._footer_context = ctx
            footer = self.query_one(ContextFooter)
            if footer._bindings_ready:
                footer.call_after_refresh(footer.recompose)

    gpu_use: dict[str, dict] = {}      # run id -> its GPU memory and utilisation (the table's gpu column)

    def gpu_refresh(self) -> None:
        from gpctl.tui.widgets.panels import gpu_stats, gpu_use_by_run
        store = JobStore.for_reading(self.home, lenient=True)
        jobs = store.jobs(state="running")
        store.close()
        on = {}
        for j in jobs:
            for d in (j.devices or "").split(","):
                if d:
                    on[d] = j.run_id
        gpus = gpu_stats()
        self.sub_title = self.query_one(GpuPanel).show(on, gpus)
        use = gpu_use_by_run(gpus, jobs)
        if use != self.gpu_use:
            self.gpu_use = use
            if self._all_rows:
                self.apply_rows(self._all_rows)

    @on(RunsTable.RowHighlighted)
    def _row_changed(self, event) -> None:
        self.redraw()

    @on(RunsTable.ColumnsChanged)
    def _columns_changed(self, event) -> None:
        self.redraw()

    @on(RunsTable.RowSelected)
    def _row_selected(self, event) -> None:   # Enter on the table: the table takes the key first
        self.action_detail()

    def action_detail(self) -> None:
        rd = self._selected()
        if rd is not None:
            self.push_screen(Detail(partial(self.story, rd), rd))

    def story(self, rd: RunDir) -> list[str]:
        """The detail screen's text: what `gpctl show` prints (a run that cannot be read says why)."""
        from gpctl.detail import run_info, run_lines
        try:
            return run_lines(rd, run_info(self.home, rd))
        except Exception as e:  # noqa: BLE001 - a detail that cannot be read is a message, not a crash
            return [f"{rd.id}: {type(e).__name__}: {e}"]

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.add_class("visible")
        box.focus()

    @on(Input.Changed, "#filter")
    def _filter(self, event: Input.Changed) -> None:
        self.filter_text = event.value
        self.apply_rows(self._all_rows)

    @on(Input.Submitted, "#filter")
    def _filter_done(self, event: Input.Submitted) -> None:
        if not event.value:
            self.query_one("#filter", Input).remove_class("visible")
        self.table.focus()

    async def action_quit(self) -> None:
        self.save_state()
        self.exit()

    @queue_action
    def action_queue(self) -> None:
        """The queue as `gpctl queue` prints it (read-only: the TUI never syncs or changes it here)."""
        from gpctl.queue import queue_rows, queue_text
        store = JobStore.for_reading(self.home)
        try:
            text = queue_text(queue_rows(store))
        finally:
            store.close()
        self.push_screen(Help(f"queue of {self.home}\n\n{text}"))

    def select_run(self, run_id: str) -> None:
        """Put the cursor on a run (the palette's run entries); clears a filter that hides it."""
        if run_id not in self.table.rows and self.filter_text:
            box = self.query_one("#filter", Input)
            box.value = ""
            box.remove_class("visible")
            self.filter_text = ""
            self.apply_rows(self._all_rows)
        run_id = next((gid for gid, members in self._groups.items() if run_id in members), run_id)
        if run_id in self.table.rows:
            self.table.move_cursor(row=self.table.get_row_index(run_id))
            self.table.focus()

    def action_help(self) -> None:
        self.push_screen(Help(key_screen_text()))

    def action_copy_id(self) -> None:
        """The selected run's id to the clipboard, by OSC 52 (the terminal's, also over SSH)."""
        sel = self.table.selected_id
        if sel is None:
            self.notify("no run selected", severity="warning")
            return
        run_id = self._groups.get(sel, [sel])[0] if sel in self._groups else sel
        self.copy_to_clipboard(run_id)
        self.notify(f"copied {run_id}" + (f" (the first of {len(self._groups[sel])} seeds)" if sel in self._groups else ""))

    def action_lineage(self) -> None:
        """The selected run's tree of forks and twins (every tree with a fork when none is selected)."""
        from gpctl.lineage import find, lineage
        sel = self.table.selected_id
        sel = self._groups.get(sel, [sel])[0] if sel else None
        roots = lineage(self.home)
        root = find(roots, sel) if sel else None
        shown = [root] if root else [r for r in roots if r.children] or roots
        self.push_screen(Lineage(shown, sel), lambda rid: self.select_run(rid) if rid else None)

    snap_fit: dict | None = None      # the last S: its run, reference, axis and shift (drawn while it applies)

    def action_snap(self) -> None:
        rd = self._selected()
        if rd is not None:
            self.notify(f"{rd.id}: fitting its held-out curve to its reference…")
            self.compute_snap(rd)

    @work(thread=True, exclusive=True, group="snap")
    def compute_snap(self, rd: RunDir) -> None:
        """Off the UI thread (it reads the runs' whole held-out curves): gpctl snap's measure."""
        from gpctl.runs import measure_snap
        try:
            res = measure_snap(self.home, rd)
        except Exception as e:  # noqa: BLE001 - a message, not a crash
            self.call_from_thread(self.notify, f"snap: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                                  severity="warning")
            return
        self.call_from_thread(self._show_snap, res)

    def _show_snap(self, res: dict) -> None:
        self.snap_fit = res if res.get("tau") is not None and res.get("ok") else None
        self.notify(res["sentence"], severity="information" if res["verdict"] == "snapped" else "warning",
                    timeout=12)
        self.redraw()

    def _snap_series(self, sel: str | None) -> list:
        """The reference's held-out points translated by the fit's shift, dim, while the fit's run is
        selected and the plot is on the fit's axis (the figure's translation, drawn where it was fitted)."""
        fit = self.snap_fit
        if not fit or fit["run"] != sel or fit["x"] != self.x_axis:
            return []
        x, y = self.tail(fit["ref"]).series(self.x_axis, 0, evals=True)
        x = x + fit["tau"]
        lo, hi = self._window(x)
        keep = (x >= lo) & (x <= hi)
        side = "+" if fit["tau"] >= 0 else "−"
        return [(x[keep], y[keep], "grey70", f"{fit['ref']} eval {side}{abs(fit['tau']):.0f} {fit['x']} (snap fit)",
                 DASHED)]

    def action_tv(self) -> None:
        if len(self.marked) not in (2, 3):
            self.notify("mark two runs (space) to compare them by TV: A first, then B (the low-noise run); "
                        "a third marked run is the baseline C", severity="warning")
            return
        order = sorted(self.marked, key=lambda rid: self._mark_seq.get(rid, -1))   # A: marked first
        a, b, c = order[0], order[1], (order[2] if len(order) == 3 else None)
        panel = TvPanel(a, b, c)
        self.push_screen(panel)
        self.compute_tv(panel, a, b, c)

    TV_POLL = 10.0       # seconds between a live TV panel's looks for new checkpoints

    @work(thread=True)
    def compute_tv(self, panel: TvPanel, a: str, b: str, c: str | None) -> None:
        """Off the UI thread (and never in a training process): torch, checkpoints and the held-out set;
        the panel shows each pair. While A, B or C is running or queued the panel follows them, as
        `gpctl tv --follow` does: every TV_POLL seconds the new checkpoints' TVs (one evaluation at a
        time, in this niced thread; earlier pairs come from the cache), until they end or it closes."""
        import threading

        from textual.worker import get_current_worker
        worker = get_current_worker()
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)   # this thread only (Linux)
        except (AttributeError, OSError):
            pass
        try:   # the figure's axis of A's preset: TV against lr_time on an lr figure (Fig. 8), else steps
            from engine.presets import load_preset
            from gpctl.runs import figure_axis
            panel.axis = figure_axis(load_preset(run_dir(self.home, a).config().preset, check=False), None)
        except Exception:  # noqa: BLE001 - no preset (or an unreadable one): steps
            panel.axis = "step"
        look = 0
        while True:
            look += 1
            try:
                from engine.levels import MATCH_MAX_GAP
                from gpctl.compare import seed_spread, tv_rows
                from gpctl.steer import run_state
                runs = {r: run_dir(self.home, r) for r in (a, b, c) if r}
                growing = [r for r, rd in runs.items() if run_state(rd) in ("running", "queued")]
                told = lambda curve, k, n, what: self.call_from_thread(   # noqa: E731
                    panel.progress, f"TV ({curve}) pair {k + 1}/{n}: {what}")
                pairings, rows = tv_rows(runs[a], runs[b], runs.get(c), "loss", None, MATCH_MAX_GAP, True, 0, "auto",
                                         on_pair=told)
                notes = [f"{curve}: {len(pr.dropped)} pairs dropped, losses more than {MATCH_MAX_GAP * 100:.3g} % "
                         f"of B's apart" for curve, pr in pairings.items() if pr.dropped]
                spread = seed_spread(rows) if c else None
                if spread:
                    notes.append(spread["sentence"])
                if growing:
                    notes.append(f"following {', '.join(growing)}: look {look}, the next in {self.TV_POLL:g} s")
            except Exception as e:  # noqa: BLE001 - shown to the user, in the panel
                self.call_from_thread(panel.show_error, f"{type(e).__name__}: {e}")
                return
            self.call_from_thread(panel.show_rows, rows, notes)
            if not growing:
                return
            until = time.monotonic() + self.TV_POLL
            while time.monotonic() < until:
                if not panel.is_attached or worker.is_cancelled:
                    return
                time.sleep(0.2)
