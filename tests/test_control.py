import json
import multiprocessing as mp
import os
import time

import pytest

from engine.control import ControlError, append_request
from engine.store.fork import fork
from engine.store.rundir import RunDir
from engine.train.loop import train
from tests.conftest import TINY_IMAGES, tiny


def _run(tmp_path, *overrides, run_id=None):
    cfg = tiny(TINY_IMAGES, "eval_every=0", *overrides)
    return RunDir.create(tmp_path, cfg, run_id=run_id)


def _steps(rd):
    return [r for r in rd.metrics()[0] if "loss" in r]


def _acks(rd):
    return [e for e in rd.events()[0] if e["event"] == "control"]


def _write_at(step, *lines):
    """A hook that appends raw lines to the control file at a step boundary (after the control poll),
    so they take effect at the next boundary."""
    def hook(t):
        if t.step == step:
            with open(t.rd.control_file, "a") as f:
                f.write("".join(lines))
    return hook


def test_set_lr_and_batch_take_effect_at_the_next_boundary(tmp_path):
    rd = _run(tmp_path, "steps=8", "lr=0.05")
    req = json.dumps({"id": "r1", "set": {"lr": 0.01, "batch_size": 32}})
    assert train(rd, hooks=[_write_at(3, req + "\n")]) == "done"
    recs = _steps(rd)
    assert [r["lr"] for r in recs] == [0.05] * 4 + [0.01] * 4
    assert [r["batch_size"] for r in recs] == [16] * 4 + [32] * 4
    assert [r["lr_time"] for r in recs] == pytest.approx([1, 2, 3, 4, 4.2, 4.4, 4.6, 4.8])
    (ack,) = _acks(rd)
    assert (ack["id"], ack["status"], ack["step"], ack["samples"], ack["lr_time"]) == ("r1", "applied", 4, 64, 4.0)
    assert ack["changed"] == {"lr": [0.05, 0.01], "batch_size": [16, 32]} and ack["overrides_schedule"] is True


def test_ramp_reaches_the_new_lr_linearly_in_lr_time(tmp_path):
    rd = _run(tmp_path, "steps=8", "lr=0.01", "lr_ref=0.01")
    req = json.dumps({"set": {"lr": 0.03}, "ramp": 4})
    assert train(rd, hooks=[_write_at(1, req + "\n")]) == "done"
    lrs = [r["lr"] for r in _steps(rd)]
    # ramp starts at lr_time 2: lr(t) = 0.01 + 0.02 * (t - 2) / 4 while t < 6
    assert lrs[:2] == [0.01, 0.01]
    t, expect = 2.0, []
    for _ in range(6):
        lr = 0.03 if t >= 6 else 0.01 + 0.02 * (t - 2) / 4
        expect.append(lr)
        t += lr / 0.01
    assert lrs[2:] == pytest.approx(expect)
    assert _acks(rd)[0]["id"] == "line-1"


def test_manual_lr_overrides_planned_lr_changes_but_not_batch_changes(tmp_path):
    from engine.config import Change
    cfg = tiny(TINY_IMAGES, "eval_every=0", "steps=6", "lr=0.05")
    cfg.changes = [Change(at_step=4, lr=0.5, batch_size=32)]
    rd2 = RunDir.create(tmp_path, cfg, run_id="planned")
    assert train(rd2, hooks=[_write_at(1, '{"set": {"lr": 0.02}}\n')]) == "done"
    recs = _steps(rd2)
    assert [r["lr"] for r in recs] == [0.05, 0.05, 0.02, 0.02, 0.02, 0.02]
    assert [r["batch_size"] for r in recs] == [16, 16, 16, 16, 32, 32]
    planned = next(e for e in rd2.events()[0] if e["event"] == "schedule")
    assert planned["changed"] == {"batch_size": [16, 32], "skipped": "lr (a manual lr overrides the schedule)"}


