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
