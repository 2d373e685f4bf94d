import json
import os

import pytest
from typer.testing import CliRunner

from gpctl.cli import app

runner = CliRunner()

TINY_PRESET = """
[preset]
figure = "Fig. 7a (test twin)"
description = "tiny"
twin = "tiny"
compares = "batch_size"
reference = "bs16"
direction = "drop"

[base]
steps = 8
lr = 0.05
batch_size = 16
eval_every = 4
checkpoint_every = 4
log_every = 2
device = "cpu"

[base.model]
name = "resnet18"
width = 2

[base.data]
source = "synthetic_images"
image_size = 8
eval_samples = 64
teacher_width = 8

[runs.bs4to16]
batch_size = 4

[[runs.bs4to16.changes]]
at_step = 4
batch_size = 16

[runs.bs16]
"""


def invoke(home, *args):
    return runner.invoke(app, ["--home", str(home), *args])


@pytest.fixture
def preset(tmp_path):
    p = tmp_path / "tiny.toml"
    p.write_text(TINY_PRESET)
    return p


def test_presets_lists_every_figure(home):
    res = invoke(home, "presets", "--json")
    assert res.exit_code == 0
    rows = {r["name"]: r for r in json.loads(res.stdout)}
    assert rows["cifar_bs32_512"]["figure"] == "Fig. 7a"
    assert rows["cifar_bs32_512"]["runs"] == ["bs32to512", "bs32", "bs512", "bs512_seed2"]
    assert rows["demo"]["twin"] == "demo"


def test_run_ls_show_resume(home, preset):
    res = invoke(home, "run", "preset", str(preset), "--set", "steps=6", "--wait")
    assert res.exit_code == 0, res.output
    ids = [line for line in res.stdout.splitlines() if line.startswith("tiny-")][:2]
    assert [i.rsplit("-", 1)[0] for i in ids] == ["tiny-bs4to16", "tiny-bs16"]
    assert "final losses" in res.stdout
    table = res.stdout.split("final losses\n", 1)[1].splitlines()
    assert [line.split()[:3] for line in table[1:3]] == [[i, "done", "6"] for i in ids]   # whole ids (issue 15)

    rows = {r["id"]: r for r in json.loads(invoke(home, "ls", "--json").stdout)}
    assert set(rows) == set(ids)
    first = rows[ids[0]]
    assert (first["state"], first["step"], first["batch_size"], first["samples"]) == ("done", 6, 16, 4 * 4 + 2 * 16)
    assert first["device"] == "cpu" and first["eval_loss"] > 0

    shown = json.loads(invoke(home, "show", ids[0][:len("tiny-bs4to16-") + 2], "--json").stdout)
    assert shown["id"] == ids[0]
    assert [c["step"] for c in shown["checkpoints"]] == [4, 6]
    sched = [e for e in shown["events"] if e["event"] == "schedule"]
    assert sched[0]["step"] == 4 and sched[0]["changed"] == {"batch_size": [4, 16]}

    done = invoke(home, "resume", ids[1])
    assert done.exit_code == 2 and done.stderr.strip() == f"error: run {ids[1]} is already done (step 6)"


def test_resume_continues_a_stopped_run(home, preset, monkeypatch):
    from gpctl import runs as ops
    from engine.train.loop import train
    from pathlib import Path
    rd = ops.create_runs(str(preset), ["steps=8"], Path(home), ["bs16"])[0]

    def stop_at_5(t):
        t.stop_requested = t.step == 5
    assert train(rd, hooks=[stop_at_5]) == "stopped"
    res = invoke(home, "resume", rd.id, "--wait")
    assert res.exit_code == 0, res.output
    assert rd.summary()["step"] == 8 and rd.status()["state"] == "done"