def test_checkpoint_and_stop_actions(tmp_path):
    rd = _run(tmp_path, "steps=20")
    lines = json.dumps({"id": "c", "action": "checkpoint"}) + "\n"
    stop = json.dumps({"id": "s", "action": "stop"}) + "\n"
    assert train(rd, hooks=[_write_at(2, lines), _write_at(5, stop)]) == "stopped"
    assert [s for s, _ in rd.list_checkpoints()] == [3, 6]
    assert rd.status()["state"] == "stopped" and _steps(rd)[-1]["step"] == 6
    assert [(a["id"], a["step"]) for a in _acks(rd)] == [("c", 3), ("s", 6)]


BAD_LINES = [
    ("{not json}\n", "invalid JSON: Expecting property name enclosed in double quotes at column 2"),
    ('{"set": {"lr": 0.1}, "colour": 1}\n', "unknown key 'colour' (known: id, set, ramp, action, time, by, queued_ok, twin, until, attempt, at_step, at_lr_time, when)"),
    ('{"set": {"momentum": 0.5}}\n', "unknown key 'set.momentum' (known: lr, batch_size)"),
    ('{"set": {"lr": "0.1"}}\n', "'lr' must be a number, got \"0.1\""),
    ('{"set": {"lr": 0}}\n', "'lr' must be finite and > 0, got 0"),
    ('{"set": {"lr": -0.1}}\n', "'lr' must be finite and > 0, got -0.1"),
    ('{"set": {"lr": NaN}}\n', "'lr' must be finite and > 0, got nan"),
    ('{"set": {"lr": 1e9}}\n', "'lr' = 1000000000.0 exceeds the sanity bound 5 (control.max_lr_factor × lr)"),
    ('{"set": {"batch_size": 0}}\n', "'batch_size' must be > 0, got 0"),
    ('{"set": {"batch_size": 16.5}}\n', "'batch_size' must be an integer, got 16.5"),
    ('{"set": {"batch_size": true}}\n', "'batch_size' must be an integer, got true"),
    ('{"set": {"batch_size": 12}}\n', "'batch_size' = 12 is not a multiple of micro_batch_size = 8"),
    ('{"set": {"batch_size": 100000}}\n', "'batch_size' = 100000 exceeds the sanity bound 65536 (control.max_batch_size)"),
    ('{"action": "explode"}\n', "unknown action \"explode\" (known: checkpoint, stop)"),
    ('{"set": {"batch_size": 32}, "ramp": 5}\n', "'ramp' needs 'set.lr'"),
    ('{"set": {}}\n', "'set' must be a non-empty object, e.g. {\"lr\": 0.005}"),
    ('[1, 2]\n', "a request must be a JSON object, got list"),
]


def test_each_bad_line_is_rejected_and_changes_nothing(tmp_path):
    clean = _run(tmp_path, "steps=6", "micro_batch_size=8", run_id="clean")
    assert train(clean) == "done"
    dirty = _run(tmp_path, "steps=6", "micro_batch_size=8", run_id="dirty")
    assert train(dirty, hooks=[_write_at(2, *(line for line, _ in BAD_LINES))]) == "done"
    strip = lambda rd: [{k: v for k, v in r.items() if k != "wall"} for r in rd.metrics()[0]]
    assert strip(dirty) == strip(clean)
    acks = _acks(dirty)
    assert [a["status"] for a in acks] == ["rejected"] * len(BAD_LINES)
    assert [a["reason"] for a in acks] == [reason for _, reason in BAD_LINES]
    assert [a["line"] for a in acks] == list(range(1, len(BAD_LINES) + 1))
    assert all(a["step"] == 3 for a in acks)


def test_a_line_without_its_newline_waits_for_it(tmp_path):
    rd = _run(tmp_path, "steps=8")
    half = '{"id": "h", "set": {"lr": 0.'
    assert train(rd, hooks=[_write_at(2, half), _write_at(5, '01}}\n')]) == "done"
    (ack,) = _acks(rd)
    assert (ack["id"], ack["status"], ack["step"]) == ("h", "applied", 6)


