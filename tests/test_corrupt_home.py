"""Issue 12: one bad file never takes down the others. A home with one healthy run and one run for
each kind of corruption: every reader shows the healthy run, and no command prints a traceback."""
import json

import pytest
from typer.testing import CliRunner

from engine.rundir import RunDir
from engine.train import train
from gpctl.cli import app
from tests.conftest import TINY_IMAGES, tiny

runner = CliRunner()

REASONS = {   # what `ls --json` and `show` say about each
    "config_bytes": "config.toml: not UTF-8 text (byte 11)",
    "metrics_bytes": "metrics.jsonl: 1 unreadable line skipped (byte 0: not JSON)",
    "loss_string": "metrics.jsonl: 3 unreadable lines skipped (byte 0: 'loss' is not a number)",
    "events_bytes": "events.jsonl: 2 unreadable lines skipped (byte 0: not UTF-8)",
    "status_garbage": "status.json: not UTF-8",
    "status_list": "status.json: not a JSON object",
    "nested": "metrics.jsonl: 1 unreadable line skipped (byte 0: nested too deep)",
}

CORRUPTIONS = {
    "config_bytes": lambda rd: rd.config_file.write_bytes(b"steps = 3\n\xff\xfe\x00garbage"),
    "metrics_bytes": lambda rd: rd.metrics_file.write_bytes(b"\x00\xff\xfe" * 100 + b"\n"),
    "loss_string": lambda rd: rd.metrics_file.write_text('{"step": 1, "loss": "high", "lr": 0.1}\n'
                                                         '{"step": "two", "loss": 1.0}\n[1, 2]\n'),
    "events_bytes": lambda rd: rd.events_file.write_bytes(b"\xff" * 50 + b"\n{\"event\": 5}\n"),
    "status_garbage": lambda rd: rd.status_file.write_bytes(b"\xff\xfe not json"),
    "status_list": lambda rd: rd.status_file.write_text("[1, 2, 3]"),
    "nested": lambda rd: rd.metrics_file.write_text("[" * 50_000 + "\n"),
}


@pytest.fixture
def corrupt_home(tmp_path):
    home = tmp_path / "home"
    healthy = RunDir.create(home, tiny(TINY_IMAGES, "steps=4", "eval_every=2", "checkpoint_every=2", name="healthy"))
    assert train(healthy) == "done"
    bad = {}
    for kind, corrupt in CORRUPTIONS.items():
        rd = RunDir.create(home, tiny(TINY_IMAGES, "steps=4", name=kind.replace("_", "-")))
        assert train(rd) == "done"
        corrupt(rd)
        bad[kind] = rd
    return home, healthy, bad


def invoke(home, *args):
    return runner.invoke(app, ["--home", str(home), *args])


