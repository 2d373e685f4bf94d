"""Issue 15: a CLI that speaks the ecosystem — ids never cut, filters and CSV, completion, -h,
--version, a hint from `gpctl run NAME`, examples and help for every option."""
import csv
import io
import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from engine.store.rundir import RunDir
from engine.train.loop import train
from gpctl.cli import app
from tests.conftest import TINY_IMAGES, tiny

runner = CliRunner()


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    home = tmp_path_factory.mktemp("conv") / "home"
    long = "an-arm-with-a-rather-long-name-for-a-narrow-terminal"
    for name, extra in ((long, ["steps=4"]), ("short", ["steps=2", "lr=0.2"])):
        rd = RunDir.create(home, tiny(TINY_IMAGES, *extra, "eval_every=2", name=name))
        assert train(rd) == "done"
    RunDir.create(home, tiny(TINY_IMAGES, "steps=3", name="fresh"))
    return home


def gpctl(home, *args, columns=None):
    env = dict(os.environ, GPCTL_HOME=str(home), **({"COLUMNS": str(columns)} if columns else {}))
    return subprocess.run([sys.executable, "-m", "gpctl", *args], capture_output=True, text=True, env=env)


@pytest.mark.parametrize("columns", [60, 80, 200, None])   # None: piped, no COLUMNS
def test_ls_never_cuts_a_run_id(home, columns):
    res = gpctl(home, "ls", columns=columns)
    assert res.returncode == 0, res.stderr
    ids = sorted(rd.name for rd in (home / "runs").iterdir())
    lines = res.stdout.splitlines()
    assert res.stderr.splitlines()[0] == f"runs in {home / 'runs'}"     # the home on stderr: stdout is the table
    assert lines[0].split() == ["id", "state", "device", "step", "samples", "lr_time", "lr", "batch", "last", "loss",
                                "eval", "loss", "attempt", "snap"]    # piped: every column
    assert sorted(line.split()[0] for line in lines[1:]) == ids
    assert [line.split()[1] for line in lines[1:]] == ["done", "done", "created"]