def test_rewritten_control_file_is_reported_and_not_reapplied(tmp_path):
    rd = _run(tmp_path, "steps=8")
    first = json.dumps({"id": "a", "set": {"lr": 0.02}}) + "\n"

    def editor_saves(t):  # at step 4: an editor writes the file anew (new inode), old line + a new one
        if t.step == 4:
            new = rd.control_file.with_suffix(".swp")
            new.write_text(first + json.dumps({"id": "b", "set": {"lr": 0.03}}) + "\n")
            os.chmod(new, 0o600)
            os.replace(new, rd.control_file)
        if t.step == 6:
            with open(rd.control_file, "a") as f:
                f.write(json.dumps({"id": "c", "set": {"lr": 0.04}}) + "\n")
    assert train(rd, hooks=[_write_at(1, first), editor_saves]) == "done"
    assert [(a["id"], a["step"]) for a in _acks(rd)] == [("a", 2), ("c", 7)]
    (rw,) = [e for e in rd.events()[0] if e["event"] == "control_rewritten"]
    assert (rw["step"] if "step" in rw else None, rw["skipped_lines"]) == (None, 2)
    assert [r["lr"] for r in _steps(rd)] == [0.05, 0.05, 0.02, 0.02, 0.02, 0.02, 0.02, 0.04]


def test_truncated_control_file_is_reported(tmp_path):
    rd = _run(tmp_path, "steps=6")

    def truncate(t):
        if t.step == 3:
            os.truncate(rd.control_file, 0)
    assert train(rd, hooks=[_write_at(1, '{"set": {"lr": 0.02}}\n'), truncate]) == "done"
    (rw,) = [e for e in rd.events()[0] if e["event"] == "control_rewritten"]
    assert rw["skipped_lines"] == 0 and rw["new_size"] == 0
    assert len(_acks(rd)) == 1


def test_control_file_writable_by_others_is_not_trusted(tmp_path):
    rd = _run(tmp_path, "steps=6")
    assert (rd.path.stat().st_mode & 0o777, rd.control_file.stat().st_mode & 0o777) == (0o700, 0o600)

    def open_up(t):
        if t.step == 2:
            os.chmod(rd.control_file, 0o666)
    assert train(rd, hooks=[open_up, _write_at(2, '{"set": {"lr": 0.02}}\n')]) == "done"
    (ack,) = _acks(rd)
    assert ack["status"] == "rejected" and ack["reason"] == "untrusted: control file is writable by others (mode 0o666)"
    assert {r["lr"] for r in _steps(rd)} == {0.05}


def _writer(path, tag, n):
    rd = RunDir(path)
    for i in range(n):
        append_request(rd, {"id": f"{tag}-{i}", "set": {"lr": 0.001 * (i + 1)}, "by": tag * 200})


def test_two_concurrent_writers_lose_or_mangle_nothing(tmp_path):
    rd = _run(tmp_path)
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(rd.path, tag, 500)) for tag in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    lines = rd.control_file.read_text().splitlines()
    reqs = [json.loads(line) for line in lines]
    assert len(reqs) == 1000
    for tag in ("a", "b"):
        assert [r["id"] for r in reqs if r["id"].startswith(tag)] == [f"{tag}-{i}" for i in range(500)]


def test_request_survives_stop_and_resume_exactly_once(tmp_path):
    rd = _run(tmp_path, "steps=10", "checkpoint_every=4")
    append_request(rd, {"id": "early", "set": {"lr": 0.02}})
    assert train(rd, hooks=[_write_at(4, json.dumps({"id": "halt", "action": "stop"}) + "\n")]) == "stopped"
    append_request(rd, {"id": "late", "set": {"batch_size": 32}})
    assert train(rd, resume=True) == "done"
    acks = [(a["id"], a["step"]) for a in _acks(rd)]
    assert acks == [("early", 0), ("halt", 5), ("late", 5)]
    recs = _steps(rd)
    assert [r["step"] for r in recs] == list(range(1, 11))
    assert [r["batch_size"] for r in recs] == [16] * 5 + [32] * 5 and {r["lr"] for r in recs} == {0.02}


