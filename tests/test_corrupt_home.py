"""Issue 12: one bad file never takes down the others. A home with one healthy run and one run for
each kind of corruption: every reader shows the healthy run, and no command prints a traceback."""
import json
import os
import shutil

import pytest
from typer.testing import CliRunner

from engine.store.rundir import RunDir
from engine.train.loop import train
from gpctl.cli import app
from tests.conftest import TINY_IMAGES, tiny

runner = CliRunner()

_REASONS = {   # what `ls --json` and `show` say about each ({m}, {e}: the sizes of the files before)
    "config_bytes": "config.toml: not UTF-8 text (byte 11)",
    "metrics_bytes": "metrics.jsonl: 1 unreadable line skipped (byte 0: not JSON)",
    "loss_string": "metrics.jsonl: 3 unreadable lines skipped (byte 0: 'loss' is not a number)",
    "events_bytes": "events.jsonl: 2 unreadable lines skipped (byte 0: not UTF-8)",
    "status_garbage": "status.json: not UTF-8",
    "status_list": "status.json: not a JSON object",
    "nested": "metrics.jsonl: 1 unreadable line skipped (byte 0: nested too deep)",
    # issue 31: values of the wrong type, files that are not files, parsers' bounds
    "loss_null": "metrics.jsonl: 1 unreadable line skipped (byte {m}: 'loss' is null)",
    "step_infinite": "metrics.jsonl: 1 unreadable line skipped (byte {m}: 'step' is not finite)",
    "step_float": "metrics.jsonl: 1 unreadable line skipped (byte {m}: 'step' is not a whole number)",
    "config_nested": "config.toml: invalid TOML: nested deeper than 16 levels",
    "config_bigint": "config.toml: invalid TOML: an integer of more than 4300 digits",
    "config_fifo": "config.toml: a FIFO, not a regular file",
    "metrics_fifo": "metrics.jsonl: a FIFO, not a regular file, not read",
    "events_fifo": "events.jsonl: a FIFO, not a regular file, not read",
    "status_fifo": "status.json: a FIFO, not a regular file",
    "metrics_device": "metrics.jsonl: a symbolic link (run files are never followed), not read",
    "metrics_folder": "metrics.jsonl: a folder, not a regular file, not read",
    "event_without_kind": "events.jsonl: 1 unreadable line skipped (byte {e}: no 'event')",
    "event_changed_text": "events.jsonl: 1 unreadable line skipped (byte {e}: 'changed' is not an object)",
    "event_changed_words": "events.jsonl: 1 unreadable line skipped (byte {e}: 'changed' of 'lr' is not [before, after] numbers)",
    "event_step_infinite": "events.jsonl: 1 unreadable line skipped (byte {e}: 'step' is not finite)",
}

REASONS: dict[str, str] = {}   # _REASONS for the home the fixture made


def _append(path, text):
    with open(path, "a") as f:
        f.write(text)


def _replace(path, make):
    path.unlink()
    make(path)

CORRUPTIONS = {
    "config_bytes": lambda rd: rd.config_file.write_bytes(b"steps = 3\n\xff\xfe\x00garbage"),
    "metrics_bytes": lambda rd: rd.metrics_file.write_bytes(b"\x00\xff\xfe" * 100 + b"\n"),
    "loss_string": lambda rd: rd.metrics_file.write_text('{"step": 1, "loss": "high", "lr": 0.1}\n'
                                                         '{"step": "two", "loss": 1.0}\n[1, 2]\n'),
    "events_bytes": lambda rd: rd.events_file.write_bytes(b"\xff" * 50 + b"\n{\"event\": 5}\n"),
    "status_garbage": lambda rd: rd.status_file.write_bytes(b"\xff\xfe not json"),
    "status_list": lambda rd: rd.status_file.write_text("[1, 2, 3]"),
    "nested": lambda rd: rd.metrics_file.write_text("[" * 50_000 + "\n"),
    "loss_null": lambda rd: _append(rd.metrics_file, '{"step": 5, "loss": null, "lr": 0.1}\n'),
    "step_infinite": lambda rd: _append(rd.metrics_file, '{"step": Infinity, "loss": 1.0}\n'),
    "step_float": lambda rd: _append(rd.metrics_file, '{"step": 5.5, "loss": 1.0}\n'),
    "config_nested": lambda rd: rd.config_file.write_text("x = " + "[" * 5000 + "]" * 5000 + "\n"),
    "config_bigint": lambda rd: rd.config_file.write_text("steps = " + "9" * 5000 + "\n"),
    "config_fifo": lambda rd: _replace(rd.config_file, os.mkfifo),
    "metrics_fifo": lambda rd: _replace(rd.metrics_file, os.mkfifo),
    "events_fifo": lambda rd: _replace(rd.events_file, os.mkfifo),
    "status_fifo": lambda rd: _replace(rd.status_file, os.mkfifo),
    "metrics_device": lambda rd: _replace(rd.metrics_file, lambda p: os.symlink("/dev/zero", p)),
    "metrics_folder": lambda rd: _replace(rd.metrics_file, os.mkdir),
    "event_without_kind": lambda rd: _append(rd.events_file, '{"time": 1}\n'),
    "event_changed_text": lambda rd: _append(rd.events_file, '{"event": "control", "status": "applied", '
                                                             '"changed": "lr", "step": 2, "time": 1}\n'),
    "event_changed_words": lambda rd: _append(rd.events_file, '{"event": "control", "status": "applied", '
                                                              '"changed": {"lr": ["a", "b"]}, "time": 1}\n'),
    "event_step_infinite": lambda rd: _append(rd.events_file, '{"event": "fork", "step": Infinity, "time": 1}\n'),
}


