"""Small modal dialogs: one value in, a list to pick from, the key screen, a run's story, TV. Each
screen that stays open shows its own keys in its own footer (ScreenFooter)."""
from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Input, Label, Log, OptionList, Static, Tree

from gpctl.tui.widgets.panels import ScreenFooter


class Ask(ModalScreen[str | None]):
    """A prompt with one input line; Enter returns its text, Escape returns None."""

    DEFAULT_CSS = """
    Ask { align: center middle; }
    Ask > Vertical { width: 70; max-width: 100%; height: auto; border: thick $primary; background: $surface; padding: 1 2; }
    Ask Label { width: 1fr; }
    """
    BINDINGS = [("escape", "cancel", "Cancel")]

    def __init__(self, prompt: str, value: str = ""):
        super().__init__()
        self.prompt, self.value = prompt, value

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.prompt, markup=False)      # run ids, field names: text, never markup
            yield Input(value=self.value, id="answer")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip())

    def action_cancel(self) -> None:
        self.dismiss(None)


class Pick(ModalScreen[str | None]):
    DEFAULT_CSS = """
    Pick { align: center middle; }
    Pick > Vertical { width: 80; height: 24; border: thick $primary; background: $surface; padding: 0 1; }
    """
    BINDINGS = [("escape", "cancel", "Cancel")]

    def __init__(self, title: str, options: list[str]):
        super().__init__()
        self.title_text, self.options = title, options

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.title_text, markup=False)
            yield OptionList(*(Text(o) for o in self.options), id="options")   # text, never markup

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(self.options[event.option_index])

    def action_cancel(self) -> None:
        self.dismiss(None)


class Help(ModalScreen[None]):
    """The key screen: one key per line, generated from gpctl/tui/keys.py; scrolls when the screen is
    short, and is never wider than the screen."""
    DEFAULT_CSS = """
    Help { align: center middle; }
    Help > VerticalScroll { width: auto; max-width: 100%; height: auto; max-height: 100%;
                            border: thick $primary; background: $surface; padding: 0 1; }
    Help Static { width: auto; }
    """
    BINDINGS = [("escape,question_mark,q", "close", "Close")]

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Static(self.text, id="help-text", markup=False)
        yield ScreenFooter()

    def action_close(self) -> None:
        self.dismiss(None)


class Confirm(ModalScreen[bool]):
    """A destructive key asks first: y / Enter confirms, n / Escape does nothing."""

    DEFAULT_CSS = """
    Confirm { align: center middle; }
    Confirm > Vertical { width: 70; max-width: 100%; height: auto; border: thick $error; background: $surface; padding: 1 2; }
    Confirm Label { width: 1fr; }
    """
    BINDINGS = [("y,enter", "yes", "Yes"), ("n,escape", "no", "No")]

    def __init__(self, question: str):
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.question, markup=False)
            yield Label("y: yes   n / Escape: no")

    def action_yes(self) -> None:
        self.dismiss(True)

    def action_no(self) -> None:
        self.dismiss(False)