def test_writing_to_a_finished_run_is_refused(tmp_path):
    rd = _run(tmp_path, "steps=2")
    assert train(rd) == "done"
    with pytest.raises(ControlError, match=f"run {rd.id} is done: it takes no more requests"):
        append_request(rd, {"set": {"lr": 0.1}})


def test_fork_without_overrides_continues_bit_for_bit(tmp_path):
    parent = _run(tmp_path, "steps=10", "checkpoint_every=4", "data.augment=[\"crop\", \"flip\"]")
    assert train(parent) == "done"
    child = fork(tmp_path, parent, step=4)
    assert train(child) == "done"
    strip = lambda recs: [{k: v for k, v in r.items() if k != "wall"} for r in recs]
    assert strip(_steps(child)) == strip([r for r in _steps(parent) if r["step"] > 4])
    ev = next(e for e in child.events()[0] if e["event"] == "fork")
    assert (ev["parent"], ev["step"], ev["lr_time"], ev["samples"]) == (parent.id, 4, 4.0, 64)
    assert any(e["event"] == "forked" and e["child"] == child.id for e in parent.events()[0])
    cfg = child.config()
    assert cfg.parent == parent.id and cfg.parent_checkpoint.endswith("step_0000004.safetensors")


def test_fork_with_a_new_batch_size_diverges_from_its_first_step(tmp_path):
    parent = _run(tmp_path, "steps=8", "checkpoint_every=4")
    assert train(parent) == "done"
    child = fork(tmp_path, parent, step=4, overrides=["batch_size=64"], name="bs64")
    assert train(child) == "done"
    c, p = _steps(child), [r for r in _steps(parent) if r["step"] > 4]
    assert [r["step"] for r in c] == [5, 6, 7, 8]
    assert [r["batch_size"] for r in c] == [64] * 4 and [r["samples"] for r in c] == [128, 192, 256, 320]
    assert c[0]["loss"] != p[0]["loss"]
    ev = next(e for e in child.events()[0] if e["event"] == "fork")
    assert ev["changed"] == {"batch_size": [16, 64]} and ev["overrides"] == ["batch_size=64"]


def test_fork_at_a_missing_step_is_one_line(tmp_path):
    from engine.config import ConfigError
    parent = _run(tmp_path, "steps=4", "checkpoint_every=2")
    assert train(parent) == "done"
    with pytest.raises(ConfigError) as e:
        fork(tmp_path, parent, step=3)
    assert str(e.value) == f"run {parent.id} has no checkpoint at step 3 (checkpoints: 2, 4)"


HOSTILE = [   # (raw bytes, the reason the run answers with); issue 11: each of these used to end the run
    (b'{"set": {"lr": 0.01}}\xff\xfe\n', "not UTF-8 text (byte 0xff at column 22)"),
    (b'{"set": {"lr": ' + b"9" * 400 + b'}}\n', "'lr' must be finite and > 0, got " + "9" * 60 + "… (400 characters)"),
    (b'{"set": {"lr": 0.01}, "ramp": ' + b"7" * 400 + b'}\n', "'ramp' must be a number >= 0, got " + "7" * 60 + "… (400 characters)"),
    (b'{"set": {"lr": ' + b"9" * 5000 + b'}}\n', "invalid JSON: Exceeds the limit (4300 digits) for integer string conversion"),
    (b"[" * 60_000 + b"\n", "invalid JSON: nested too deeply"),
    (b"[" * 100_000 + b"\n", "line is 100000 bytes, over the 65536-byte limit"),
    (b'{"set": {"lr": "' + b"x" * 10_000_000 + b'"}}\n', "line is 10000019 bytes, over the 65536-byte limit"),
    (b'{"id": "' + b"i" * 1000 + b'", "set": {"lr": "' + b"y" * 1000 + b'"}}\n',
     "'lr' must be a number, got \"" + "y" * 59 + "… (1002 characters)"),
    (b'{"set": {"batch_size": 8}}\n', "'batch_size' = 8 is not a multiple of micro_batch_size = 16"),
    (b'{"set": {"batch_size": ' + b"1" * 400 + b'}}\n', "'batch_size' = " + "1" * 60 + "… (400 characters) exceeds the sanity bound 65536 (control.max_batch_size)"),
]