@pytest.mark.parametrize("args, line", [
    (["run", "preset", "nosuch"], "error: unknown preset 'nosuch': no nosuch.toml in"),
    (["run", "preset", "demo", "--set", "lr=-1"], "error: "),
    (["run", "preset", "demo", "--set", "model.dept=3"], "error: --set model.dept: unknown key 'model.dept' (did you mean 'depth'?)"),
    (["show", "zzz"], "error: unknown run 'zzz' in"),
    (["resume", "zzz"], "error: unknown run 'zzz' in"),
])
def test_user_errors_are_one_line_and_exit_2(home, args, line):
    res = invoke(home, *args)
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(line), res.stderr
    assert "Traceback" not in res.output


def test_bad_lr_names_file_and_key(home):
    res = invoke(home, "run", "preset", "demo", "--set", "lr=-1")
    assert res.stderr.strip().endswith("[runs.bs32to512]: 'lr' must be > 0, got -1.0")


def test_missing_real_data_stops_before_anything_is_created(home, tmp_path):
    res = invoke(home, "run", "preset", "cifar_bs32_512", "--set", f"data.path=\"{tmp_path}/none\"")
    assert res.exit_code == 2
    assert res.stderr.strip() == (f"error: cifar_bs32_512: CIFAR-5m not found: no part0.npz … part5.npz in "
                                  f"{tmp_path}/none (set data.path=DIR, or download it: gpctl data get cifar5m "
                                  f"--out {tmp_path}/none, ~18 GB); or run its CPU twin: "
                                  f"gpctl run preset cifar_bs32_512_tiny")
    assert not (home / "runs").exists() or not any((home / "runs").iterdir())


def test_repro_out_must_be_a_folder_and_nothing_is_queued(tmp_path):
    home, f = tmp_path / "home", tmp_path / "report.md"
    f.write_text("mine\n")
    res = CliRunner().invoke(app, ["--home", str(home), "repro", "--ci", "--out", str(f)])
    assert res.exit_code == 2
    assert res.stderr.strip() == f"error: --out {f}: exists and is not a folder"
    assert f.read_text() == "mine\n" and not (home / "runs").exists()


