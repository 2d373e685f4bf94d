"""Every key of the TUI in one place: the app's bindings, its key screen (`?`), its command palette
(ctrl+p), its contextual footer (FOOTER) and docs/tui.md's key table are all made from KEYS. The view's state (axis, EMA, log-y,
eval, zoom, sort, filter, marks, selection) is kept per home between uses (state_file)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from textual.binding import Binding

# (keys as Textual names them, as a person types them, action, footer label or "" (not in the footer), what it does)
KEYS: list[tuple[str, str, str, str, str]] = [
    ("space", "space", "mark", "Mark", "mark / unmark the selected run (numbered in order: T's A, B, C)"),
    ("j", "j", "row_down", "", "next row (as ↓)"),
    ("k", "k", "row_up", "", "previous row (as ↑)"),
    ("y", "y", "copy_id", "", "copy the selected run's id (OSC 52: works over SSH)"),
    ("plus", "+", "taller", "", "more table rows (the plot gets fewer), and back"),
    ("L", "L", "lineage", "", "lineage: the tree of parents, forks and twins; Enter selects a run"),
    ("enter", "enter", "detail", "Detail", "the whole story: config diff, events, log (followed), family"),
    ("x", "x", "cycle_x", "X-axis", "x-axis: step → samples → lr_time → wall"),
    ("e", "e", "cycle_ema", "EMA", "EMA smoothing of the loss: 0 → 0.8 → 0.9 → 0.99"),
    ("l", "l", "logy", "", "log-scale loss axis"),
    ("v", "v", "toggle_eval", "", "eval loss as a second series"),
    ("m", "m", "metrics", "", "small plots beside the loss: lr, batch_size, eval_error, any field"),
    ("g", "g", "seed_mean", "", "seeds of one family drawn as their mean and min–max band"),
    ("G", "G", "collapse_seeds", "Seeds", "a seed group as one table row (its mean), and back"),
    ("z", "z", "zoom", "", "zoom: all → last 25 % → last 5 % of the x-axis"),
    ("Z", "Z", "zoom_range", "", "zoom to a range of the x-axis: FROM TO (empty: all)"),
    ("o", "o", "sort", "", "sort by the next column: created, step, loss~, eval, lr, batch"),
    ("O", "O", "sort_direction", "", "reverse the sort (runs without a value stay last)"),
    ("slash", "/", "filter", "", "filter runs by text"),
    ("escape", "esc", "close_filter", "Close filter", "close the filter and clear it"),
    ("d", "d", "drop", "Drop", "drop the noise: lr K (lr ÷ K) or batch K (batch × K)"),
    ("r", "r", "raise_noise", "Raise", "raise the noise: lr K (lr × K, ramped) or batch K (batch ÷ K)"),
    ("s", "s", "set", "", "set exactly: lr=… batch_size=… [ramp=N]"),
    ("t", "t", "stop", "Stop", "stop: checkpoint, then end (asks first)"),
    ("c", "c", "checkpoint", "", "checkpoint now"),
    ("f", "f", "fork", "Fork", "fork: --step N (latest offered) --name NAME k=v … as gpctl fork"),
    ("delete,C", "C / del", "cancel", "Cancel", "cancel the job (asks first; scancel for a Slurm job)"),
    ("u", "u", "resume", "Resume", "resume: queue it again from its last checkpoint"),
    ("n", "n", "enqueue", "", "enqueue a preset: a picker, then its overrides k=v …"),
    ("T", "T", "tv", "TV", "TV at matched loss, marked runs in order: A to B, C: baseline"),
    ("S", "S", "snap", "", "snap: did the run snap onto its reference? (gpctl snap; fit drawn)"),
    ("Q", "Q", "queue", "", "the queue: running jobs and where, queued ones in order"),
    ("question_mark", "?", "help", "Help", "this key screen"),
    ("q", "q", "quit", "Quit", "quit (runs go on)"),
]

# The footer shows what applies now (lazygit's way): each action with the context it needs, in order.
# Contexts (GpctlApp.footer_context): filter (the filter box has the keys), row (a row is selected),
# run (a run, not a seed group), running, queued, resumable, ended, pair (2 or 3 marked: TV), group
# (a collapsed seed group is selected), view (nothing run-specific to offer: room for view keys).
FOOTER: list[tuple[str, str]] = [
    ("close_filter", "filter"), ("mark", "row"), ("detail", "run"),
    ("drop", "running"), ("raise_noise", "running"), ("stop", "running"),
    ("cancel", "queued"), ("resume", "resumable"), ("fork", "ended"), ("tv", "pair"), ("collapse_seeds", "group"),
    ("cycle_x", "view"), ("cycle_ema", "view"), ("help", "keys"), ("quit", "keys"),
]


def footer_actions(context: set[str]) -> list[str]:
    """The actions the footer shows in `context` (a set of the names above)."""
    if "filter" in context:
        return ["close_filter"]
    return [action for action, need in FOOTER if need in context or need == "keys"]


def bindings() -> list[Binding]:
    """show: in the footer in some context (GpctlApp's ContextFooter picks which, by footer_actions)."""
    return [Binding(key, action, label or desc.split(":")[0], show=bool(label), key_display=_SHORT.get(key))
            for key, _, action, label, desc in KEYS]


_SHORT = {"enter": "⏎", "space": "␣"}    # the footer's widest context (a running run, two marked) fits 80 columns


def key_screen_text() -> str:
    width = max(len(shown) for _, shown, *_ in KEYS)
    return "gpctl tui — keys (Escape closes; ctrl+p finds any action or run)\n\n" + "\n".join(
        f" {shown:<{width}}  {desc}" for _, shown, _, _, desc in KEYS)


def markdown_table() -> str:
    """docs/tui.md's key table."""
    return "| key | what it does |\n|---|---|\n" + "\n".join(
        f"| `{shown}` | {desc} |" for _, shown, _, _, desc in KEYS)


def state_file(home: Path) -> Path:
    """Where the TUI keeps its view of `home` for this user: outside the home, which may be shared
    or read-only ($XDG_CACHE_HOME or ~/.cache, gpctl/tui/<hash of the home's path>.json)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "gpctl" / "tui" / f"{hashlib.sha1(str(home.resolve()).encode()).hexdigest()[:16]}.json"