class Detail(ModalScreen[None]):
    """A run's whole story (what `gpctl show` prints: state, job, config diff, parent and children,
    checkpoints, events as sentences) above its log.txt, followed as it grows (`tail -f`): new lines
    are read every second and the view stays at the end until you scroll up or press f. `r` reads
    the story again."""

    DEFAULT_CSS = """
    Detail { align: center middle; }
    Detail > Vertical { width: 95%; height: 90%; border: thick $primary; background: $surface; }
    Detail #detail { height: 1fr; padding: 0 1; border-top: solid $secondary; }
    Detail #detail-log { height: 1fr; border-top: solid $secondary; padding: 0 1; }
    """
    BINDINGS = [("escape,enter,q", "close", "Close"), ("f", "follow", "Follow"), ("r", "reload", "Reload"),
                ("slash", "search", "Search log"), ("n", "search_next", "Next")]
    TAIL_BYTES = 65536          # how much of an existing log is shown at first

    def __init__(self, story, rd):
        """story: a callable giving the story's lines (called again by `r`); rd: the run's RunDir."""
        super().__init__()
        self.story, self.rd = story, rd
        self.following, self._rest = True, b""
        size = _size(rd.log_file)
        self.log_offset = max(0, size - self.TAIL_BYTES)
        self._cut = self.log_offset > 0            # the first line read may be a part of one: dropped

    def compose(self) -> ComposeResult:
        with Vertical():
            with VerticalScroll(id="detail"):
                yield Static("\n".join(self.story()), id="detail-text", markup=False)
            yield Log(id="detail-log", max_lines=5000, auto_scroll=True)
        yield ScreenFooter()

    def on_mount(self) -> None:
        self.query_one("#detail").border_title = f"{self.rd.id} — r reloads, Esc closes"
        self.read_log()
        self._title()
        self.set_interval(1.0, self.read_log)

    def read_log(self) -> None:
        """The lines appended since the last read (a line still being written waits for its newline)."""
        if not self.following:
            return
        chunk, self.log_offset = self.rd.read_log(self.log_offset)
        if not chunk:
            return
        data = self._rest + chunk
        lines = data.split(b"\n")
        self._rest = lines.pop()
        if self._cut and lines:
            lines, self._cut = lines[1:], False
        if lines:
            log = self.query_one(Log)
            first = not log.line_count
            log.write_lines([ln.decode(errors="replace") for ln in lines])
            if first and self.is_mounted:
                self._title()

    def _title(self) -> None:
        log = self.query_one(Log)
        empty = " (empty so far)" if not log.line_count else ""
        log.border_title = f"log.txt{empty} — {'following (f pauses)' if self.following else 'paused (f follows)'}"

    def action_follow(self) -> None:
        self.following = not self.following
        log = self.query_one(Log)
        log.auto_scroll = self.following
        if self.following:
            self.read_log()
            log.scroll_end(animate=False)
        self._title()

    def action_reload(self) -> None:
        self.query_one("#detail-text", Static).update("\n".join(self.story()))

    # search in the log (less's / and n): the view pauses on the line found
    search_text = ""
    found: int | None = None          # the log line the last search stopped on

    def action_search(self) -> None:
        def done(answer: str | None) -> None:
            if answer:
                self.search_text, self.found = answer, None
                self.action_search_next()
        self.app.push_screen(Ask("search the log for (n: next match)", self.search_text), done)

    def action_search_next(self) -> None:
        """The next log line holding the query (case-insensitive), after the last one found; wraps."""
        if not self.search_text:
            return
        log = self.query_one(Log)
        text = self.search_text.lower()
        lines = [i for i, line in enumerate(log.lines) if text in line.lower()]
        if not lines:
            self.found = None
            self.notify(f"no line of the log has {self.search_text!r}", severity="warning", markup=False)
            return
        after = [i for i in lines if self.found is None or i > self.found]
        self.found = (after or lines)[0]
        if self.following:                # stay on the match: new lines would scroll it away
            self.action_follow()
        log.scroll_to(y=max(0, self.found - 2), animate=False)
        log.border_title = (f"log.txt — {self.search_text!r}: line {self.found + 1}, match "
                            f"{lines.index(self.found) + 1} of {len(lines)} (n: next, f: follow)")

    def action_close(self) -> None:
        self.dismiss(None)


