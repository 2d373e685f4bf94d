"""engine/ never imports the UI side: checked in a fresh interpreter."""
import subprocess
import sys


def test_engine_imports_no_ui_modules():
    code = ("import sys, engine, engine.train, engine.rundir, engine.checkpoint, engine.presets, "
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
    code = "import sys, engine.train\nprint('torch' in sys.modules)"
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
    liveness) now live in engine.paths, which imports no engine module. Function-level imports count."""
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    graph = _engine_import_graph(root)
    assert len(graph) > 30 and graph["engine.paths"] == set()
    assert _cycles(graph) == []
    # negative control: the old edge (jobs importing rundir's make_home) closes the circle again
    graph["engine.jobs"] = graph["engine.jobs"] | {"engine.rundir"}
    graph["engine.rundir"] = graph["engine.rundir"] | {"engine.jobs"}
    assert _cycles(graph) == [["engine.jobs", "engine.rundir"]]