def test_no_line_can_end_a_run_or_its_resume(tmp_path):
    """Each hostile input is rejected with a short event; the records equal a run without them; the
    checkpoint metadata stays small; resume is clean and reads none of it again."""
    clean = _run(tmp_path, "steps=8", "micro_batch_size=16", "checkpoint_every=4", run_id="clean")
    assert train(clean) == "done"

    def write(t):
        if t.step == 2:
            with open(t.rd.control_file, "ab") as f:
                for raw, _ in HOSTILE:
                    f.write(raw)
        if t.step == 5:   # a 40 MB line still being written when a checkpoint is taken
            with open(t.rd.control_file, "ab") as f:
                f.write(b'{"set": {"lr": "' + b"z" * 40_000_000)
    dirty = _run(tmp_path, "steps=8", "micro_batch_size=16", "checkpoint_every=4", run_id="dirty")
    assert train(dirty, hooks=[write]) == "done"
    strip = lambda rd: [{k: v for k, v in r.items() if k != "wall"} for r in rd.metrics()[0]]
    assert strip(dirty) == strip(clean)
    acks = _acks(dirty)
    assert [a["reason"] for a in acks] == [reason for _, reason in HOSTILE]
    assert all(a["status"] == "rejected" and a["step"] == 3 for a in acks)
    assert [a["id"] for a in acks][7] == "line-8"         # a 1000-character id is not copied
    assert os.path.getsize(dirty.events_file) < 20_000
    assert os.path.getsize(dirty.path / "log.txt") < 20_000
    assert max(os.path.getsize(p) for _, p in dirty.list_checkpoints()) < 2 * max(
        os.path.getsize(p) for _, p in clean.list_checkpoints())
    # the 40 MB line ends now: the resumed run answers it once, by its size, and trains on as before
    with open(dirty.control_file, "ab") as f:
        f.write(b'"}}\n{"id": "after", "set": {"lr": 0.02}}\n')
    dirty.write_status(state="stopped")
    cfg = dirty.config()
    cfg.steps = 12
    (dirty.path / "config.toml").write_text(__import__("engine.config", fromlist=["x"]).dump_toml(
        __import__("engine.config", fromlist=["x"]).to_dict(cfg)))
    assert train(dirty, resume=True) == "done"
    late = _acks(dirty)[len(HOSTILE):]
    assert [(a["id"], a["status"]) for a in late] == [("line-11", "rejected"), ("after", "applied")]
    assert late[0]["reason"] == "line is 40000019 bytes, over the 65536-byte limit"
    assert [r["lr"] for r in _steps(dirty)][-1] == 0.02


def test_stop_on_a_checkpoint_step_then_resume_continues(tmp_path):
    """Issue 11: the stop landed where a periodic checkpoint had just been saved (before the stop was
    consumed); the end skipped its own checkpoint, so `resume` read the stop again and stopped at once."""
    whole = _run(tmp_path, "steps=12", "checkpoint_every=4", run_id="whole")
    assert train(whole) == "done"
    rd = _run(tmp_path, "steps=12", "checkpoint_every=4", run_id="stopped")
    assert train(rd, hooks=[_write_at(3, '{"id": "s", "action": "stop"}\n')]) == "stopped"
    assert _steps(rd)[-1]["step"] == 4 and [s for s, _ in rd.list_checkpoints()] == [4]
    assert train(rd, resume=True) == "done"
    assert _steps(rd)[-1]["step"] == 12
    assert [(a["id"], a["step"]) for a in _acks(rd)] == [("s", 4)]        # the stop was applied once
    strip = lambda r: [{k: v for k, v in x.items() if k != "wall"} for x in r.metrics()[0]]
    assert strip(rd) == strip(whole)


def _other_user():
    """A second local user for the trust tests (created when running as root, e.g. in CI)."""
    import pwd
    import shutil
    import subprocess
    if os.getuid() != 0 or not shutil.which("useradd") or not shutil.which("su"):
        pytest.skip("needs root with useradd and su, to create a second local user")
    try:
        pwd.getpwnam("gpctl-other")
    except KeyError:
        subprocess.run(["useradd", "--no-create-home", "--shell", "/bin/sh", "gpctl-other"], check=True)
    return "gpctl-other"


