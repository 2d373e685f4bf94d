"""The TUI's view keys and the view state kept per home: which x-axis, EMA, zoom, sort, small plots,
marks and seed folding the loss plot and the table show. A mixin of GpctlApp (app.py), which holds
the attributes these read."""
from __future__ import annotations

from textual.containers import Grid
from textual.widgets import Input

from engine.analysis.curves import AXES
from engine.store.rundir import UnknownRun, run_dir
from gpctl.tui.dialogs import Ask
from gpctl.tui.keys import state_file
from gpctl.tui.widgets.plot import LossPlot

EMAS = (0.0, 0.8, 0.9, 0.99)
ZOOMS = (1.0, 0.25, 0.05)
MAX_METRICS = 6            # small plots beside the loss


class ViewKeys:
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

    def _window(self, x) -> tuple[float, float]:
        """The x interval shown: a typed range, or the last ZOOMS[zoom_i] of the run, or all."""
        if self.x_range is not None:
            return self.x_range
        if ZOOMS[self.zoom_i] < 1 and len(x):
            return x[-1] - (x[-1] - x[0]) * ZOOMS[self.zoom_i], float("inf")
        return float("-inf"), float("inf")

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

    def action_row_down(self) -> None:
        self.table.action_cursor_down()

    def action_row_up(self) -> None:
        self.table.action_cursor_up()

    def action_taller(self) -> None:
        """More table rows on a narrow screen (80×24: 4-5 rows): up to 14, the events pane folded."""
        if not self.screen.has_class("-narrow"):
            self.notify("the table already has the screen's whole height here (wide layout)", severity="information")
            return
        self.screen.toggle_class("-tall")

