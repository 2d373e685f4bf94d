"""The runs table, the events pane, the GPU panel and the contextual footer."""
from __future__ import annotations

import time

from rich.cells import cell_len
from rich.text import Text
from textual import events
from textual.app import ComposeResult
from textual.coordinate import Coordinate
from textual.message import Message
from textual.widgets import DataTable, Footer, RichLog, Static
from textual.widgets._footer import FooterKey

from engine.control import event_text

# the most useful first: an 80-column terminal shows about the first eight
COLUMNS = ("run", "state", "step", "loss~", "eval", "lr", "batch", "ETA", "snap", "samples", "lr_time", "device",
           "preset", "gpu")
# gpu: the run's own GPU memory and its GPUs' utilisation, from NVML (nvitop's per-process view); "-" without
# loss~: the EMA (0.8) of the last train losses, as the plot draws it; `gpctl ls`'s loss is the last raw value
# snap: "✓+150" snapped onto its reference 150 steps after T0 (the worker's fit), "changed" noise changed,
# not snapped when last fitted (S fits it now), "-" no change (engine.store.rundir.snap_cell)
STATE_STYLE = {"running": "green", "done": "blue", "failed": "red", "diverged": "red", "queued": "yellow",
               "stopped": "magenta", "cancelled": "grey50", "lost": "red",
               "unreadable": "bold red"}