def test_json_output_is_plain_even_where_the_console_would_colour(tmp_path, monkeypatch):
    """`--json` never carries colour codes: a console that believes it is a terminal (Textual ran in
    the same process, FORCE_COLOR) left `ls --json` unreadable by json.loads."""
    from rich.console import Console

    import gpctl.common
    monkeypatch.setattr(gpctl.common, "out", Console(force_terminal=True, color_system="truecolor"))
    h = tmp_path / "home"
    res = runner.invoke(app, ["--home", str(h), "ls", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout) == [] and "\x1b" not in res.stdout


def _demo_runs(home, *overrides: str) -> dict:
    """The demo's arms and a bs32 run, tiny and trained (checkpoints every 4 steps): {arm: RunDir}."""
    from engine.store.rundir import RunDir
    from engine.train.loop import train
    from tests.conftest import TINY_IMAGES, tiny
    made = {}
    for arm, seed in (("bs32", 0), ("bs512", 0), ("bs512_seed2", 1), ("bs32to512", 0)):
        rd = RunDir.create(home, tiny(TINY_IMAGES, *overrides, "checkpoint_every=4", f"seed={seed}", name=arm,
                                      preset="demo"))
        assert train(rd) == "done"
        made[arm] = rd
    return made


def test_every_help_example_names_runs_that_resolve_on_the_demos_runs(tmp_path):
    """The `-h` examples name the demo's runs by preset-arm (`demo-bs512`), though `demo-bs512_seed2`
    starts the same way: each name resolves to its arm's run (the next test runs them)."""
    import re

    from engine.store.rundir import RunDir, resolve
    from gpctl.cli import EXAMPLES
    from tests.conftest import TINY_IMAGES, tiny

    h = tmp_path / "home"
    made = {arm: rd.id for arm, rd in _demo_runs(h, "steps=8", "eval_every=4").items()}
    examples = [e for text in EXAMPLES.values() for e in text.split("|")] + [
        "gpctl queue move demo-bs512 --first"]
    named = 0
    for example in examples:
        for name in re.findall(r"\bdemo-[A-Za-z0-9_]+\b", example):
            assert resolve(h, name).id == made[name[len("demo-"):]], example
            named += 1
    assert named >= 15
    with pytest.raises(Exception, match=r"ambiguous: 2 runs of that arm"):
        RunDir.create(h, tiny(TINY_IMAGES, "steps=8", name="bs32", preset="demo"))
        resolve(h, "demo-bs32")


# what the examples test cannot run as written here, and why (every other example runs)
NOT_RUN = {"tui": "interactive (tests/test_tui.py drives it in tmux)",
           "repro": "minutes of training (tests/test_repro.py runs `gpctl repro --ci`)",
           "worker": "asks for GPUs 0,1 (tests/test_queue.py runs CPU workers)"}


def test_every_help_example_runs_on_the_demos_runs(tmp_path, monkeypatch):
    """Issue 27: every `-h` example (but NOT_RUN's) runs as written on the demo's runs, with only its
    blocking flags removed (`--wait`, `-f`: it would wait for a worker) and the part after `&&` (another
    program): exit 0. The runs are the demo's arms and a bs32 run (tiny models, 104 steps, checkpoints every 4),
    one running (a job in the queue) so that steering and cancel have a run to act on, one stopped."""
    import shlex

    from engine.store.jobs import JobStore
    from gpctl import queue
    from gpctl.cli import EXAMPLES
    monkeypatch.setattr(queue, "ensure_worker", lambda *a, **k: False)   # queued, never trained here
    monkeypatch.chdir(tmp_path)
    h = tmp_path / "home"
    made = _demo_runs(h, "steps=104", "eval_every=8")
    made["bs32to512"].write_status(state="stopped")       # what resume's example continues
    running = made["bs512"]
    store = JobStore(h)
    store.update(store.enqueue(running.id, running.path), state="running", pid=os.getpid())
    store.close()
    running.write_status(state="running", pid=os.getpid())
    assert set(EXAMPLES) - set(NOT_RUN) >= {"ls", "show", "logs", "fork", "set", "drop", "raise", "stop",
                                            "checkpoint", "tv", "plot", "figure", "export", "cancel", "resume"}
    ran = []
    order = sorted(EXAMPLES, key=lambda c: c == "cancel")      # cancel last: it ends the running job
    for cmd in order:
        if cmd in NOT_RUN:
            continue
        for example in EXAMPLES[cmd].split("|"):
            example = example.split("&&")[0].strip()
            if not example.startswith("gpctl "):
                continue                   # the other end of a pipe (jq)
            argv = [a for a in shlex.split(example)[1:] if a not in ("--wait", "-f")]
            res = runner.invoke(app, ["--home", str(h), *argv])
            assert res.exit_code == 0, (example, res.output)
            ran.append(cmd)
    assert sorted(set(ran)) == sorted(set(EXAMPLES) - set(NOT_RUN))


def test_presets_is_one_line_per_preset_within_80_columns(home):
    """`gpctl presets`: one line per preset (name, runs, figure) that fits 80 columns; -v the arms too."""
    from engine.presets import list_presets
    found = list_presets()
    res = invoke(home, "presets")
    lines = res.stdout.splitlines()
    assert res.exit_code == 0 and len(lines) == len(found) + 2 and max(map(len, lines)) <= 80
    rows = {line.split()[0]: line for line in lines[1:-1]}
    assert rows["cifar_bs32_512"].split()[1:] == ["4", "Fig.", "7a"]
    assert set(rows) == {p.name for p in found}
    verbose = invoke(home, "presets", "-v")
    assert verbose.exit_code == 0 and "bs512_seed2" in verbose.stdout and "bs512_seed2" not in res.stdout