def test_a_line_written_while_others_could_is_never_applied(tmp_path):
    """Issue 11: another user appends while the file is open to them; the mode is restored before the
    run reads it (here: while the run is stopped). The run refuses the line, and refuses to start while
    its directory is writable by others."""
    import shutil
    import tempfile
    from pathlib import Path
    other = _other_user()
    root = Path(tempfile.mkdtemp(prefix="gpctl-trust-", dir="/tmp"))   # a path the other user can reach
    root.chmod(0o755)
    try:
        _untrusted_line_is_refused(root, other)
    finally:
        shutil.rmtree(root)


def _untrusted_line_is_refused(root, other):
    import subprocess
    rd = _run(root, "steps=6")
    assert (rd.path.stat().st_mode & 0o777, rd.control_file.stat().st_mode & 0o777) == (0o700, 0o600)
    (root / "runs").chmod(0o755)
    rd.path.chmod(0o777)
    rd.control_file.chmod(0o666)
    line = '{"id": "evil", "set": {"lr": 0.5}}'
    subprocess.run(["su", other, "-c", f"echo '{line}' >> {rd.control_file}"], check=True)
    assert train(rd) == "failed"                                          # refuses to start meanwhile
    assert "refusing to train:" in rd.status()["error"] and "writable by others (mode 0o777)" in rd.status()["error"]
    assert _steps(rd) == []
    rd.path.chmod(0o700)
    rd.control_file.chmod(0o600)                                          # the mode restored: looks clean
    rd.write_status(state="created")
    assert train(rd) == "done"
    (ack,) = _acks(rd)
    assert (ack["id"], ack["status"]) == ("line-1", "rejected")   # an untrusted line is not even parsed
    assert ack["reason"].startswith("untrusted: control file's mode or owner changed after its last write")
    assert {r["lr"] for r in _steps(rd)} == {0.05}


def test_gpctl_creates_everything_owner_only(tmp_path):
    import stat
    import subprocess
    import sys
    home = tmp_path / "newhome"
    preset = tmp_path / "p.toml"
    preset.write_text('[base]\nsteps = 4\ndevice = "cpu"\nmodel.name = "cnn"\nmodel.width = 2\n'
                      'data.source = "synthetic_images"\ndata.image_size = 8\ndata.eval_samples = 16\n'
                      'data.teacher_width = 4\n[runs.a]\n')
    res = subprocess.run([sys.executable, "-m", "gpctl", "--home", str(home), "run", "preset", str(preset), "--wait"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "GPCTL_WORKER_IDLE_EXIT": "1"})
    assert res.returncode == 0, res.stdout + res.stderr
    time.sleep(2)   # the worker's own files
    loose = [str(p) for p in [home, *home.rglob("*")]
             if stat.S_IMODE(p.stat().st_mode) & 0o077]
    assert loose == []
    assert stat.S_IMODE(home.stat().st_mode) == 0o700 and (home / "worker.log").exists()


def test_stop_and_resume_records_equal_an_uninterrupted_run_eval_included(tmp_path):
    """Issue 12: a stop between checkpoints used to add an eval record at the stop step."""
    args = ("steps=12", "checkpoint_every=4", "eval_every=3")
    whole = _run(tmp_path, *args, run_id="whole")
    assert train(whole) == "done"
    rd = _run(tmp_path, *args, run_id="stopped")
    assert train(rd, hooks=[_write_at(4, '{"action": "stop"}\n')]) == "stopped"   # stops at step 5
    assert _steps(rd)[-1]["step"] == 5
    assert train(rd, resume=True) == "done"
    strip = lambda r: [{k: v for k, v in x.items() if k != "wall"} for x in r.metrics()[0]]
    assert strip(rd) == strip(whole)
    assert [x["step"] for x in rd.metrics()[0] if "eval_loss" in x] == [3, 4, 6, 8, 9, 12]
