"""The gpctl TUI: every run's loss live, on the right x-axis, and one key to steer.

    runs table (grouped by preset)  |  loss plot (selected + marked runs, change markers)
    filter                          |  small plots of other fields (m: lr, batch_size, eval_error, …)
                                    |  events of the selected run
                                    |  GPUs
    footer: the keys that apply to what is selected
A thread worker polls the run directories (only new bytes) and posts a merged message; the UI
redraws only when something changed. Every action calls the same functions as the CLI.
"""
from __future__ import annotations

import itertools
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

from engine.config import ConfigError
from engine.control import ControlError, Request, append_request
from engine.analysis.curves import AXES
from engine.store.jobs import JobStore
from engine.store.state import ENDED
from engine.store.rundir import RunDir, UnknownRun, list_runs, run_dir
from gpctl.tui.data import RunTail
from gpctl.tui.dialogs import Ask, Confirm, Detail, Help, Pick, TvPanel
from gpctl.tui.keys import FOOTER, KEYS, bindings, footer_actions, key_screen_text, state_file
from gpctl.tui.widgets.panels import ContextFooter, EventsPane, GpuPanel, RunsTable
from gpctl.tui.widgets.plot import COLORS, LossPlot, eval_color

EMAS = (0.0, 0.8, 0.9, 0.99)
ZOOMS = (1.0, 0.25, 0.05)
MAX_METRICS = 6            # small plots beside the loss


def fork_words(words: list[str]) -> tuple[int | None, float | None, str | None, list[str]]:
    """The fork dialog's words, as `gpctl fork` takes them: --step N | --lr-time T, --name NAME, and
    KEY=VALUE overrides. Returns (step, lr_time, name, overrides); anything else is a ValueError
    naming the word."""
    step = lr_time = name = None
    overrides: list[str] = []
    it = iter(words)
    for w in it:
        if w in ("--step", "--lr-time", "--name"):
            v = next(it, None)
            if v is None:
                raise ValueError(f"{w} needs a value")
            try:
                if w == "--step":
                    step = int(v)
                elif w == "--lr-time":
                    lr_time = float(v)
                else:
                    name = v
            except ValueError:
                raise ValueError(f"{w} needs a {'whole number' if w == '--step' else 'number'}, got {v!r}") from None
        elif w.startswith("-"):
            raise ValueError(f"unknown option {w!r} (--step N, --lr-time T, --name NAME, KEY=VALUE)")
        elif "=" in w:
            overrides.append(w)
        else:
            raise ValueError(f"expected KEY=VALUE, got {w!r}")
    if step is not None and lr_time is not None:
        raise ValueError("--step and --lr-time: give one")
    return step, lr_time, name, overrides


def collapse_groups(rows: list[dict], family, recipe=None) -> tuple[list[dict], dict[str, list[str]]]:
    """Rows with every seed family of two or more runs (same preset, family(arm, group), and the same
    recipe(run id): configs that differ in their seed only) as one row, where its first member was:
    the family, how many seeds, the mean of their loss and eval loss, the least step, samples and
    lr_time, lr and batch where all agree. Returns (rows, {row id: member ids}); a group's id is
    `seeds:<preset>:<family>` (`~2`, `~3` for the same name training something else), never a run
    id (run ids have no colon)."""
    def key(r: dict) -> tuple:     # a run whose config cannot be read (preset "?") is never folded
        if r["preset"] == "?":
            return ("?", r["id"])
        return (r["preset"], family(r["arm"], r.get("group") or ""), recipe(r["id"]) if recipe else "")
    fam: dict[tuple, list[dict]] = {}
    for r in rows:
        fam.setdefault(key(r), []).append(r)
    out, groups, placed = [], {}, set()
    for r in rows:
        members = fam[key(r)]
        if len(members) < 2:
            out.append(r)
            continue
        k = key(r)
        if k in placed:
            continue
        placed.add(k)
        gid = f"seeds:{k[0]}:{k[1]}"
        n = 2
        while gid in groups:          # the same family name training something else: its own group
            gid, n = f"seeds:{k[0]}:{k[1]}~{n}", n + 1
        groups[gid] = [m["id"] for m in members]
        states = {m["state"] for m in members}
        mean = lambda k: (sum(v) / len(v)) if (v := [m[k] for m in members if m.get(k) is not None]) else None  # noqa: E731
        same = lambda k: members[0][k] if len({m[k] for m in members}) == 1 else None                      # noqa: E731
        out.append({"id": gid, "label": f"{k[1]} ×{len(members)}", "members": groups[gid], "preset": k[0],
                    "arm": k[1], "group": members[0].get("group"),
                    "state": next((s for s in ("running", "queued", "unreadable", "failed", "diverged", "lost")
                                   if s in states), None) or (states.pop() if len(states) == 1 else "mixed"),
                    "step": min(m["step"] for m in members), "steps": max(m["steps"] for m in members),
                    "samples": min(m["samples"] for m in members), "lr_time": min((m["lr_time"] or 0) for m in members),
                    "loss_ema": mean("loss_ema"), "eval_loss": mean("eval_loss"), "lr": same("lr"),
                    "batch_size": same("batch_size"), "created": min(m["created"] for m in members),
                    "device": ",".join(sorted({m["device"] for m in members if m["device"]})) or None})
    return out, groups


