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