def _f(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


HEADER = "preset:"        # a header row's key: never a run id (run ids have no colon)


def short_id(r: dict) -> str:
    """The run id without its preset prefix (the rows are grouped by preset, shown in its own column)."""
    prefix = f"{r['preset']}-"
    return r["id"][len(prefix):] if r["preset"] and r["id"].startswith(prefix) else r["id"]


class RunsTable(DataTable):
    DEFAULT_CSS = """
    RunsTable { height: 1fr; }
    """

    def on_mount(self) -> None:
        self.cursor_type = "row"
        self.zebra_stripes = True
        self._cols: tuple[str, ...] = COLUMNS
        for c in COLUMNS:
            self.add_column(c, key=c)

    @property
    def hidden_columns(self) -> tuple[str, ...]:
        """The columns left out because the table is too narrow for them (whole columns, never a cut
        cell): the status line names how many, the detail screen (Enter) shows every field."""
        return tuple(c for c in COLUMNS if c not in getattr(self, "_cols", COLUMNS))

    def fitting(self, cells: dict[str, tuple]) -> tuple[str, ...]:
        """The columns that fit the table's width with every cell whole, in COLUMNS' order (their
        priority): a column is as wide as its widest cell or its label, plus padding; the first that
        does not fit ends the list (`run` always stays). Before the first layout (width 0): all."""
        width = self.scrollable_content_region.width
        if width <= 0:
            return COLUMNS
        pad = 2 * self.cell_padding
        used, keep = 0, []
        for i, c in enumerate(COLUMNS):
            w = max([cell_len(c)] + [cell_len(row[i].plain if isinstance(row[i], Text) else str(row[i]))
                                     for row in cells.values()]) + pad
            if keep and used + w > width:
                break
            keep.append(c)
            used += w
        return tuple(keep)

    def on_resize(self, event: events.Resize) -> None:
        last = getattr(self, "_last", None)
        if last is not None:
            self.show(*last)
            self.post_message(self.ColumnsChanged())

    class ColumnsChanged(Message):
        """The set of shown columns may have changed (a resize): the status line says how many are hidden."""

    def show(self, rows: list[dict], marked: dict[str, str]) -> None:
        """Rows grouped by preset (sorted by it), each group under a header row naming the preset and
        how many runs it has (the run column drops the preset prefix); keeps the cursor on the same
        run. When the same runs are shown in the same order (most refreshes: a few runs advanced),
        only the cells that changed are updated; rebuilding 100 rows on every refresh made keys wait.
        Columns grow as their values do (a step count that gains a digit is never cut), and a column
        that cannot fit whole is left out (`hidden_columns`). `marked`: row id -> its mark ("1", "2"
        in the order the runs were marked, which T reads as A, B, C; "●" for a seed row)."""
        self._last = (rows, marked)
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["preset"]] = counts.get(r["preset"], 0) + len(r.get("members") or [r])   # a seed row: its runs
        cells, order, prev = {}, [], None
        for r in rows:
            if r["preset"] != prev:
                prev = r["preset"]
                hid = HEADER + prev
                order.append(hid)
                n = counts[prev]
                cells[hid] = (Text(f"{prev} · {n} run{'s' if n != 1 else ''}", style="bold underline"),) + \
                    ("",) * (len(COLUMNS) - 1)
            order.append(r["id"])
            cells[r["id"]] = self._cells(r, marked.get(r["id"], ""))
        cols = self.fitting(cells)
        if cols != getattr(self, "_cols", COLUMNS):     # rebuild with the columns that fit
            current = self.selected_id
            self.clear(columns=True)
            for c in cols:
                self.add_column(c, key=c)
            self._cols, self._order = cols, None
            if current is not None:
                self._last_cursor = current
        idx = [COLUMNS.index(c) for c in cols]
        cells = {rid: tuple(row[i] for i in idx) for rid, row in cells.items()}
        shown = getattr(self, "_order", None)
        if shown is not None and self.row_count == len(order) and set(order) == set(shown):
            merged = {}
            for rid in order:   # the objects in the table: new ones where a cell changed
                merged[rid] = tuple(self._update(rid, col, a, b) for col, a, b in zip(cols, self._shown[rid], cells[rid]))
            self._shown = merged
            if order != shown:  # sort and sort direction: reorder in place (the run cell's identity is its row)
                current = self.selected_id
                pos = {id(merged[rid][0]): i for i, rid in enumerate(order)}
                self.sort("run", key=lambda cell: pos[id(cell)])
                self._order = order
                if current is not None and current in self.rows:
                    self.move_cursor(row=self.get_row_index(current))
            return
        current = self.selected_id or getattr(self, "_last_cursor", None)
        self._last_cursor = None
        self.clear()
        for rid in order:
            self.add_row(*cells[rid], key=rid)
        self._order, self._shown = order, cells
        if current is not None and current in self.rows:
            self.move_cursor(row=self.get_row_index(current))
        elif self.row_count:
            self.move_cursor(row=1)                 # the first run, not its preset's header

    def _is_header(self, row: int) -> bool:
        order = getattr(self, "_order", None)
        return bool(order) and 0 <= row < len(order) and order[row].startswith(HEADER)

    def validate_cursor_coordinate(self, value: Coordinate) -> Coordinate:
        """The cursor never rests on a preset's header: it goes on in the direction it moved (up from
        the first run onto the top header: it stays on that run)."""
        value = super().validate_cursor_coordinate(value)
        if self._is_header(value.row):
            step = -1 if value.row < self.cursor_coordinate.row else 1
            for row in (value.row + step, value.row - step):
                if 0 <= row < self.row_count and not self._is_header(row):
                    return Coordinate(row, value.column)
        return value

    @property
    def run_ids(self) -> list[str]:
        """The rows' run ids (and collapsed seed groups) in order, without the preset headers."""
        return [k for k in getattr(self, "_order", []) if not k.startswith(HEADER)]

    def _update(self, rid: str, col: str, old, new):
        if old == new:
            return old
        self.update_cell(rid, col, new, update_width=True)
        return new

    @staticmethod
    def _cells(r: dict, mark: str) -> tuple:
        if r.get("members"):     # a collapsed seed group: its family, how many seeds, their mean
            return (Text(f"{mark or ' ':>1} ▸ {r['label']}", style="bold"),
                    Text(r["state"], style=STATE_STYLE.get(r["state"], "")), str(r["step"]),
                    _f(r.get("loss_ema"), ".4f"), _f(r["eval_loss"], ".4f"), _f(r["lr"], ".3g"),
                    str(r["batch_size"] or "-"), "-", "-", str(r["samples"]), _f(r["lr_time"], ".1f"),
                    r["device"] or "-", r["preset"], "-")
        eta = "-"
        if r["state"] == "running" and r.get("rate"):
            eta = f"{(r['steps'] - r['step']) / r['rate']:.0f}s"
        return (Text(f"{mark or ' ':>1} {short_id(r)}"), Text(r["state"], style=STATE_STYLE.get(r["state"], "")),
                str(r["step"]), _f(r.get("loss_ema"), ".4f"), _f(r["eval_loss"], ".4f"),
                _f(r["lr"], ".3g"), str(r["batch_size"] or "-"), eta, r.get("snap") or "-", str(r["samples"]),
                _f(r["lr_time"], ".1f"), r["device"] or "-", r["preset"], gpu_cell(r.get("gpu")))

    @property
    def selected_id(self) -> str | None:
        if self.row_count == 0:
            return None
        try:
            key = self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value
        except Exception:  # noqa: BLE001 - an empty or refreshing table
            return None
        return None if key is None or key.startswith(HEADER) else key


class EventsPane(RichLog):
    DEFAULT_CSS = """
    EventsPane { height: 10; border: round $secondary; }
    """

    def show(self, run_id: str | None, events: list[dict], problem: str | None = None) -> None:
        self.clear()
        self.border_title = f"events: {run_id or '-'}"
        if problem:                  # an unreadable file: say which and why before anything else
            self.write(Text(f"unreadable: {problem}", style="bold red"))
        for e in events[-200:]:
            t = time.strftime("%H:%M:%S", time.localtime(e.get("time", 0)))
            style = "red" if e.get("status") == "rejected" or e["event"] in ("error", "diverged") else ""
            self.write(Text(f"{t} {event_text(e)[:300]}", style=style))


