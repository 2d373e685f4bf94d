"""engine/ never imports the UI side: checked in a fresh interpreter."""
import subprocess
import sys


def test_engine_imports_no_ui_modules():
    code = ("import sys, engine, engine.train.loop, engine.store.rundir, engine.train.checkpoint, engine.presets, "
            "engine.data.c4, engine.data.images, engine.models.gpt2, engine.__main__\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('gpctl', 'typer', 'textual', 'rich'))\n"
            "print(','.join(bad))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == ""


def test_no_pickle_loads_in_sources():
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    for pkg in ("engine", "gpctl"):
        for f in (root / pkg).rglob("*.py"):
            text = f.read_text()
            assert "pickle.load" not in text and "torch.load(" not in text, f


def test_the_cli_starts_without_torch():
    """Issue 15: `gpctl --help`, `ls` and an enqueue pay for no torch, transformers, datasets or textual."""
    code = ("import sys, gpctl.cli\n"
            "print(','.join(m for m in ('torch', 'transformers', 'datasets', 'textual', 'matplotlib') "
            "if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == ""
    # negative control: the trainer does import torch
    code = "import sys, engine.train.loop\nprint('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "True"


def _engine_import_graph(root) -> dict[str, set[str]]:
    """engine module -> the engine modules it imports (at the top or inside functions), from the AST."""
    import ast
    graph = {}
    for p in (root / "engine").rglob("*.py"):
        rel = p.relative_to(root).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        deps = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "engine":
                deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.split(".")[0] == "engine"}
        graph[name] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), and self-imports."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(sorted(comp))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_engines_imports_have_no_cycle():
    """Issue 25: config -> rundir -> jobs -> rundir was a circle; the shared helpers (names, homes, pid
    liveness) now live in engine.fs, which imports no engine module. Function-level imports count."""
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    graph = _engine_import_graph(root)
    assert len(graph) > 30 and graph["engine.fs"] == set()
    assert _cycles(graph) == []
    # negative control: the old edge (jobs importing rundir's make_home) closes the circle again
    graph["engine.store.jobs"] = graph["engine.store.jobs"] | {"engine.store.rundir"}
    graph["engine.store.rundir"] = graph["engine.store.rundir"] | {"engine.store.jobs"}
    assert _cycles(graph) == [["engine.store.jobs", "engine.store.rundir"]]


def _lint_imports(root, cwd):
    """lint-imports (import-linter) with `root`'s pyproject.toml contracts, on the packages under cwd."""
    import os
    from pathlib import Path
    exe = Path(sys.executable).parent / "lint-imports"
    env = dict(os.environ, PYTHONPATH=str(cwd))
    return subprocess.run([str(exe), "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=cwd, env=env,
                          capture_output=True, text=True)


def test_the_engines_layers_hold_and_a_crossing_breaks_them(tmp_path):
    """Issue 25: engine/ in layers (launch > analysis > train > control > store, and what an experiment
    is beneath them), no torch under store and control: import-linter's contracts in pyproject.toml."""
    import shutil
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    res = _lint_imports(root, root)
    assert res.returncode == 0, res.stdout[-3000:]
    assert "Contracts: 4 kept, 0 broken." in res.stdout
    # negative controls, each on a copy: the store importing the trainer, the control layer torch
    for where, line, broken in (("engine/store/rundir.py", "from engine.train import loop", "engine layers import downwards BROKEN"),
                                ("engine/control/request.py", "import torch", "no torch under store, control and the experiment's definition BROKEN"),
                                ("engine/plan.py", "from engine.store import rundir", "what an experiment is does not depend on runs BROKEN")):
        copy = tmp_path / where.replace("/", "_")
        for pkg in ("engine", "gpctl"):
            shutil.copytree(root / pkg, copy / pkg, ignore=shutil.ignore_patterns("__pycache__"))
        f = copy / where
        f.write_text(f.read_text() + f"\n\ndef _crossing():\n    {line}\n")
        res = _lint_imports(root, copy)
        assert res.returncode == 1 and broken in res.stdout, res.stdout[-2000:]
