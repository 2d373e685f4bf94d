"""A small braille line plot: 2×4 dots per terminal cell, min/max per pixel column.

Each series is downsampled to the plot's pixel width before drawing (the min and the max of the
points that fall in each column, joined), so a frame costs O(width) per series however long the
run is. Columns with no point between two that have one are filled by linear interpolation, so a
sparse series (a young run, a zoom, evals every 100 steps) is a line, not dots. Vertical markers
(noise changes, forks, resumes) are rules numbered at the top and explained in the legend.
"""
from __future__ import annotations


import numpy as np
from rich.text import Text
from textual.widget import Widget

COLORS = ("cyan", "magenta", "yellow", "green", "red", "blue", "bright_white", "orange1")
_ANSI = ("black", "red", "green", "yellow", "blue", "magenta", "cyan", "white")


def eval_color(color: str) -> str:
    """The eval series' colour: the bright ANSI variant where there is one, else bold (any number of
    runs: `bright_orange1` does not exist). Colour alone does not tell it from the train series (in
    256 colours `cyan` and `bright_cyan` are both 38;5;80): it is also drawn dashed (DASHED)."""
    return f"bright_{color}" if color in _ANSI else f"bold {color}"


DASHED = "dashed"     # the 5th item of a series: drawn in cells 2 on, 1 off (eval series), legend ┄
_BITS = ((0x01, 0x08), (0x02, 0x10), (0x04, 0x20), (0x40, 0x80))  # braille dot bit for (row, col)


