"""Issue 30: runs carry their provenance. Each run records at creation the code it runs (version, git
commit, the uncommitted diff, untracked files), Python, torch and host; an attempt that starts on
other code says so (code_changed); `gpctl show` shows it and `show A --diff B` says how two runs
differ in config, code and environment. Checked against git's own answers in a repository the test
makes, with a run whose code did not change as the control."""
import hashlib
import subprocess

import pytest
from typer.testing import CliRunner

from engine.store import provenance
from engine.store.rundir import RunDir
from engine.train.loop import train
from gpctl.cli import app
from tests.conftest import TINY_IMAGES, tiny

runner = CliRunner()


def git(repo, *args) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A git checkout standing in for gpctl's own: one commit, then an edit and an untracked file."""
    r = tmp_path / "checkout"
    r.mkdir()
    git(r, "init", "-q")
    git(r, "config", "user.email", "t@example.com")
    git(r, "config", "user.name", "t")
    (r / "pyproject.toml").write_text('[project]\nname = "x"\nversion = "9.9"\n')
    (r / "train.py").write_text("lr = 0.05\n")
    git(r, "add", ".")
    git(r, "commit", "-qm", "first")
    monkeypatch.setattr(provenance, "ROOT", r)
    monkeypatch.setattr(provenance, "_cache", None)
    return r


def test_a_run_records_the_code_it_was_created_with(home, repo):
    (repo / "train.py").write_text("lr = 0.5\n")            # an uncommitted edit
    (repo / "notes.txt").write_text("x\n")
    rd = RunDir.create(home, tiny(TINY_IMAGES))
    rec = provenance.read(rd.path)
    diff = subprocess.run(["git", "-C", str(repo), "diff", "HEAD"], capture_output=True, check=True).stdout
    assert rec["code"]["git"] == {"commit": git(repo, "rev-parse", "HEAD").strip(), "dirty": True,
                                  "diff_bytes": len(diff), "diff_sha256": hashlib.sha256(diff).hexdigest(),
                                  "untracked": ["notes.txt"], "untracked_count": 1}
    assert (rd.path / "code.diff").read_bytes() == diff and b"+lr = 0.5" in diff
    assert rec["code"]["version"] == provenance._version(repo)
    import platform
    import socket
    assert (rec["environment"]["python"], rec["environment"]["host"]) == (platform.python_version(),
                                                                          socket.gethostname())
    show = runner.invoke(app, ["--home", str(home), "show", rd.id])
    commit = git(repo, "rev-parse", "HEAD").strip()
    line = next(ln for ln in show.stdout.splitlines() if ln.startswith("code "))
    assert line.startswith(f"code gpctl {rec['code']['version']}, git {commit[:10]} + uncommitted changes "
                           f"({len(diff) / 1000:.1f} kB diff, sha256 {hashlib.sha256(diff).hexdigest()[:8]}), "
                           f"1 untracked file, python {platform.python_version()}")


def test_an_attempt_on_other_code_says_so_and_one_on_the_same_code_does_not(home, repo):
    same = RunDir.create(home, tiny(TINY_IMAGES, "steps=4", "eval_every=0"), run_id="tiny-same")
    moved = RunDir.create(home, tiny(TINY_IMAGES, "steps=4", "eval_every=0"), run_id="tiny-moved")
    first = git(repo, "rev-parse", "HEAD").strip()
    assert train(same) == "done"
    assert [e for e in same.events()[0] if e["event"] == "code_changed"] == []       # the control
    (repo / "train.py").write_text("lr = 0.1\n")
    git(repo, "commit", "-qam", "second")                 # between enqueue and start
    second = git(repo, "rev-parse", "HEAD").strip()
    assert train(moved) == "done"
    (ev,) = [e for e in moved.events()[0] if e["event"] == "code_changed"]
    assert (ev["created"]["git"]["commit"], ev["now"]["git"]["commit"]) == (first, second) and ev["step"] == 0
    start = next(e for e in moved.events()[0] if e["event"] == "start")
    assert start["code"] == [provenance._version(repo), second, None]
    assert "warning: the code changed since this run was created" in moved.log_file.read_text()
    show = runner.invoke(app, ["--home", str(home), "show", moved.id]).stdout
    assert f"  at step 0: the code changed since the run was created: gpctl {provenance._version(repo)}, git " \
           f"{first[:10]} → gpctl {provenance._version(repo)}, git {second[:10]}" in show.splitlines()


def test_show_diff_names_what_differs_in_config_code_and_environment(home, repo):
    a = RunDir.create(home, tiny(TINY_IMAGES, "lr=0.05"), run_id="tiny-a")
    b = RunDir.create(home, tiny(TINY_IMAGES, "lr=0.05"), run_id="tiny-b")
    (repo / "train.py").write_text("lr = 0.1\n")
    git(repo, "commit", "-qam", "second")
    provenance._cache = None
    c = RunDir.create(home, tiny(TINY_IMAGES, "lr=0.01", "batch_size=32"), run_id="tiny-c")
    first, second = git(repo, "rev-parse", "HEAD~1").strip(), git(repo, "rev-parse", "HEAD").strip()
    v = provenance._version(repo)
    same = runner.invoke(app, ["--home", str(home), "show", a.id, "--diff", b.id])
    assert same.exit_code == 0, same.output
    assert same.stdout.splitlines() == ["tiny-a vs tiny-b", "config: the same", f"code: the same (gpctl {v}, git "
                                        f"{first[:10]})", "environment: the same"]
    res = runner.invoke(app, ["--home", str(home), "show", a.id, "--diff", c.id])
    assert res.stdout.splitlines() == [
        "tiny-a vs tiny-c", "config: 3 keys differ", "  batch_size: 16 | 32", "  lr: 0.05 | 0.01",
        "  lr_ref: 0.05 | 0.01",                          # lr_ref follows lr where the config leaves it out
        "code: differs", f"  tiny-a: gpctl {v}, git {first[:10]}", f"  tiny-c: gpctl {v}, git {second[:10]}",
        f"  git diff {first[:10]} {second[:10]}   (from the checkout: what changed)", "environment: the same"]
    bad = runner.invoke(app, ["--home", str(home), "show", a.id, "--diff", "nope"])
    assert bad.exit_code != 0 and "unknown run 'nope'" in bad.stderr
