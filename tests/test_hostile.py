"""Issue 31: no input breaks anything. Hostile content in the control file, in requests, in run files,
in parsers and in arguments: each is one line (an event, or an error and a non-zero exit), the run
goes on training where one was, and nothing is written outside the home."""
import json
import os
import struct

import pytest
from typer.testing import CliRunner

from engine.control import MAX_LINE, MAX_READ, MAX_WAITING, ControlReader
from engine.rundir import RunDir
from engine.train import train
from gpctl.cli import app
from tests.conftest import TINY_IMAGES, tiny

runner = CliRunner()


def _run(home, *overrides):
    return RunDir.create(home, tiny(TINY_IMAGES, "eval_every=0", *overrides))


def _acks(rd):
    return [e for e in rd.events()[0] if e["event"] == "control"]


def _replace_control(rd, kind, outside):
    p = rd.control_file
    p.unlink()
    if kind == "folder":
        p.mkdir()
    elif kind == "fifo":
        os.mkfifo(p)
    elif kind == "device":
        os.symlink("/dev/zero", p)
    elif kind == "link_out":             # a link to a regular file outside the run, with a valid request
        outside.write_text(json.dumps({"id": "evil", "set": {"lr": 0.5}}) + "\n")
        os.symlink(outside, p)


@pytest.mark.parametrize("kind, why", [
    ("folder", "a folder, not a regular file"),
    ("fifo", "a FIFO, not a regular file"),
    ("device", "a symbolic link (run files are never followed)"),
    ("link_out", "a symbolic link (run files are never followed)"),
])
def test_a_control_file_that_is_not_a_file_is_one_event_and_the_run_trains_on(tmp_path, kind, why):
    rd = _run(tmp_path / "home", "steps=8")

    def hook(t):
        if t.step == 2:
            _replace_control(rd, kind, tmp_path / "outside.jsonl")
        if t.step == 5:                         # the owner puts a regular file back, then appends
            if rd.control_file.is_dir() and not rd.control_file.is_symlink():
                rd.control_file.rmdir()
            else:
                rd.control_file.unlink()
            fd = os.open(rd.control_file, os.O_WRONLY | os.O_CREAT, 0o600)
            os.close(fd)
        if t.step == 6:
            with open(rd.control_file, "a") as f:
                f.write(json.dumps({"id": "ok", "set": {"lr": 0.02}}) + "\n")
    assert train(rd, hooks=[hook]) == "done"
    events = rd.events()[0]
    (bad,) = [e for e in events if e["event"] == "control_unreadable"]
    assert bad["detail"] == (f"control.jsonl: {why}; no request is read from it until it is a regular file "
                             "again (the run goes on)")
    assert [(a["id"], a["status"], a["step"]) for a in _acks(rd)] == [("ok", "applied", 7)]
    assert [r["lr"] for r in rd.metrics()[0] if "loss" in r] == [0.05] * 7 + [0.02]


def test_a_sparse_tail_is_read_a_bounded_slice_per_poll(tmp_path):
    """A multi-GiB hole grown in place is passed over MAX_READ bytes a poll (never read whole), and
    the request after it is applied once the reader reaches it."""
    rd = _run(tmp_path / "home", "steps=2")
    reader = ControlReader(rd)
    with open(rd.control_file, "r+b") as f:
        f.truncate(1 << 30)                      # 1 GiB of zeros, no newline
        f.seek(1 << 30)
        f.write(b'\n{"id": "after", "set": {"lr": 0.02}}\n')
    polls, lines = 0, []
    while not lines:
        before = reader.state.offset
        lines = reader.poll()
        polls += 1
        assert reader.state.offset - before <= MAX_READ or lines
        assert polls <= (1 << 30) // MAX_READ + 2
    (over, req) = lines
    assert over.problem == f"line is {1 << 30} bytes, over the {MAX_LINE}-byte limit"
    assert req.request == {"id": "after", "set": {"lr": 0.02}} and req.number == 2
    assert polls == (1 << 30) // MAX_READ + 1


def _header_bytes(path):
    with open(path, "rb") as f:
        return struct.unpack("<Q", f.read(8))[0]


def test_waiting_requests_are_capped_and_bounded(tmp_path):
    """Never-firing requests can no longer grow checkpoint metadata without a bound: MAX_WAITING wait,
    the next are refused in words; free-form fields are bounded before anything is kept."""
    rd = _run(tmp_path / "home", "steps=6", "checkpoint_every=2")
    never = [json.dumps({"id": f"w{i}", "set": {"lr": 0.01}, "at_step": 10 ** 9, "by": "x" * 60}) + "\n"
             for i in range(MAX_WAITING + 3)]
    nested = json.dumps({"id": "deep", "set": {"lr": 0.01}, "at_step": 10 ** 9, "by": [[[[[[["x"]]]]]]]}) + "\n"
    surrogate = '{"id": "\\ud800", "set": {"lr": 0.02}}\n'
    newline = '{"id": "a\\nb", "set": {"lr": 0.02}}\n'

    def hook(t):
        if t.step == 1:
            with open(rd.control_file, "a") as f:
                f.write("".join(never) + nested + surrogate + newline)
    assert train(rd, hooks=[hook]) == "done"
    acks = _acks(rd)
    assert sum(a["status"] == "waiting" for a in acks) == MAX_WAITING
    refused = [a for a in acks if a["status"] == "rejected"]
    assert [a["id"] for a in refused] == ["w64", "w65", "w66", "deep", "line-69", "line-70"]
    assert refused[0]["reason"] == (f"{MAX_WAITING} requests already wait for their conditions (the most a run "
                                    "keeps, in every checkpoint); send this one when one of them has applied")
    assert refused[3]["reason"].startswith("'by' must be printable text of 1 to 64 characters, got [[[[[[[")
    assert refused[4]["reason"] == "'id' must be printable text (one line), got \"\\ud800\""
    assert refused[5]["reason"] == "'id' must be printable text (one line), got \"a\\nb\""
    steps = [s for s, _ in rd.list_checkpoints()]
    assert steps == [2, 4, 6]
    state = rd.checkpoint_path(6).with_name("step_0000006.state.safetensors")
    assert _header_bytes(state) < 64 * 1024, _header_bytes(state)   # 64 waiting, without who sent them
    for args in (["show", rd.id], ["show", rd.id, "--json"], ["ls"]):
        res = runner.invoke(app, ["--home", str(tmp_path / "home"), *args])
        assert res.exit_code == 0 and res.exception is None, (args, res.output)
    res = runner.invoke(app, ["--home", str(tmp_path / "home"), "show", rd.id])
    lines = [ln for ln in res.stdout.splitlines() if "printable text (one line)" in ln]
    assert [ln.split("  ", 2)[-1] for ln in lines] == [     # each on its one line, newline escaped
        "rejected at step 2 (lr_time 2.0, samples 32): 'id' must be printable text (one line), got \"\\ud800\"",
        "rejected at step 2 (lr_time 2.0, samples 32): 'id' must be printable text (one line), got \"a\\nb\""]
