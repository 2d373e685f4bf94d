"""The lineage of a home's runs: which run was forked from which, at what step and lr_time, with
what overrides, and which forks are unsteered twins (the controls of a steering request). No
tracker draws this; the paper's experiments are exactly such trees (a trunk, a drop at T0, its twin).

`gpctl lineage [RUN]` prints it; the TUI's `L` shows it as a tree to pick a run from. Both read it
from `lineage(home)`: a run's config names its parent and the checkpoint it starts from (the branch
point); a twin's events say whose twin it is.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from engine.config import ConfigError
from engine.errors import CheckpointError
from engine.store.ckptmeta import read_meta
from engine.store.jobs import JobStore
from engine.store.rundir import list_runs
from engine.store.state import effective


@dataclass
class Node:
    id: str
    state: str
    how: str = "root"               # root | fork | twin
    step: int | None = None         # the parent's checkpoint it starts from
    lr_time: float | None = None
    overrides: list[str] = field(default_factory=list)
    missing_parent: str = ""        # a parent named in its config that is not in this home
    children: list["Node"] = field(default_factory=list)

    def walk(self):
        yield self
        for c in self.children:
            yield from c.walk()

    def branch_text(self) -> str:
        """How it leaves its parent: "fork @ step 100 (lr_time 100.0): batch_size=512"."""
        if self.how == "root":
            return f"(parent {self.missing_parent} is not in this home)" if self.missing_parent else ""
        at = f" @ step {self.step}" if self.step is not None else ""
        lr = f" (lr_time {self.lr_time:.1f})" if self.lr_time is not None else ""
        ov = f": {' '.join(self.overrides)}" if self.overrides else (": unsteered" if self.how == "twin" else "")
        return f"{self.how}{at}{lr}{ov}"


def _step_of(checkpoint: str) -> int | None:
    m = re.search(r"step_(\d+)\.safetensors$", checkpoint or "")
    return int(m.group(1)) if m else None


def lineage(home: Path) -> list[Node]:
    """Every run of `home` in trees: roots (no parent here) in creation order, children by branch step."""
    store = JobStore.for_reading(home, lenient=True)
    try:
        jobs = {j.run_id: j.state for j in store.jobs()}
    finally:
        store.close()
    nodes: dict[str, Node] = {}
    parents: dict[str, str] = {}
    for rd in list_runs(home):
        node = Node(rd.id, effective(rd.summary()["run_state"], jobs.get(rd.id)))
        try:
            cfg = rd.config()
        except ConfigError:
            nodes[rd.id] = node
            continue
        if cfg.parent:
            parents[rd.id] = cfg.parent
            node.step = _step_of(cfg.parent_checkpoint)
            node.overrides = list(cfg.parent_overrides)
            node.how = "twin" if any(e.get("event") == "twin_of" for e in rd.events()[0][:8]) else "fork"
            try:
                node.lr_time = float(read_meta(Path(cfg.parent_checkpoint))["lr_time"])
            except (OSError, ValueError, KeyError, TypeError, CheckpointError):
                node.lr_time = None      # the checkpoint was deleted: the step still says where
        nodes[rd.id] = node
    roots = []
    for rid, node in nodes.items():
        parent = parents.get(rid)
        if parent and parent in nodes:
            nodes[parent].children.append(node)
        else:
            if parent:
                node.missing_parent, node.how = parent, "root"
            roots.append(node)
    for node in nodes.values():
        node.children.sort(key=lambda n: (n.step if n.step is not None else -1, n.id))
    return roots


def find(roots: list[Node], run_id: str) -> Node | None:
    """The root of the tree that holds `run_id`."""
    return next((r for r in roots if any(n.id == run_id for n in r.walk())), None)


def tree_lines(root: Node, mark: str | None = None) -> list[str]:
    """One tree as text lines, `├─`/`└─` per child, each with its state and branch point; `mark`'s
    line ends with "◀"."""
    out = []

    def line(node: Node, prefix: str, branch: str) -> None:
        how = node.branch_text()
        tail = "  ◀" if node.id == mark else ""
        out.append(f"{prefix}{branch}{node.id}  {node.state}" + (f"  {how}" if how else "") + tail)
        pre = prefix + ("   " if branch == "└─ " else "│  " if branch else "")
        for i, child in enumerate(node.children):
            line(child, pre, "└─ " if i == len(node.children) - 1 else "├─ ")

    line(root, "", "")
    return out


def lineage_text(home: Path, run_id: str | None = None) -> list[str]:
    """`gpctl lineage`: every tree with a fork (and how many runs have none), or RUN's tree."""
    roots = lineage(home)
    if run_id:
        root = find(roots, run_id)
        return tree_lines(root, run_id) if root else []
    out, lone = [], 0
    for r in roots:
        if not r.children:
            lone += 1
            continue
        out += tree_lines(r) + [""]
    if lone:
        out.append(f"{lone} run{'s' if lone != 1 else ''} with no forks (gpctl ls)")
    elif out:
        out.pop()
    return out or ["no runs in this home yet"]