@pytest.fixture
def corrupt_home(tmp_path):
    home = tmp_path / "home"
    healthy = RunDir.create(home, tiny(TINY_IMAGES, "steps=4", "eval_every=2", "checkpoint_every=2", name="healthy"))
    assert train(healthy) == "done"
    template = RunDir.create(home, tiny(TINY_IMAGES, "steps=4", name="template"))
    assert train(template) == "done"
    sizes = {"m": template.metrics_size(), "e": template.events_file.stat().st_size}
    bad = {}
    for kind, corrupt in CORRUPTIONS.items():   # copies of one trained run, each corrupted one way
        rd = RunDir(home / "runs" / f"tiny-{kind.replace('_', '-')}-{len(bad):06x}")
        shutil.copytree(template.path, rd.path, symlinks=True)
        corrupt(rd)
        bad[kind] = rd
    shutil.rmtree(template.path)
    REASONS.clear()
    REASONS.update({k: v.format(**sizes) for k, v in _REASONS.items()})
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
    (["fork", "{id}", "--no-start", "--set", "preset=../../x"], "--set preset: 'preset' is written by gpctl, not set"),
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

    from engine.store.jobs import JobStore
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


def test_a_garbage_jobs_db_still_shows_the_runs(tmp_path):
    """Issue 31: a jobs.db that is not a database crashed the TUI where `ls` said one line. The views
    of the runs (ls, show, the TUI) show them without their jobs and say why; the queue's own commands
    refuse in one line; the TUI's queue keys are one toast."""
    import asyncio

    from gpctl.tui.app import GpctlApp
    home = tmp_path / "home"
    rd = RunDir.create(home, tiny(TINY_IMAGES, "steps=2", name="one"))
    assert train(rd) == "done"
    (home / "jobs.db").write_bytes(b"\x13\x37 not sqlite " * 400)
    warning = f"warning: {home / 'jobs.db'}: file is not a database (the queue cannot be read: runs are shown without their jobs)"
    res = invoke(home, "ls")
    assert res.exit_code == 0 and res.stderr.splitlines()[0] == warning, res.output
    assert rd.id in res.stdout and " done " in res.stdout
    res = invoke(home, "show", rd.id)
    assert res.exit_code == 0 and res.stderr.splitlines()[0] == warning and "done" in res.stdout, res.output
    res = invoke(home, "queue")
    assert res.exit_code == 2 and res.stderr.strip() == f"error: {home / 'jobs.db'}: file is not a database", res.output

    async def go():
        app = GpctlApp(home, live=False)
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.pause()
            assert [r["state"] for r in app.rows] == ["done"]
            assert app.status_text().startswith("jobs.db unreadable (runs shown without jobs) · ")
            for key in ("Q", "C"):
                await pilot.press(key)
                await pilot.pause()
            assert app.is_running
            texts = [str(n.message) for n in app._notifications]
            assert f"{home / 'jobs.db'}: file is not a database" in texts, texts
    asyncio.run(go())


def test_long_lines_and_sparse_tails_are_passed_over_in_bounded_memory(tmp_path):
    """Issue 31: a line over MAX_RECORD is skipped (counted, never parsed), an unfinished one passed
    over so no later read starts inside it, and a multi-GiB sparse tail read in chunks."""
    import tracemalloc

    from engine.store.rundir import MAX_RECORD, Unreadable, read_jsonl
    p = tmp_path / "metrics.jsonl"
    good = '{"step": 1, "loss": 2.5}\n'
    long = '{"step": 2, "x": "' + "a" * (MAX_RECORD + 10) + '"}\n'
    p.write_text(good + long + good)
    skipped = Unreadable("metrics.jsonl")
    recs, end = read_jsonl(p, 0, skipped)
    assert [r["step"] for r in recs] == [1, 1] and end == p.stat().st_size
    assert str(skipped) == (f"metrics.jsonl: 1 unreadable line skipped (byte {len(good)}: "
                            f"{len(long) - 1} bytes, over the {MAX_RECORD}-byte limit)")
    with open(p, "r+b") as f:               # 1 GiB of zeros with no newline, appended in place
        f.truncate(p.stat().st_size + (1 << 30))
    skipped = Unreadable("metrics.jsonl")
    tracemalloc.start()
    try:
        recs, end2 = read_jsonl(p, end, skipped)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert recs == [] and end2 == p.stat().st_size and skipped.count == 1
    assert 16 << 20 < peak < 80 << 20, peak   # a chunk or three of 16 MiB at a time, never the whole tail
    assert read_jsonl(p, end2) == ([], end2)
    with open(p, "ab") as f:                # the writer finishes that "line" and goes on
        f.write(b'\n{"step": 3, "loss": 1.0}\n')
    recs, _ = read_jsonl(p, end2)
    assert [r["step"] for r in recs] == [3]