def test_every_reader_shows_the_healthy_run(corrupt_home):
    home, healthy, bad = corrupt_home
    res = invoke(home, "ls", "--json")
    assert res.exit_code == 0, res.output
    rows = {r["id"]: r for r in json.loads(res.stdout)}
    assert set(rows) == {healthy.id, *(rd.id for rd in bad.values())}
    h = rows[healthy.id]
    assert (h["state"], h["step"], h["preset"], h["problem"]) == ("done", 4, "tiny", None)
    for kind, rd in bad.items():
        assert rows[rd.id]["state"] == "unreadable", kind
        assert rows[rd.id]["problem"].endswith(REASONS[kind]), (kind, rows[rd.id]["problem"])
    assert rows[bad["loss_string"].id]["loss"] is None           # the bad records were skipped
    assert rows[bad["config_bytes"].id]["preset"] == "?"
    assert rows[bad["metrics_bytes"].id]["run_state"] == "done"  # what the run itself recorded
    res = invoke(home, "ls")
    assert res.exit_code == 0 and healthy.id in res.stdout, res.output
    assert sum(" unreadable " in line for line in res.stdout.splitlines()) == len(bad)
    res = invoke(home, "show", healthy.id)
    assert res.exit_code == 0 and res.stdout.splitlines()[0].endswith("tiny/healthy  done  on cpu"), res.output
    assert "unreadable" not in res.stdout
    for kind, rd in bad.items():
        res = invoke(home, "show", rd.id)
        assert res.exit_code == 0, (kind, res.output)
        assert res.stdout.splitlines()[0].split()[2] == "unreadable", (kind, res.stdout)
        assert any(line.startswith("unreadable: ") and line.endswith(REASONS[kind])
                   for line in res.stdout.splitlines()), (kind, res.stdout)
        shown = json.loads(invoke(home, "show", rd.id, "--json").stdout)
        assert shown["state"] == "unreadable" and shown["problems"][-1].endswith(REASONS[kind])
    res = invoke(home, "plot", healthy.id, "--out", str(home / "p.png"))
    assert res.exit_code == 0, res.output
    assert (home / "p.png").stat().st_size > 1000
    for kind, rd in bad.items():                                     # plot and tv: work, or one line
        for args in (["plot", rd.id, "--out", str(home / "q.png")], ["tv", healthy.id, rd.id]):
            res = invoke(home, *args)
            assert res.exception is None or isinstance(res.exception, SystemExit), (kind, args, res.exception)
            assert res.exit_code == 0 or (res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1), \
                (kind, args, res.output)


@pytest.mark.parametrize("args, message", [
    (["fork", "{id}", "--no-start", "--set", "preset=../../x"], "'preset' = '../../x' is not a plain name"),
    (["fork", "{id}", "--no-start", "--name", "a/../../../x"], "'name' = 'a/../../../x' is not a plain name"),
    (["fork", "{id}", "--no-start", "--name", "../x"], "'name' = '../x' is not a plain name"),
    (["cancel", ""], "a run id cannot be empty"),
    (["show", " "], "a run id cannot be empty"),
])
def test_names_cannot_escape_the_home(corrupt_home, args, message):
    home, healthy, _ = corrupt_home
    before = sorted(p.name for p in home.parent.rglob("*") if p.is_dir())
    res = invoke(home, *[a.format(id=healthy.id) for a in args])
    assert res.exit_code == 2 and message in res.stderr, res.output
    assert len(res.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in home.parent.rglob("*") if p.is_dir()) == before


@pytest.mark.parametrize("setting, message", [
    ("model.width=0", "'model.width' must be in [1, 65536], got 0"),
    ("model.width=-3", "'model.width' must be in [1, 65536], got -3"),
    ("threads=-1", "'threads' must be in [0, 4096], got -1"),
    ('device="cuda:abc"', "'device' = 'cuda:abc' is not one of auto, cpu, cuda, cuda:N"),
    ("data.image_size=0", "'data.image_size' must be > 0, got 0"),
    ("steps=1e26", "'steps' must be an integer, got 1e+26"),
    ("checkpoint_at_steps=[-5]", "'checkpoint_at_steps' and 'checkpoint_at_lr_times' must be >= 0"),
    ("seed=-1", "'seed' must be in [0, 9223372036854775807], got -1"),
])
def test_a_preset_that_cannot_work_is_refused_before_queueing(tmp_path, setting, message):
    home = tmp_path / "home"
    res = runner.invoke(app, ["--home", str(home), "run", "preset", "demo", "--no-worker", "--set", setting])
    assert res.exit_code == 2 and message in res.stderr, res.output
    assert len(res.stderr.strip().splitlines()) == 1
    assert not (home / "runs").exists() or not any((home / "runs").iterdir())


def test_a_home_that_is_a_file_is_one_line(tmp_path):
    f = tmp_path / "home"
    f.write_text("not a folder")
    for args in (["ls"], ["run", "preset", "demo", "--no-worker"], ["worker", "--status"], ["show", "x"]):
        res = runner.invoke(app, ["--home", str(f), *args])
        assert res.exit_code == 2 and res.stderr.startswith("error: "), (args, res.output)
        assert len(res.stderr.strip().splitlines()) == 1, (args, res.stderr)