def column_minmax(x: np.ndarray, y: np.ndarray, x0: float, x1: float, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel column: min and max of y over the points whose x falls in it (NaN where none).

    x must be sorted (records are). Vectorized: searchsorted for the column edges, then
    fmin/fmax.reduceat, so 100k points cost about a millisecond.
    """
    lo = np.full(cols, np.nan)
    hi = np.full(cols, np.nan)
    if len(x) == 0 or x1 <= x0 or cols < 2:
        return lo, hi
    step = (x1 - x0) / (cols - 1)
    edges = x0 + step * (np.arange(cols + 1) - 0.5)
    bounds = np.searchsorted(x, edges)
    starts, ends = bounds[:-1], bounds[1:]
    full = ends > starts
    if not full.any():
        return lo, hi
    yy = y[: ends[-1]]
    idx = starts[full]
    lo[full] = np.fmin.reduceat(yy, idx)
    hi[full] = np.fmax.reduceat(yy, idx)
    return lo, hi


def render(series: list[tuple], width: int, height: int,
           logy: bool = False, markers: list[tuple] = ()) -> tuple[list[Text], tuple]:
    """Rows of Rich Text for a width×height cell area; returns (rows, (x0, x1, y0, y1)).

    series: (x, y, style) or (x, y, style, DASHED): a dashed series leaves every third cell column
    empty. markers: (x, label) or (x, label, style): a rule numbered at the top (1..9, then +) in
    its run's style."""
    pw, ph = width * 2, height * 4
    xs = [s[0] for s in series if len(s[0])]
    if not xs:
        return [Text(" " * width) for _ in range(height)], (0, 1, 0, 1)
    x0, x1 = min(float(a[0]) for a in xs), max(float(a[-1]) for a in xs)
    if x1 <= x0:
        x1 = x0 + 1
    cols = []
    for x, y, color, *_ in series:
        yv = np.log10(np.clip(y, 1e-12, None)) if logy else y
        lo, hi = fill_gaps(*column_minmax(x, yv, x0, x1, pw))
        cols.append((lo, hi, color))
    finite = [v for lo, hi, _ in cols if np.isfinite(lo).any()   # a series with no point in view adds nothing
              for v in (np.nanmin(lo), np.nanmax(hi)) if np.isfinite(v)]
    if not finite:
        return [Text(" " * width) for _ in range(height)], (x0, x1, 0, 1)
    y0, y1 = min(finite), max(finite)
    if y1 - y0 < 1e-12:         # a constant (an lr, a batch size): a flat line mid-height, labelled near it
        pad = 0.05 * abs(y0) or 0.5
        y0, y1 = y0 - pad, y1 + pad
    cells = np.zeros((height, width), dtype=np.int64)
    owner = np.full((height, width), -1, dtype=np.int64)
    # bit weight of pixel (column c, row r) inside its cell: _BITS[r % 4][c % 2]
    weights = np.array(_BITS, dtype=np.int64).T                       # [c % 2, r % 4]
    rows_px = np.arange(ph)
    for k, (lo, hi, _) in enumerate(cols):
        have = ~np.isnan(lo)
        if not have.any():
            continue
        top = np.where(have, np.round((y1 - hi) / (y1 - y0) * (ph - 1)), 0).astype(np.int64)
        bot = np.where(have, np.round((y1 - lo) / (y1 - y0) * (ph - 1)), -1).astype(np.int64)
        mid = np.round((y1 - (lo + hi) / 2) / (y1 - y0) * (ph - 1))
        # join each column to the previous drawn column's midpoint, so lines stay connected
        prev = np.where(have, mid, np.nan)
        prev = _ffill(prev)
        prev = np.concatenate([[np.nan], prev[:-1]])
        join = have & ~np.isnan(prev)
        top = np.where(join, np.minimum(top, np.nan_to_num(prev, nan=0).astype(np.int64)), top)
        bot = np.where(join, np.maximum(bot, np.nan_to_num(prev, nan=0).astype(np.int64)), bot)
        mask = (rows_px[None, :] >= top[:, None]) & (rows_px[None, :] <= bot[:, None])   # [pw, ph]
        m = mask.reshape(width, 2, height, 4)
        code = (m * weights[None, :, None, :]).sum(axis=(1, 3)).T                      # [height, width]
        if len(series[k]) > 3 and series[k][3] == DASHED:
            code[:, 2::3] = 0
        cells |= code
        owner[code > 0] = k
    marks = {}
    for i, (mx, _, *style) in enumerate(markers):
        if x0 <= mx <= x1:
            marks[int(round((mx - x0) / (x1 - x0) * (width - 1)))] = (str(i + 1) if i < 9 else "+",
                                                                      style[0] if style else "")
    rows = []
    for r in range(height):
        t = Text()
        for c in range(width):
            if cells[r, c]:
                t.append(chr(0x2800 + int(cells[r, c])), style=cols[owner[r, c]][2])
            elif c in marks:
                num, style = marks[c]
                t.append("│" if r else num, style=(f"dim {style}" if style else "grey50") if r else f"bold {style}".strip())
            else:
                t.append(" ")
        rows.append(t)
    return rows, (x0, x1, y0, y1)


def fill_gaps(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Empty columns between two with points get the straight line between their midpoints."""
    have = ~np.isnan(lo)
    if have.sum() < 2:
        return lo, hi
    idx = np.arange(len(lo))
    at = idx[have]
    gap = ~have & (idx > at[0]) & (idx < at[-1])
    if gap.any():
        lo, hi = lo.copy(), hi.copy()
        lo[gap] = hi[gap] = np.interp(idx[gap], at, ((lo + hi) / 2)[have])
    return lo, hi


def human(v: float, axis: str) -> str:
    """A tick label: wall time as 3m20s / 1h05m, samples and tokens as 1.2M, others as %g."""
    if axis == "wall":
        v = max(0.0, v)
        if v < 60:
            return f"{v:.0f}s"
        if v < 3600:
            return f"{int(v // 60)}m{int(v % 60):02d}s"
        return f"{int(v // 3600)}h{int(v % 3600 // 60):02d}m"
    if axis == "samples" and abs(v) >= 1000:
        for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
            if abs(v) >= size:
                return f"{v / size:.3g}{unit}"
    return f"{v:.6g}"


def legend_lines(items: list[tuple[str, str]], width: int, max_lines: int | None = None) -> list[Text]:
    """(glyph + text, style) items packed into lines of at most `width` cells, never cut mid-item
    (an item longer than a line is shortened with …). With `max_lines`, items that do not fit are
    left out whole and the last line says how many ("+3 more")."""
    lines = _pack(items, width)
    if max_lines is None or len(lines) <= max_lines:
        return lines
    for keep in range(len(items), -1, -1):      # the most items that fit with the "+N more" note
        left = len(items) - keep
        packed = _pack(items[:keep] + [(f"+{left} more", "dim")], width)
        if len(packed) <= max_lines:
            return packed
    return lines[:max_lines]


def _pack(items: list[tuple[str, str]], width: int) -> list[Text]:
    lines, cur = [], Text(no_wrap=True)
    for text, style in items:
        text = text if len(text) <= width else text[: max(1, width - 1)] + "…"
        if cur.cell_len and cur.cell_len + 2 + len(text) > width:
            lines.append(cur)
            cur = Text(no_wrap=True)
        if cur.cell_len:
            cur.append("  ")
        glyph, rest = text[:1], text[1:]
        cur.append(glyph, style=style)
        cur.append(rest)
    if cur.cell_len:
        lines.append(cur)
    return lines


def _ffill(a: np.ndarray) -> np.ndarray:
    """Forward-fill NaNs."""
    idx = np.where(~np.isnan(a), np.arange(len(a)), 0)
    np.maximum.accumulate(idx, out=idx)
    out = a[idx]
    out[: np.argmax(~np.isnan(a))] = np.nan if np.isnan(a).all() else out[: np.argmax(~np.isnan(a))]
    return out


class LossPlot(Widget):
    """Loss curves with a legend line, axis ranges and change markers. A small plot of another field
    (legend=False: the loss plot's legend names the runs) has the same colours, x-axis and markers."""

    DEFAULT_CSS = """
    LossPlot { height: 1fr; min-height: 8; border: round $primary; padding: 0 1; }
    """

    def __init__(self, y_label: str = "loss", legend: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.y_label, self.legend = y_label, legend
        self.series: list[tuple] = []   # (x, y, color, label) or (x, y, color, label, DASHED)
        self.markers: list[tuple] = []    # (x, label) or (x, label, the run's colour)
        self.logy = False
        self.x_label = "step"

    def set_data(self, series, markers, x_label: str, logy: bool) -> None:
        self.series, self.markers, self.x_label, self.logy = series, markers, x_label, logy
        self.border_title = f"{self.y_label} vs {x_label}" + (" (log)" if logy else "")
        self.refresh()

    def render(self) -> Text:
        w = max(10, self.size.width - 10)
        items = [(f"{'┄' if s[4:] == (DASHED,) else '━'} {s[3]}", s[2]) for s in self.series if s[3]]   # a band has none
        items += [(f"│{i + 1 if i < 9 else '+'} {m[1]}", f"bold {m[2]}" if len(m) > 2 else "bold")
                  for i, m in enumerate(self.markers)]
        legend = legend_lines(items, max(10, self.size.width), max(1, self.size.height // 3)) if self.legend else []
        h = max(3, self.size.height - 1 - len(legend))
        rows, (x0, x1, y0, y1) = render([(s[0], s[1], s[2], *s[4:]) for s in self.series], w, h, self.logy,
                                        self.markers)
        out = Text()
        for line in legend:
            out.append(line)
            out.append("\n")
        ylab = (lambda v: f"{10 ** v:8.4g}") if self.logy else (lambda v: f"{v:8.4g}")
        for i, row in enumerate(rows):
            out.append(ylab(y1) if i == 0 else ylab(y0) if i == len(rows) - 1 else " " * 8)
            out.append(" ")
            out.append(row)
            out.append("\n")
        lo, hi = human(x0, self.x_label), human(x1, self.x_label)
        if w >= 24 + len(self.x_label):
            out.append(" " * 9 + f"{lo:<12}{self.x_label:^{w - 24}}{hi:>12}")
        else:                       # a small plot: both ends, no room for the axis' name (its title has it)
            out.append(" " * 9 + f"{lo}{hi:>{max(1, w - len(lo))}}")
        return out