class GpuPanel(Static):
    """Utilization and memory per GPU through NVML (nvidia-ml-py), and which run is on it."""

    DEFAULT_CSS = """
    GpuPanel { height: auto; max-height: 6; border: round $accent; }
    """

    def on_mount(self) -> None:
        self.border_title = "GPUs"

    def show(self, running_on: dict[str, str], gpus: list[dict] | None = None) -> str:
        """Fill the panel; returns a one-line summary (the header shows it when the panel is hidden).
        `gpus`: gpu_stats() already read (the app reads it once for the panel and the table)."""
        if gpus is None:
            self.update("no GPU (NVML not available)")
            return "no GPU"
        self.update("\n".join(f"GPU {g['index']}: {g['util']:3d}%  {g['used_gib']:5.1f}/{g['total_gib']:.0f} GiB  "
                              f"{running_on.get(str(g['index']), '-')}" for g in gpus) or "no GPU")
        return "  ".join(f"GPU{g['index']} {g['util']}% {g['used_gib']:.0f}/{g['total_gib']:.0f}G" for g in gpus) or "no GPU"


def gpu_cell(use: dict | None) -> str:
    """The table's gpu cell: the run's processes' GPU memory and the utilisation of its GPUs
    ("3.2G 87%"; "3.2G" where NVML gives no utilisation)."""
    if not use:
        return "-"
    util = f" {use['util']}%" if use.get("util") is not None else ""
    return f"{use['used_gib']:.1f}G{util}"


def gpu_stats() -> list[dict] | None:
    """Utilization and memory of each GPU through NVML, with the processes on it (pid, GiB); None
    where NVML is not available."""
    try:
        import pynvml
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no library, no driver, no GPU
        return None
    out = []
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            try:
                procs = [{"pid": p.pid, "used_gib": (p.usedGpuMemory or 0) / 2**30}
                         for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h)]
            except Exception:  # noqa: BLE001 - a driver that does not list processes (some vGPUs)
                procs = []
            out.append({"index": i, "util": pynvml.nvmlDeviceGetUtilizationRates(h).gpu,
                        "used_gib": mem.used / 2**30, "total_gib": mem.total / 2**30, "procs": procs})
    finally:
        pynvml.nvmlShutdown()
    return out


def gpu_use_by_run(gpus: list[dict] | None, jobs: list) -> dict[str, dict]:
    """Each running job's GPU memory (its processes': the one the worker started and, under torchrun,
    its ranks, all in that process's session) and the mean utilisation of the GPUs they are on."""
    import os
    if not gpus:
        return {}
    by_session = {j.pid: j.run_id for j in jobs if j.pid}
    use: dict[str, dict] = {}
    for g in gpus:
        for p in g.get("procs", ()):
            try:
                sid = os.getsid(p["pid"])
            except OSError:          # gone, or in another PID namespace (a container): not ours to name
                continue
            rid = by_session.get(sid) or by_session.get(p["pid"])
            if rid is None:
                continue
            u = use.setdefault(rid, {"used_gib": 0.0, "utils": {}})
            u["used_gib"] += p["used_gib"]
            u["utils"][g["index"]] = g["util"]
    return {rid: {"used_gib": u["used_gib"], "util": round(sum(u["utils"].values()) / len(u["utils"]))}
            for rid, u in use.items()}


class ContextFooter(Footer):
    """Textual's footer, showing only the keys that apply now (app.footer_actions(): steering keys for
    a running run, resume for a stopped one, TV when two runs are marked, Escape while filtering), in
    the order of gpctl/tui/keys.py's FOOTER. Keys stay clickable; the app recomposes it when the
    context changes."""

    def compose(self) -> ComposeResult:
        if not self._bindings_ready:
            return
        active = self.screen.active_bindings
        ours = {b.action: b for b in self.app.BINDINGS if b.show}     # not active_bindings: the table's own
        wanted = [a for a in self.app.footer_actions() if a in ours]  # enter (select a row) shadows Detail's
        self.styles.grid_size_columns = len(wanted) + 1
        for action in wanted:
            b = ours[action]
            key = FooterKey(b.key.split(",")[-1], self.app.get_key_display(b), b.description, b.action)
            key.set_reactive(FooterKey.compact, self.compact)     # Footer's data_bind, without its binding
            key.set_class(self.compact, "-compact")
            yield key    # a click simulates the key: Enter on the table opens the detail screen too
        if self.show_command_palette and self.app.ENABLE_COMMAND_PALETTE:
            try:
                _, b, enabled, tooltip = active[self.app.COMMAND_PALETTE_BINDING]
            except KeyError:
                return
            yield FooterKey(b.key, self.app.get_key_display(b), b.description, b.action,
                            classes="-command-palette", disabled=not enabled, tooltip=b.tooltip or b.description)


class ScreenFooter(Footer):
    """A dialog's footer: the keys of its own screen only. The main screen's footer (Drop, Fork…)
    stays under a dialog otherwise, where `f` follows the log and `d` does nothing."""

    def compose(self) -> ComposeResult:
        if not self._bindings_ready:
            return
        seen = set()
        for node, b, enabled, tooltip in self.screen.active_bindings.values():
            if node is self.app or not b.show or b.action in seen:
                continue
            seen.add(b.action)
            key = FooterKey(b.key, self.app.get_key_display(b), b.description, b.action, disabled=not enabled,
                            tooltip=tooltip)
            key.set_reactive(FooterKey.compact, self.compact)
            key.set_class(self.compact, "-compact")
            yield key
        self.styles.grid_size_columns = max(1, len(seen))