def _stamp(path: Path) -> tuple:
    try:
        st = path.stat()
        return st.st_mtime_ns, st.st_size
    except OSError:
        return 0, 0


class DataChanged(Message):
    """New records or states, with the rows the poll thread computed (the UI thread only filters,
    sorts and draws them); many merge into one, the latest, while the UI is busy."""

    def __init__(self, rows: list[dict] | None = None):
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


def _queue_action(method):
    """An action that reads or writes jobs.db: a store that cannot be opened (garbage, a lost WAL, a
    full disk) is one error toast naming it, never the end of the TUI."""
    import functools
    import sqlite3

    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sqlite3.DatabaseError as e:
            self.notify(f"{self.home / 'jobs.db'}: {e}", severity="error")
    return guarded


class GpctlApp(App):
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
            key = [rd.change_key() for rd in list_runs(self.home)] + [_stamp(self.home / "jobs.db"),
                                                                       _stamp(self.home / "jobs.db-wal")]
            if key != seen or time.monotonic() - last > 5.0:
                seen, last = key, time.monotonic()
                self.post_message(DataChanged(self.load_rows(cache)))   # the disk work, off the UI thread
            time.sleep(self.poll)

    def on_data_changed(self, message: DataChanged) -> None:
        if message.rows is None:
            self.refresh_data()
        else:
            self.apply_rows(message.rows)

    def refresh_data(self) -> None:
        """Re-read every run now (after an action of ours changed something) and redraw."""
        self.apply_rows(self.load_rows())

    def load_rows(self, cache: dict | None = None) -> list[dict]:
        """Every run's summary and state: the part that reads the disk (the poll thread calls it).
        With `cache` (run id -> (change key, row, when)), only runs whose files changed, or whose row
        is older than 5 s (a process may have died), are summarized again; jobs.db is one query."""
        from engine.store.state import shown as shown_state
        store = JobStore.for_reading(self.home, lenient=True)
        jobs = {j.run_id: j.state for j in store.jobs()}
        self.jobs_problem = store.problem        # shown in the status line
        store.close()
        rows, now = [], time.monotonic()
        for rd in list_runs(self.home):
            key = rd.change_key() + (rd.metrics_size(),)
            hit = cache.get(rd.id) if cache is not None else None
            if hit and hit[0] == key and now - hit[2] < 5.0:
                r = dict(hit[1])
            else:
                r = rd.summary()
                st = rd.status()
                if r["run_state"] == "running" and st.get("started") and st.get("updated", 0) > st["started"]:
                    first = st.get("start_step") if isinstance(st.get("start_step"), int) else 0
                    r["rate"] = (r["step"] - first) / (st["updated"] - st["started"])   # steps/s (this process's)
                if cache is not None:
                    cache[rd.id] = (key, dict(r), now)
            r["state"] = shown_state(r, jobs.get(rd.id))
            rows.append(r)
        return rows

    def apply_rows(self, rows: list[dict]) -> None:
        """Filter, sort and show rows (no disk reads: keys like sort and filter come here directly)."""
        self._all_rows = rows
        text = self.filter_text.lower()
        rows = [r for r in rows if not text or text in f"{r['id']} {r['preset']} {r['arm']} {r['state']}".lower()]
        key = self.sort_key
        rows.sort(key=lambda r: r["created"], reverse=self.sort_desc and not key)   # O: newest first
        if key:   # by the key within each preset, either way, runs without a value last
            have = sorted((r for r in rows if r.get(key) is not None), key=lambda r: r[key], reverse=self.sort_desc)
            rows = have + [r for r in rows if r.get(key) is None]
        rows.sort(key=lambda r: r["preset"])     # stable: keeps the order within a preset
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

    def _marked_rows(self) -> set[str]:
        """Marked runs, and the collapsed groups all of whose runs are marked."""
        return self.marked | {gid for gid, members in self._groups.items() if set(members) <= self.marked}

    def tail(self, run_id: str) -> RunTail:
        if run_id not in self.tails:
            self.tails[run_id] = RunTail(run_dir(self.home, run_id))
        t = self.tails[run_id]
        t.poll()
        return t

    def redraw(self) -> None:
        sel = self.table.selected_id
        series, markers, drawn = [], [], []
        marked_by = self._groups.get(sel, [sel])[0] if sel else None   # whose change markers (a group: its first run's)
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
                if self.with_eval:
                    ex, ey = t.series(self.x_axis, 0, evals=True)
                    lo, hi = self._window(ex)
                    keep = (ex >= lo) & (ex <= hi)
                    series.append((ex[keep], ey[keep], eval_color(color), rid + " eval"))
                if rid == marked_by:
                    markers = t.markers(self.x_axis)
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
        shown = first + sorted(m for m in self.marked if m not in first)
        if not (self.seed_mean or self.collapse_seeds):
            return ([first] if first else []) + [[rid] for rid in shown[len(first):]]
        rows = {r["id"]: r for r in self._all_rows}
        groups: dict[tuple, list[str]] = {}
        for rid in shown:
            r = rows.get(rid)
            key = (r["preset"], self._family(rid)) if r else (rid,)
            groups.setdefault(key, []).append(rid)
        return list(groups.values())

    def action_seed_mean(self) -> None:
        self.seed_mean = not self.seed_mean
        self.redraw()

    def action_collapse_seeds(self) -> None:
        sel = self.table.selected_id
        sel = self._groups.get(sel, [sel])[0] if sel else None   # a group row: its first run
        self.collapse_seeds = not self.collapse_seeds
        self.apply_rows(self._all_rows)
        if sel:
            self.select_run(sel)          # that run's row, or the row of the group it went into

    def action_metrics(self) -> None:
        """Ask which recorded fields to plot beside the loss (W&B's chart per metric)."""
        sel = self.table.selected_id
        runs = self._groups.get(sel) or ([sel] if sel else [])
        have = sorted({f for rid in runs for f in self.tail(rid).fields()}) or ["lr", "batch_size", "eval_error"]

        def done(answer: str | None) -> None:
            if answer is None:
                return
            fields = answer.replace(",", " ").split()
            bad = [f for f in fields if not f.isidentifier() or len(f) >= 64]
            if bad or len(fields) > MAX_METRICS:
                self.notify(f"fields: at most {MAX_METRICS} names like lr batch_size eval_error, got {answer!r}",
                            severity="error")
                return
            self.set_metrics(fields)

        self.push_screen(Ask(f"plot beside the loss (empty: none; recorded: {' '.join(have)})",
                             " ".join(self.metric_fields) or " ".join(f for f in ("lr", "batch_size", "eval_error")
                                                                      if f in have)), done)

    def set_metrics(self, fields: list[str]) -> None:
        self.metric_fields = list(dict.fromkeys(fields))[:MAX_METRICS]
        grid = self.query_one("#metrics", Grid)
        grid.remove_children()
        grid.mount_all([LossPlot(y_label=f, legend=False, classes="small") for f in self.metric_fields])
        n = len(self.metric_fields)
        grid.set_classes(["visible", f"-r{(n + 1) // 2}"] + (["-more"] if n > 3 else []) if n else [])
        self.query_one("#right").set_class(bool(n), "-metrics")   # app.tcss: two per row, three when narrow
        self.call_after_refresh(self.redraw)

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

    def _window(self, x) -> tuple[float, float]:
        """The x interval shown: a typed range, or the last ZOOMS[zoom_i] of the run, or all."""
        if self.x_range is not None:
            return self.x_range
        if ZOOMS[self.zoom_i] < 1 and len(x):
            return x[-1] - (x[-1] - x[0]) * ZOOMS[self.zoom_i], float("inf")
        return float("-inf"), float("inf")

    def gpu_refresh(self) -> None:
        store = JobStore.for_reading(self.home, lenient=True)
        on = {}
        for j in store.jobs(state="running"):
            for d in (j.devices or "").split(","):
                if d:
                    on[d] = j.run_id
        store.close()
        self.sub_title = self.query_one(GpuPanel).show(on)

    @on(RunsTable.RowHighlighted)
    def _row_changed(self, event) -> None:
        self.redraw()

    @on(RunsTable.ColumnsChanged)
    def _columns_changed(self, event) -> None:
        self.redraw()

    @on(RunsTable.RowSelected)
    def _row_selected(self, event) -> None:   # Enter on the table: the table takes the key first
        self.action_detail()

    # ------------------------------------------------------------------ view keys
    def action_mark(self) -> None:
        sel = self.table.selected_id
        if sel:
            runs = self._groups.get(sel, [sel])          # a collapsed seed group: all its runs
            if set(runs) <= self.marked:
                self.marked -= set(runs)
            else:
                for rid in runs:
                    if rid not in self.marked:
                        self.marked.add(rid)
                        self._mark_seq[rid] = next(self._mark_counter)   # TV's A is the run marked first
            self.table.show(self.rows, self._marked_rows())
            self.redraw()

    def action_cycle_x(self) -> None:
        self.x_axis = AXES[(AXES.index(self.x_axis) + 1) % len(AXES)]
        self.x_range = None
        self.redraw()

    def action_cycle_ema(self) -> None:
        self.ema_i = (self.ema_i + 1) % len(EMAS)
        self.redraw()

    def action_logy(self) -> None:
        self.logy = not self.logy
        self.redraw()

    def action_toggle_eval(self) -> None:
        self.with_eval = not self.with_eval
        self.redraw()

    def action_zoom(self) -> None:
        self.zoom_i = (self.zoom_i + 1) % len(ZOOMS)
        self.x_range = None
        self.redraw()

    def action_zoom_range(self) -> None:
        def done(answer: str | None) -> None:
            if answer is None:
                return
            if not answer:
                self.x_range = None
            else:
                try:
                    lo, hi = (float(v) for v in answer.replace(",", " ").split())
                    if not lo < hi:
                        raise ValueError
                except ValueError:
                    self.notify(f"expected 'FROM TO' with FROM < TO, got {answer!r}", severity="error")
                    return
                self.x_range = (lo, hi)
            self.redraw()

        self.push_screen(Ask(f"zoom to a range of {self.x_axis}: FROM TO (empty: all)"), done)

    def action_sort(self) -> None:
        keys = self.SORTS
        self.sort_key = keys[(keys.index(self.sort_key) + 1) % len(keys)]
        self.apply_rows(self._all_rows)

    def action_sort_direction(self) -> None:
        self.sort_desc = not self.sort_desc
        self.apply_rows(self._all_rows)

    def status_text(self) -> str:
        """The view's settings in one line (instead of toasts that cover the plot)."""
        zoom = "all" if self.x_range is None and ZOOMS[self.zoom_i] == 1 else \
            (f"{self.x_range[0]:g}..{self.x_range[1]:g}" if self.x_range else f"last {ZOOMS[self.zoom_i]:.0%}")
        sort = f"{self.sort_key or 'created'} {'↓' if self.sort_desc else '↑'}"
        running = sum(r["state"] == "running" for r in self.rows)
        parts = [f"x {self.x_axis}", f"EMA {EMAS[self.ema_i]}"] + ([f"zoom {zoom}"] if zoom != "all" else []) + [
            f"sort {sort}", f"{len(self.rows)} {'rows' if self._groups else 'runs'}, {running} running"]
        if self.logy:
            parts.insert(2, "log-y")
        if self.seed_mean:
            parts.insert(2, "seeds: mean")
        if self.collapse_seeds:
            parts.insert(2, "seeds: one row")
        if self.jobs_problem:   # the queue could not be read: states come from the runs alone
            parts.insert(0, "jobs.db unreadable (runs shown without jobs)")
        hidden = self.table.hidden_columns
        if hidden:      # left out whole, never cut: say so, and where to read them
            parts.append(f"{len(hidden)} column{'s' if len(hidden) > 1 else ''} hidden (Enter)")
        if self.filter_text:
            parts.append(f"filter '{self.filter_text}'")
        return " · ".join(parts)

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

    # ------------------------------------------------------------------ view state, kept per home
    _restore_sel: str | None = None
    SORTS = (None, "step", "loss_ema", "eval_loss", "lr", "batch_size")

    def view_state(self) -> dict:
        return {"x_axis": self.x_axis, "ema_i": self.ema_i, "logy": self.logy, "with_eval": self.with_eval,
                "zoom_i": self.zoom_i, "seed_mean": self.seed_mean, "collapse_seeds": self.collapse_seeds,
                "metrics": self.metric_fields, "sort_key": self.sort_key, "sort_desc": self.sort_desc,
                "filter": self.filter_text, "marked": sorted(self.marked, key=lambda r: self._mark_seq.get(r, -1)),
                "selected": self.table.selected_id}

    def load_state(self) -> None:
        """The view as it was left (a missing, unreadable or odd file: the defaults; never an error)."""
        import json
        try:
            st = json.loads(state_file(self.home).read_text())
        except (OSError, ValueError):
            return
        if not isinstance(st, dict):
            return
        pick = lambda key, ok, default: st.get(key) if ok(st.get(key)) else default   # noqa: E731
        self.x_axis = pick("x_axis", lambda v: v in AXES, self.x_axis)
        self.ema_i = pick("ema_i", lambda v: isinstance(v, int) and 0 <= v < len(EMAS), self.ema_i)
        self.zoom_i = pick("zoom_i", lambda v: isinstance(v, int) and 0 <= v < len(ZOOMS), self.zoom_i)
        self.logy = pick("logy", lambda v: isinstance(v, bool), self.logy)
        self.with_eval = pick("with_eval", lambda v: isinstance(v, bool), self.with_eval)
        self.seed_mean = pick("seed_mean", lambda v: isinstance(v, bool), self.seed_mean)
        self.collapse_seeds = pick("collapse_seeds", lambda v: isinstance(v, bool), self.collapse_seeds)
        fields = pick("metrics", lambda v: isinstance(v, list) and len(v) <= MAX_METRICS
                      and all(isinstance(f, str) and f.isidentifier() and len(f) < 64 for f in v), [])
        if fields:
            self.set_metrics(fields)
        self.sort_key = pick("sort_key", lambda v: v in self.SORTS, self.sort_key)
        self.sort_desc = pick("sort_desc", lambda v: isinstance(v, bool), self.sort_desc)
        marked = st.get("marked") if isinstance(st.get("marked"), list) else []
        for rid in marked:
            try:
                here = isinstance(rid, str) and run_dir(self.home, rid).path.is_dir()
            except UnknownRun:      # not a plain name: never a path of ours
                here = False
            if here:
                self.marked.add(rid)
                self._mark_seq[rid] = next(self._mark_counter)
        text = st.get("filter")
        if isinstance(text, str) and text:
            box = self.query_one("#filter", Input)
            box.value = self.filter_text = text[:200]
            box.add_class("visible")
        sel = st.get("selected")
        self._restore_sel = sel if isinstance(sel, str) else None

    def save_state(self) -> None:
        import json
        path = state_file(self.home)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(self.view_state()) + "\n")
            tmp.replace(path)
        except OSError:
            pass    # a read-only cache: the next start shows the defaults

    async def action_quit(self) -> None:
        self.save_state()
        self.exit()

    @_queue_action
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

    # ------------------------------------------------------------------ steering keys
    def _selected(self) -> RunDir | None:
        sel = self.table.selected_id
        if sel is None:
            self.notify("no run selected", severity="warning")
            return None
        if sel in self._groups:
            self.notify(f"{sel} is {len(self._groups[sel])} runs (one row per seed family): G shows them one "
                        "per row, to act on one", severity="warning")
            return None
        return run_dir(self.home, sel)

    def _send(self, rd: RunDir, request: dict) -> None:
        from gpctl.steer import check_request
        try:   # validated as the CLI does, before anything is written
            rid = append_request(rd, check_request(rd, request, queued_ok=False))
        except (ControlError, ConfigError, OSError) as e:
            self.notify(str(e), severity="error")
            return
        from gpctl.steer import request_words
        self.notify(f"{rd.id}: sent {request_words(request)} (request {rid}); its acknowledgement shows in the events")

    def _steerable(self, action: bool = False) -> RunDir | None:
        """The selected run if it takes this kind of request now; else say why at once, before any dialog."""
        from gpctl.steer import refusal
        rd = self._selected()
        if rd is None:
            return None
        why = refusal(rd, action)
        if why:
            self.notify(why, severity="warning")
            return None
        return rd

    def _noise(self, lower: bool) -> None:
        from engine.control import BATCH_FACTOR, LR_FACTOR, RAISE_RAMP
        from gpctl.steer import noise_request
        rd = self._steerable()
        if rd is None:
            return

        def done(answer: str | None) -> None:
            if not answer:
                return
            what, _, k = answer.strip().partition(" ")
            try:
                try:
                    factor = float(k) if k.strip() else None
                except ValueError:
                    raise ControlError(f"expected a number after '{what}', got {k.strip()!r}") from None
                if what == "batch":   # "batch 0" is a bad factor, not the default
                    req = noise_request(rd, None, BATCH_FACTOR if factor is None else int(factor), lower, ramp=0.0)
                elif what == "lr":
                    req = noise_request(rd, LR_FACTOR if factor is None else factor, None, lower,
                                        ramp=0.0 if lower else RAISE_RAMP)
                else:
                    raise ControlError(f"expected 'lr K' or 'batch K', got {answer!r}")
            except (ControlError, ValueError, OverflowError) as e:
                self.notify(str(e), severity="error")
                return
            self._send(rd, req)

        verb = "drop" if lower else "raise"
        self.push_screen(Ask(f"{verb} noise of {rd.id}: 'lr K' (lr {'÷' if lower else '×'} K) or 'batch K'",
                             "lr 10"), done)

    def action_drop(self) -> None:
        self._noise(lower=True)

    def action_raise_noise(self) -> None:
        self._noise(lower=False)

    def action_set(self) -> None:
        rd = self._steerable()
        if rd is None:
            return

        def done(answer: str | None) -> None:
            if not answer:
                return
            try:
                request = Request.from_words(answer.split()).body
            except ControlError as e:
                self.notify(str(e), severity="error")
                return
            self._send(rd, request)

        self.push_screen(Ask(f"set on {rd.id}: lr=… batch_size=… [ramp=N]"), done)

    def action_stop(self) -> None:
        rd = self._steerable(action=True)
        if rd:
            self.push_screen(Confirm(f"stop {rd.id}? (it checkpoints and ends; gpctl resume continues it)"),
                             lambda yes: self._send(rd, {"action": "stop"}) if yes else None)

    def action_checkpoint(self) -> None:
        rd = self._steerable(action=True)
        if rd:
            self._send(rd, {"action": "checkpoint"})

    def action_fork(self) -> None:
        """Fork at a checkpoint (the latest, prefilled) with overrides and a name, as `gpctl fork` does."""
        from engine.store.fork import fork
        from gpctl import queue
        rd = self._selected()
        if rd is None:
            return

        def done(answer: str | None) -> None:
            if answer is None:
                return
            try:
                step, lr_time, name, overrides = fork_words(answer.split())
                child = fork(self.home, rd, step=step, lr_time=lr_time, overrides=overrides, name=name)
            except Exception as e:  # noqa: BLE001 - shown, not fatal
                self.notify(f"fork failed: {e}", severity="error")
                return
            queue.enqueue([child], home=self.home)
            queue.ensure_worker(home=self.home)
            self.notify(f"forked {child.id} (queued)")
            self.refresh_data()

        ckpts = rd.list_checkpoints()
        self.push_screen(Ask(f"fork {rd.id}: [--step N | --lr-time T] [--name NAME] k=v … (checkpoints at steps "
                             f"{', '.join(str(st) for st, _ in ckpts[-6:]) or 'none yet'})",
                             f"--step {ckpts[-1][0]} " if ckpts else ""), done)

    @_queue_action
    def action_cancel(self) -> None:
        rd = self._selected()
        if rd is None:
            return
        store = JobStore.for_reading(self.home)
        try:
            job = store.get(rd.id)
        finally:
            store.close()
        if job is None or job.state not in ("queued", "running"):   # refuse before the dialog, as d r s t do
            self.notify(f"{rd.id} has no queued or running job to cancel"
                        + (f" (its job is {job.state})" if job else " (it is not in the queue)"), severity="warning")
            return
        self.push_screen(Confirm(f"cancel {rd.id}'s job? (a running one checkpoints and stops)"),
                         lambda yes: self._cancel(rd) if yes else None)

    @_queue_action
    def _cancel(self, rd: RunDir) -> None:
        from engine.launch import backends
        store = JobStore(self.home)
        try:
            self.notify(f"{rd.id}: {backends.cancel(store, rd.id)}")   # scancel for a Slurm job
        except KeyError:
            self.notify(f"{rd.id} is not in the queue", severity="warning")
        except (RuntimeError, OSError) as e:                           # sbatch tools missing, a read-only home
            self.notify(f"{rd.id}: {e}", severity="error")
        finally:
            store.close()
        self.refresh_data()

    @_queue_action
    def action_resume(self) -> None:
        from gpctl import queue
        from gpctl import runs as ops
        rd = self._selected()
        if rd is None:
            return
        try:
            said = ops.resume_job(self.home, rd)     # what `gpctl resume` does, with its refusals
        except (ConfigError, ValueError) as e:
            self.notify(str(e), severity="warning")
            return
        queue.ensure_worker(home=self.home)
        self.notify(said)
        self.refresh_data()

    def action_enqueue(self) -> None:
        """A preset from a picker, then its overrides (k=v …, as `gpctl run preset NAME --set`)."""
        from engine.presets import list_presets
        from gpctl import queue
        from gpctl import runs as ops

        def enqueue(name: str, answer: str | None) -> None:
            if answer is None:
                return
            overrides = answer.split()
            try:           # a bad override is refused by create_runs, in the words `--set` uses
                rds = ops.create_runs(name, overrides, self.home)
            except Exception as e:  # noqa: BLE001 - one line, not a crash
                self.notify(str(e).splitlines()[0] if str(e) else type(e).__name__, severity="error")
                return
            queue.enqueue(rds, home=self.home)
            queue.ensure_worker(home=self.home)
            self.notify(f"queued {len(rds)} runs of {name}" + (f" with {' '.join(overrides)}" if overrides else ""))
            self.refresh_data()

        def picked(choice: str | None) -> None:
            if choice:
                name = choice.split()[0]
                self.push_screen(Ask(f"enqueue {name}: overrides k=v … (empty: as the preset says)"),
                                 partial(enqueue, name))

        self.push_screen(Pick("enqueue a preset", [f"{p.name}  ({p.figure})" for p in list_presets()]), picked)

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

    @work(thread=True)
    def compute_tv(self, panel: TvPanel, a: str, b: str, c: str | None) -> None:
        """Off the UI thread: torch, checkpoints and the held-out set; the panel shows each pair."""
        try:
            from engine.levels import MATCH_MAX_GAP
            from engine.analysis.tv import pair_runs, tv_curve
            from gpctl.compare import seed_spread
            rows, notes = [], []
            for curve, first in (("main", a), ("baseline", c)):
                if first is None:
                    continue
                told = lambda k, n, what, curve=curve: self.call_from_thread(   # noqa: E731
                    panel.progress, f"TV ({curve}) pair {k + 1}/{n}: {what}")
                ra, rb = run_dir(self.home, first), run_dir(self.home, b)
                pairing = pair_runs(ra, rb, "loss", max_gap=MATCH_MAX_GAP)
                rows += [dict(r, curve=curve) for r in tv_curve(ra, rb, "loss", on_pair=told, pairing=pairing)]
                if pairing.dropped:
                    notes.append(f"{curve}: {len(pairing.dropped)} pairs dropped, losses more than "
                                 f"{MATCH_MAX_GAP * 100:.3g} % of B's apart")
            spread = seed_spread(rows) if c else None
            if spread:
                notes.append(spread["sentence"])
        except Exception as e:  # noqa: BLE001 - shown to the user, in the panel
            self.call_from_thread(panel.show_error, f"{type(e).__name__}: {e}")
            return
        self.call_from_thread(panel.show_rows, rows, notes)