def test_a_non_utf8_preset_file_is_one_line(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_bytes(b"[base]\nsteps = 3\n\xff\xfe\n")
    res = runner.invoke(app, ["--home", str(tmp_path / "h"), "run", "preset", str(p), "--no-worker"])
    assert res.exit_code == 2 and res.stderr.strip() == f"error: {p}: not UTF-8 text (byte 18)", res.output


def test_the_tui_shows_the_healthy_run_in_a_corrupt_home(corrupt_home):
    import asyncio

    from gpctl.tui.app import GpctlApp
    home, healthy, bad = corrupt_home

    async def go():
        app = GpctlApp(home, live=False)
        async with app.run_test(size=(160, 48)) as pilot:
            await pilot.pause()
            assert len(app.table.run_ids) == 1 + len(bad)
            states = {r["id"]: r["state"] for r in app.rows}
            assert states == {healthy.id: "done", **{rd.id: "unreadable" for rd in bad.values()}}
            app.table.move_cursor(row=app.table.get_row_index(healthy.id))
            await pilot.pause()
            assert [s[3] for s in app.plot.series] == [healthy.id]
            for kind, rd in bad.items():             # each corrupt run selected, overlaid, with evals
                app.table.move_cursor(row=app.table.get_row_index(rd.id))
                await pilot.press("space")
                await pilot.pause()
                first = app.events_pane.lines[0].text
                assert first.startswith("unreadable: ") and first.endswith(REASONS[kind]), (kind, first)
            await pilot.press("v")
            await pilot.pause()
            assert app.is_running
    asyncio.run(go())


def test_eight_runs_with_evals_have_colours(tmp_path):
    """Issue 12: the eighth run's eval series asked for `bright_orange1`, which does not exist."""
    from rich.style import Style

    from gpctl.tui.widgets.plot import COLORS, eval_color
    for c in COLORS:
        Style.parse(eval_color(c))   # raises for a colour that does not exist


def test_resume_without_checkpoints_keeps_the_records(tmp_path):
    """Issue 12: `resume` with checkpoints/ missing emptied metrics.jsonl and retrained from step 0."""
    import shutil
    home = tmp_path / "home"
    rd = RunDir.create(home, tiny(TINY_IMAGES, "steps=4", "eval_every=2"))
    assert train(rd) == "done"
    rd.write_status(state="stopped")
    shutil.rmtree(rd.checkpoints)
    before = rd.metrics_file.read_bytes()
    res = invoke(home, "resume", rd.id)
    assert res.exit_code == 2 and "has records but no checkpoint" in res.stderr, res.output
    assert train(rd, resume=True) == "failed"                    # the engine refuses too
    assert "cannot resume: no checkpoint" in rd.status()["error"]
    assert rd.metrics_file.read_bytes() == before


def test_a_running_run_whose_process_is_gone_shows_as_lost(tmp_path):
    """Issue 12: `ls` showed a run whose process had died as `running` until a worker reconciled."""
    import os
    import socket
    import subprocess
    home = tmp_path / "home"
    rd = RunDir.create(home, tiny(TINY_IMAGES, "steps=4"))
    p = subprocess.Popen(["true"])
    p.wait()
    rd.write_status(state="running", pid=p.pid, host=socket.gethostname())
    rows = json.loads(invoke(home, "ls", "--json").stdout)
    assert rows[0]["state"] == "lost"
    rd.write_status(pid=os.getpid())                                  # negative control: alive
    assert json.loads(invoke(home, "ls", "--json").stdout)[0]["state"] == "running"
    rd.write_status(pid=p.pid, host="another-host")                   # not ours to judge
    assert json.loads(invoke(home, "ls", "--json").stdout)[0]["state"] == "running"


# ---------------------------------------------------------------- a read-only home
def _as_reader(home):
    """argv prefix running a command as a user who may read `home` but not write it: ourselves after
    `chmod a-w`, or, as root (whom modes do not stop), `nobody` with the home readable by all."""
    import os
    import shutil
    import stat
    import subprocess
    import sys
    if os.geteuid() != 0:
        for p in [home, *home.rglob("*")]:
            p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
        return [sys.executable]
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: cannot drop to a user a read-only home stops")
    for p in [home, *home.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    prefix = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable]
    probe = subprocess.run([*prefix, "-c", "import gpctl.cli"], capture_output=True, text=True)
    if probe.returncode:
        pytest.skip(f"user nobody cannot import gpctl from this checkout: {probe.stderr.strip()[-200:]}")
    return prefix


def test_a_read_only_home_is_read_and_never_written(tmp_path):
    """Issue 12: every command opened jobs.db for writing and created its schema first, so `ls`,
    `show`, `worker --status`, ... gave tracebacks on a colleague's or a mounted read-only home."""
    import subprocess
    import tempfile
    from pathlib import Path

    from engine.jobs import JobStore
    top = Path(tempfile.mkdtemp(dir="/tmp", prefix="gpctl-ro-"))
    top.chmod(0o755)
    home = top / "home"
    a = RunDir.create(home, tiny(TINY_IMAGES, "steps=4", "eval_every=2", "checkpoint_every=2", name="a"))
    b = RunDir.create(home, tiny(TINY_IMAGES, "steps=4", "eval_every=2", "checkpoint_every=2", "seed=1", name="b"))
    for rd in (a, b):
        assert train(rd) == "done"
        rd.log("the run's own output")
    store = JobStore(home)
    store.enqueue(a.id, a.path)
    store.finish(store.get(a.id).id, "done", 0)
    store.close()
    out_dir = top / "out"
    out_dir.mkdir(mode=0o777)
    out_dir.chmod(0o777)

    def snapshot():
        return sorted((str(p.relative_to(home)), p.stat().st_size, p.stat().st_mtime_ns) for p in home.rglob("*"))
    prefix = _as_reader(home)
    before = snapshot()

    def gpctl(*args):
        return subprocess.run([*prefix, "-m", "gpctl", "--home", str(home), *args], capture_output=True, text=True,
                              cwd=str(top), env={"PATH": "/usr/bin:/bin", "HOME": str(out_dir)})
    res = gpctl("ls", "--json")
    assert res.returncode == 0, res.stderr
    assert {(r["id"], r["state"], r["job"]) for r in json.loads(res.stdout)} == {(a.id, "done", "done"), (b.id, "done", None)}
    for args, expect in ((["ls"], a.id), (["show", a.id], "job done  attempts 0"), (["logs", a.id], "the run's own output"),
                         (["worker", "--status"], "workers"), (["tv", a.id, b.id], "TV"),
                         (["plot", a.id, b.id, "--out", str(out_dir / "p.png")], "")):
        res = gpctl(*args)
        assert res.returncode == 0 and expect in res.stdout and "Traceback" not in res.stderr, (args, res.stdout, res.stderr)
    assert (out_dir / "p.png").stat().st_size > 1000
    for args in (["run", "preset", "demo", "--no-worker"], ["resume", a.id], ["cancel", b.id], ["drop", a.id]):
        res = gpctl(*args)
        assert res.returncode == 2 and res.stderr.startswith("error: "), (args, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr, (args, res.stderr)
    script = ("import asyncio, sys\nfrom pathlib import Path\nfrom gpctl.tui.app import GpctlApp\n"
              "async def go():\n    app = GpctlApp(Path(sys.argv[1]), live=False)\n"
              "    async with app.run_test(size=(120, 40)) as pilot:\n        await pilot.pause()\n"
              "        print(sorted(r['state'] for r in app.rows))\nasyncio.run(go())\n")
    res = subprocess.run([*prefix, "-c", script, str(home)], capture_output=True, text=True, cwd=str(top),
                         env={"PATH": "/usr/bin:/bin", "HOME": str(out_dir)})
    assert res.returncode == 0 and res.stdout.strip() == "['done', 'done']", res.stderr[-2000:]
    assert snapshot() == before                                  # nothing in the home was written