@pytest.mark.parametrize("width", [60, 80, 120])
def test_ls_in_a_terminal_fits_every_row_on_one_line(home, width, monkeypatch):
    """In a terminal, `ls` leaves out whole columns (never cuts one) until each row fits; the id and
    the state always stay; stderr names what was left out; --wide shows everything."""
    import gpctl.cli
    monkeypatch.setattr(gpctl.cli, "_terminal_width", lambda: width)
    res = runner.invoke(app, ["--home", str(home), "ls"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    ids = sorted(rd.name for rd in (home / "runs").iterdir())
    least = max(map(len, ids)) + 2 + len("created")   # the id and the state stay, whatever the width
    assert all(len(line) <= max(width, least) for line in lines) and len(lines) == 4
    assert sorted(line.split()[0] for line in lines[1:]) == ids
    assert lines[0].split()[:2] == ["id", "state"]
    listed = {r["id"]: r for r in json.loads(runner.invoke(app, ["--home", str(home), "ls", "--json"]).stdout)}
    header = lines[0].replace("last loss", "last_loss").replace("eval loss", "eval_loss").split()
    for line in lines[1:]:                       # every shown cell is the whole value
        cells = dict(zip(header, line.split()))
        r = listed[cells["id"]]
        if "step" in cells:
            assert cells["step"] == str(r["step"])
        assert cells["state"] == r["state"]
        if "samples" in cells:
            assert cells["samples"] == str(r["samples"])
    left = [c for c in ("device", "samples", "lr_time", "lr", "batch", "last loss", "eval loss", "attempt", "snap")
            if c not in lines[0]]
    if left:
        assert "left out" in res.stderr and "--wide shows all" in res.stderr
    if width == 60:
        assert left                                 # 60 columns cannot hold all eleven
    wide = runner.invoke(app, ["--home", str(home), "ls", "--wide"])
    assert len(wide.stdout.splitlines()[0].split()) == 14 and "left out" not in wide.stderr
    bad = runner.invoke(app, ["--home", str(home), "ls", "--state", "runing"])
    assert bad.exit_code == 2 and bad.stderr.strip().startswith("error: --state 'runing' is not a state; one of: created,")


def test_ls_filters_sorts_and_writes_csv(home):
    rows = list(csv.DictReader(io.StringIO(runner.invoke(app, ["--home", str(home), "ls", "--csv"]).stdout)))
    assert [r["state"] for r in rows] == ["done", "done", "created"]
    assert [r["step"] for r in rows] == ["4", "2", "0"]
    by_loss = json.loads(runner.invoke(app, ["--home", str(home), "ls", "--json", "--sort", "loss"]).stdout)
    losses = [r["loss"] for r in by_loss]
    assert losses[:2] == sorted(losses[:2]) and losses[2] is None       # runs without a value last
    rev = json.loads(runner.invoke(app, ["--home", str(home), "ls", "--json", "--sort", "-loss"]).stdout)
    assert [r["loss"] for r in rev] == sorted(losses[:2], reverse=True) + [None]
    done = json.loads(runner.invoke(app, ["--home", str(home), "ls", "--json", "--state", "done"]).stdout)
    assert [r["arm"] for r in done] == ["an-arm-with-a-rather-long-name-for-a-narrow-terminal", "short"]
    assert json.loads(runner.invoke(app, ["--home", str(home), "ls", "--json", "--preset", "nope"]).stdout) == []
    bad = runner.invoke(app, ["--home", str(home), "ls", "--sort", "colour"])
    assert bad.exit_code == 2 and bad.stderr.startswith("error: --sort must be one of created, id,")


def test_an_empty_home_says_what_to_type_and_creates_nothing(tmp_path):
    res = runner.invoke(app, ["--home", str(tmp_path / "none"), "ls"])
    assert res.exit_code == 0
    assert res.stdout.strip() == (f"no runs in {tmp_path / 'none' / 'runs'} yet: gpctl run preset demo "
                                  f"(gpctl presets lists them all)")
    assert not (tmp_path / "none").exists()


def test_completion_script_and_completions_of_runs_and_presets(home):
    script = gpctl(home, "--show-completion", "bash")
    assert script.returncode == 0 and "_GPCTL_COMPLETE=complete_bash" in script.stdout
    env = dict(os.environ, _GPCTL_COMPLETE="complete_bash", GPCTL_HOME=str(home))
    got = subprocess.run([sys.executable, "-m", "gpctl"], capture_output=True, text=True,
                         env=dict(env, COMP_WORDS="gpctl show tiny-s", COMP_CWORD="2"))
    short = next(p.name for p in (home / "runs").iterdir() if p.name.startswith("tiny-short"))
    assert got.stdout.split() == [short]
    got = subprocess.run([sys.executable, "-m", "gpctl"], capture_output=True, text=True,
                         env=dict(env, COMP_WORDS="gpctl run preset cifar_bs32_", COMP_CWORD="3"))
    assert got.stdout.split() == ["cifar_bs32_512", "cifar_bs32_512_tiny"]


def test_version_short_help_and_the_run_hint():
    from gpctl import __version__
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.stdout == f"gpctl {__version__}\n"
    assert runner.invoke(app, ["ls", "-h"]).stdout == runner.invoke(app, ["ls", "--help"]).stdout
    res = runner.invoke(app, ["run", "demo"])
    import re
    words = " ".join(re.sub("[│╭╮╰╯─]", " ", res.stderr).split())
    assert res.exit_code == 2 and "No such command 'demo'. To run the preset of that name: gpctl run preset demo" in words


def _commands(group, prefix=()):
    import typer.main
    cli = typer.main.get_command(group) if not hasattr(group, "commands") else group
    for name, cmd in cli.commands.items():
        if hasattr(cmd, "commands"):
            yield from _commands(cmd, (*prefix, name))
        else:
            yield (*prefix, name), cmd


def test_every_command_has_help_an_example_and_help_for_every_option():
    missing = []
    for path, cmd in _commands(app):
        if not cmd.help:
            missing.append(f"{' '.join(path)}: no help")
        if path[0] not in ("run", "presets", "preset") and not (cmd.epilog or "").startswith("Example: gpctl "):
            missing.append(f"{' '.join(path)}: no example")
        for p in cmd.params:
            if p.param_type_name == "option" and not p.help and "--help" not in p.opts:
                missing.append(f"{' '.join(path)} {p.opts[0]}: no help")
    assert missing == []


def test_ctrl_c_on_a_wait_says_the_runs_go_on(tmp_path, monkeypatch):
    from gpctl import queue
    home = tmp_path / "home"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(queue, "_watch", interrupted)
    res = runner.invoke(app, ["--home", str(home), "run", "preset", "demo", "--arm", "bs512", "--no-worker", "--wait"])
    assert res.exit_code == 130, res.output
    rid = res.stdout.split()[0]
    assert res.stderr.strip() == (f"stopped waiting; 1 run(s) go on in the queue: follow them with `gpctl ls`, "
                                  f"`gpctl tui` or `gpctl logs -f {rid}`")
    rows = json.loads(runner.invoke(app, ["--home", str(home), "ls", "--json"]).stdout)
    assert [(r["id"], r["state"]) for r in rows] == [(rid, "queued")]


def test_a_closed_pipe_is_quiet(tmp_path):
    """`gpctl presets check --json | head -1`: the reader stops early; gpctl exits 0 and says nothing
    (it printed `error: Broken pipe`). The output is far over a pipe's 64 KiB buffer, so the write fails."""
    env = dict(os.environ, GPCTL_HOME=str(tmp_path / "home"))
    p = subprocess.Popen([sys.executable, "-m", "gpctl", "presets", "check", "--json"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env, text=True)
    assert p.stdout.readline().strip() == "["
    p.stdout.close()
    rc = p.wait(timeout=120)
    assert p.stderr.read() == "" and rc == 0
    # negative control: the same output read whole is over the buffer (so the test above broke the pipe)
    full = subprocess.run([sys.executable, "-m", "gpctl", "presets", "check", "--json"], capture_output=True,
                          text=True, env=env)
    assert len(full.stdout) > 65536 and full.returncode == 0
