"""The TUI's rows: what the poll thread reads from the home (one summary per run, states by the
one rule of engine.store.state), and what the UI thread does with them without the disk (filter,
sort, fold seed families into one row)."""
from __future__ import annotations

import time
from pathlib import Path

from engine.store.jobs import JobStore
from engine.store.rundir import list_runs
from engine.store.state import shown as shown_state


def load_rows(home: Path, cache: dict | None = None) -> tuple[list[dict], str | None]:
    """Every run's summary and state: the part that reads the disk (the poll thread calls it).
    With `cache` (run id -> (change key, row, when)), only runs whose files changed, or whose row
    is older than 5 s (a process may have died), are summarized again; jobs.db is one query. Returns
    the rows and why jobs.db could not be read (None when it could: the status line says it)."""
    store = JobStore.for_reading(home, lenient=True)
    jobs = {j.run_id: j.state for j in store.jobs()}
    problem = store.problem
    store.close()
    rows, now = [], time.monotonic()
    for rd in list_runs(home):
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
    return rows, problem


def filter_sort(rows: list[dict], text: str, key: str | None, desc: bool) -> list[dict]:
    """Rows whose id, preset, arm or state contain `text`; by creation (desc: newest first) or by
    `key` within each preset, runs without a value last; presets in order."""
    text = text.lower()
    rows = [r for r in rows if not text or text in f"{r['id']} {r['preset']} {r['arm']} {r['state']}".lower()]
    rows.sort(key=lambda r: r["created"], reverse=desc and not key)
    if key:
        have = sorted((r for r in rows if r.get(key) is not None), key=lambda r: r[key], reverse=desc)
        rows = have + [r for r in rows if r.get(key) is None]
    rows.sort(key=lambda r: r["preset"])     # stable: keeps the order within a preset
    return rows


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


def stamp(path: Path) -> tuple:
    try:
        st = path.stat()
        return st.st_mtime_ns, st.st_size
    except OSError:
        return 0, 0