def _size(path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def tv_series(rows: list[dict], axis: str = "step") -> tuple[list, str]:
    """The TV panel's curves (Figs. 7/8): TV of each pair against A's position (C's for the baseline)
    on the figure's axis, step or lr_time (an lr figure's arms meet at equal LR-normalized time, not
    at equal steps), and the axis label."""
    import numpy as np
    key = "lr_time_a" if axis == "lr_time" else "step_a"
    series = []
    for curve, color in (("main", "cyan"), ("baseline", "yellow")):
        pts = sorted((r[key], r["tv"]) for r in rows if r["curve"] == curve and r.get(key) is not None)
        if pts:
            series.append((np.array([p[0] for p in pts]), np.array([p[1] for p in pts]), color))
    what = "lr_time" if axis == "lr_time" else "steps"
    return series, f"{what} of A (C: of C), at matched loss"


class TvPanel(ModalScreen[None]):
    """TV of A (marked first) to B, and of a baseline C to B when a third run is marked: progress while
    a worker thread computes it, then the pairs as `gpctl tv` prints them and the curves against the
    steps of A (and of C), each pair at matched loss (Figs. 7/8); while the runs train it follows them
    (GpctlApp.compute_tv), a new look every TV_POLL seconds."""

    DEFAULT_CSS = """
    TvPanel { align: center middle; }
    TvPanel > VerticalScroll { width: 95%; height: 90%; border: thick $primary; background: $surface; padding: 0 1; }
    """
    BINDINGS = [("escape,q,T", "close", "Close")]

    def __init__(self, a: str, b: str, c: str | None):
        super().__init__()
        self.a, self.b, self.c = a, b, c
        self.rows: list[dict] | None = None
        self.axis = "step"       # the figure's axis of A's preset (lr figures: lr_time), set by compute_tv

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            head = f"TV of {self.a} (A) to {self.b} (B)" + (f", baseline {self.c} (C) to B" if self.c else "")
            yield Static(head, id="tv-head", markup=False)
            yield Static("loading torch…", id="tv-progress", markup=False)
            yield Static("", id="tv-table", markup=False)
            yield Static("", id="tv-plot")
        yield ScreenFooter()

    def progress(self, text: str) -> None:
        if self.is_attached:
            self.query_one("#tv-progress", Static).update(text)

    def show_error(self, text: str) -> None:
        self.progress(f"TV failed: {text}")

    def show_rows(self, rows: list[dict], notes: list[str] = ()) -> None:
        if not self.is_attached:
            return
        from rich.text import Text

        from gpctl.common import fmt, plain_table
        from gpctl.tui.widgets.plot import render
        self.rows = rows
        if not rows:
            self.progress("; ".join(["no checkpoint pairs to compare (each run needs checkpoints at matching "
                                     "losses)", *notes]))
            return
        self.progress("; ".join([f"{sum(r['curve'] == 'main' for r in rows)} pairs matched by loss; "
                                 f"gap = loss A − loss B", *notes]))
        self.query_one("#tv-table", Static).update(plain_table(
            ("curve", "run A", "step A", "step B", "loss A", "loss B", "gap", "TV"),
            [[r["curve"], r["run_a"], str(r["step_a"]), str(r["step_b"]), fmt(r["loss_a"]), fmt(r["loss_b"]),
              f"{r['loss_gap']:+.4f}", fmt(r["tv"])] for r in rows], left=2))
        series, label = tv_series(rows, self.axis)
        lines, (x0, x1, y0, y1) = render(series, 60, 10)
        out = Text("━ A to B", style="cyan")
        if self.c:
            out.append("  ━ C to B (baseline)", style="yellow")
        out.append("\n")
        for i, line in enumerate(lines):
            out.append(f"{y1:8.3g} " if i == 0 else f"{y0:8.3g} " if i == len(lines) - 1 else " " * 9)
            out.append(line)
            out.append("\n")
        out.append(" " * 9 + f"{x0:<10.4g}{label:^40}{x1:>10.4g}")
        self.query_one("#tv-plot", Static).update(out)

    def action_close(self) -> None:
        self.dismiss(None)


class Lineage(ModalScreen[str | None]):
    """Trees of parents, forks and twins (gpctl.lineage), each node with its state and branch point;
    Enter on a run selects it in the table (to steer it, mark it, open it)."""

    DEFAULT_CSS = """
    Lineage { align: center middle; }
    Lineage > Vertical { width: 95%; height: 90%; border: thick $primary; background: $surface; padding: 0 1; }
    Lineage Tree { height: 1fr; }
    Lineage Label { width: 1fr; }
    """
    BINDINGS = [("escape,q,L", "close", "Close"),
                Binding("enter", "pick", "Select run", priority=True)]   # before the tree's own Enter (expand)

    def __init__(self, roots: list, selected: str | None = None):
        super().__init__()
        self.roots, self.selected = roots, selected

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(f"lineage: {len(self.roots)} tree{'s' if len(self.roots) != 1 else ''} · fork or twin "
                        "@ the parent's step (lr_time) · Enter selects", markup=False)
            tree: Tree = Tree("runs", id="lineage")
            tree.show_root = False
            self._cursor = None
            for root in self.roots:
                self._add(tree.root, root)
            tree.root.expand_all()
            yield tree
        yield ScreenFooter()

    def _add(self, parent, node) -> None:
        how = node.branch_text()
        label = Text(f"{node.id}  ")
        label.append(node.state, style="bold")
        if how:
            label.append(f"  {how}", style="dim")
        item = parent.add(label, data=node.id, allow_expand=bool(node.children))
        if node.id == self.selected:
            self._cursor = item
        for child in node.children:
            self._add(item, child)

    def on_mount(self) -> None:
        tree = self.query_one(Tree)
        tree.focus()
        if self._cursor is not None:
            tree.move_cursor(self._cursor)

    def on_tree_node_selected(self, event: Tree.NodeSelected) -> None:
        event.stop()
        if event.node.data:
            self.dismiss(event.node.data)

    def action_pick(self) -> None:
        node = self.query_one(Tree).cursor_node
        if node is not None and node.data:
            self.dismiss(node.data)

    def action_close(self) -> None:
        self.dismiss(None)

