"""The runs table, the events pane and the GPU panel."""
from __future__ import annotations

import json
import time

from rich.text import Text
from textual.widgets import DataTable, RichLog, Static

COLUMNS = ("id", "preset/arm", "state", "device", "step", "samples", "lr_time", "lr", "batch", "loss", "eval", "ETA")
STATE_STYLE = {"running": "green", "done": "blue", "failed": "red", "diverged": "red", "queued": "yellow",
               "stopped": "magenta", "cancelled": "grey50", "lost": "red"}


def _f(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


class RunsTable(DataTable):
    DEFAULT_CSS = """
    RunsTable { height: 1fr; }
    """

    def on_mount(self) -> None:
        self.cursor_type = "row"
        self.zebra_stripes = True
        for c in COLUMNS:
            self.add_column(c, key=c)

    def show(self, rows: list[dict], marked: set[str]) -> None:
        """Rows grouped by preset; keeps the cursor on the same run."""
        current = self.selected_id
        self.clear()
        for r in rows:
            eta = "-"
            if r["state"] == "running" and r.get("rate"):
                eta = f"{(r['steps'] - r['step']) / r['rate']:.0f}s"
            mark = "● " if r["id"] in marked else "  "
            self.add_row(Text(mark + r["id"]), f"{r['preset']}/{r['arm']}",
                         Text(r["state"], style=STATE_STYLE.get(r["state"], "")), r["device"] or "-",
                         str(r["step"]), str(r["samples"]), _f(r["lr_time"], ".1f"), _f(r["lr"], ".3g"),
                         str(r["batch_size"] or "-"), _f(r.get("loss_ema"), ".4f"), _f(r["eval_loss"], ".4f"), eta,
                         key=r["id"])
        if current is not None and current in self.rows:
            self.move_cursor(row=self.get_row_index(current))

    @property
    def selected_id(self) -> str | None:
        if self.row_count == 0:
            return None
        try:
            return self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value
        except Exception:  # noqa: BLE001 - an empty or refreshing table
            return None


class EventsPane(RichLog):
    DEFAULT_CSS = """
    EventsPane { height: 10; border: round $secondary; }
    """

    def show(self, run_id: str | None, events: list[dict]) -> None:
        self.clear()
        self.border_title = f"events: {run_id or '-'}"
        for e in events[-200:]:
            t = time.strftime("%H:%M:%S", time.localtime(e.get("time", 0)))
            detail = {k: v for k, v in e.items() if k not in ("event", "time", "host", "python", "torch")}
            style = "red" if e.get("status") == "rejected" or e["event"] in ("error", "diverged") else ""
            self.write(Text(f"{t} {e['event']:<10} {json.dumps(detail)[:300]}", style=style))


class GpuPanel(Static):
    """Utilization and memory per GPU through NVML (nvidia-ml-py), and which run is on it."""

    DEFAULT_CSS = """
    GpuPanel { height: auto; max-height: 6; border: round $accent; }
    """

    def on_mount(self) -> None:
        self.border_title = "GPUs"

    def show(self, running_on: dict[str, str]) -> None:
        self.update(gpu_lines(running_on))


def gpu_lines(running_on: dict[str, str]) -> str:
    try:
        import pynvml
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no library, no driver, no GPU
        return "no GPU (NVML not available)"
    lines = []
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            util = pynvml.nvmlDeviceGetUtilizationRates(h).gpu
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            lines.append(f"GPU {i}: {util:3d}%  {mem.used / 2**30:5.1f}/{mem.total / 2**30:.0f} GiB  "
                         f"{running_on.get(str(i), '-')}")
    finally:
        pynvml.nvmlShutdown()
    return "\n".join(lines) or "no GPU"
