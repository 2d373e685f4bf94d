"""Issue 31: no input breaks anything. Hostile content in the control file, in requests, in run files,
in parsers and in arguments: each is one line (an event, or an error and a non-zero exit), the run
goes on training where one was, and nothing is written outside the home."""
import json
import os
import struct
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from engine.config import ConfigError
from engine.control import MAX_LINE, MAX_READ, MAX_WAITING, ControlReader
from engine.store.rundir import RunDir
from engine.train.loop import train
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


def _invoke(home, *args):
    return runner.invoke(app, ["--home", str(home), *args])


def _one_line_refusal(res, message):
    assert res.exit_code == 2 and res.exception is None or isinstance(res.exception, SystemExit), res.output
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    home = tmp_path_factory.mktemp("args") / "home"
    rd = RunDir.create(home, tiny(TINY_IMAGES, "steps=4", "checkpoint_every=2", name="a"))
    assert train(rd) == "done"
    return home, rd


@pytest.mark.parametrize("args, message", [
    (["tv", "{id}", "{id}", "--at-steps", "a,b"], "--at-steps 'a,b': expected whole steps separated by commas"),
    (["tv", "{id}", "{id}", "--at-steps", "2,-4"], "--at-steps '2,-4': expected whole steps"),
    (["tv", "{id}", "{id}", "--eval-samples", "-5"], "--eval-samples must be in [0, 1000000000], got -5"),
    (["tv", "{id}", "{id}", "--device", "tpu"], "--device 'tpu' is not one of auto, cpu, cuda, cuda:N"),
    (["tv", "{id}", "{id}", "--plot", "x.foo"], "--plot 'x.foo': a figure is written as .png, .svg, .pdf"),
    (["plot", "{id}", "--out", "x.foo"], "--out 'x.foo': a figure is written as .png, .svg, .pdf (got '.foo')"),
    (["plot", "{id}", "--out", "noext"], "(got 'no suffix')"),
    (["figure", "demo", "--x", "foo"], "--x must be one of"),
    (["run", "preset", "demo", "--no-worker", "--priority", "1" + "0" * 30], "--priority must be in [-1000000000, 1000000000]"),
    (["worker", "--cpu-slots", "0"], "--cpu-slots must be in [1, 1024], got 0"),
    (["worker", "--cpu-slots", "-1"], "--cpu-slots must be in [1, 1024], got -1"),
    (["worker", "--gpus", "abc"], "--gpus 'abc': expected GPU indices separated by commas"),
    (["worker", "--gpus", "0,0"], "--gpus '0,0': expected GPU indices separated by commas, each once"),
    (["fork", "{id}", "--no-start", "--lr-time", "nan"], "--lr-time must be a finite number in [0, inf], got nan"),
    (["fork", "{id}", "--no-start", "--step", "-3"], "--step must be in [0, 1000000000000], got -3"),
    (["run", "preset", "demo", "--no-worker", "--set", "parent_checkpoint=/etc/passwd"],
     "--set parent_checkpoint: 'parent_checkpoint' is written by gpctl, not set"),
    (["run", "preset", "demo", "--no-worker", "--set", "preset="], "--set preset: 'preset' is written by gpctl"),
    (["run", "preset", "demo", "--no-worker", "--set", "name=x"], "--set name: 'name' is written by gpctl"),
    (["run", "preset", "demo", "--no-worker", "--set", "steps=" + "[" * 40 + "]" * 40],
     "--set steps: nested deeper than 16 levels"),
    (["run", "preset", "demo", "--no-worker", "--set", "seed=" + "9" * 5000], "an integer of more than 4300 digits"),
    (["run", "preset", "demo", "--no-worker", "--set", "notify=\udcff"], "'notify': not valid text"),
    (["run", "preset", "demo", "--no-worker", "--backend", "slurm", "--partition", "gpu\n#SBATCH --x"],
     "slurm --partition 'gpu\\n#SBATCH --x': only letters, digits and _ . , - may go in an #SBATCH line"),
    (["run", "preset", "demo", "--no-worker", "--backend", "slurm", "--time", "1:00\nrm -rf ~"],
     "slurm --time '1:00\\nrm -rf ~': only letters, digits and : - may go in an #SBATCH line"),
    (["tui", "--poll", "-1"], "--poll must be seconds in [0.05, 3600], got -1.0"),
])
def test_arguments_are_checked_before_any_work(trained, args, message):
    home, rd = trained
    before = sorted(p.name for p in (home / "runs").iterdir())
    res = _invoke(home, *[a.replace("{id}", rd.id) for a in args])
    _one_line_refusal(res, message)
    assert sorted(p.name for p in (home / "runs").iterdir()) == before     # nothing created


def test_an_empty_home_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for args in (["--home", "", "ls"], ["--home", " ", "run", "preset", "demo", "--no-worker"], ["tui", "--home", ""]):
        res = runner.invoke(app, args)
        assert res.exit_code == 2 and res.stderr.startswith("error: --home is empty"), (args, res.output)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("body, message", [
    ("base = 5\n[runs.a]\nlr = 0.1\n", "'base' must be a table ([base]), got int"),
    ("sweep = 5\n[runs.a]\nlr = 0.1\n", "'sweep' must be a table ([sweep]), got int"),
    ("preset = 5\n[runs.a]\n", "'preset' must be a table"),
    ('[runs.""]\nlr = 0.1\n', "arm name '' is not a plain name"),
    ("[runs]\nx = 5\n", "'runs.x' must be a table ([runs.x]), got int"),
    ("[runs.a]\nx = " + "[" * 30 + "]" * 30 + "\n", "nested deeper than 16 levels"),
    ("[runs.a]\nseed = " + "7" * 5000 + "\n", "invalid TOML: an integer of more than 4300 digits"),
])
def test_hostile_preset_files_are_one_line(tmp_path, body, message):
    p = tmp_path / "p.toml"
    p.write_text(body)
    for args in (["run", "preset", str(p), "--no-worker"], ["presets", "check", str(p)]):
        res = _invoke(tmp_path / "home", *args)
        _one_line_refusal(res, message)
    assert not (tmp_path / "home" / "runs").exists() or not any((tmp_path / "home" / "runs").iterdir())


def test_strings_round_trip_through_toml_whatever_their_characters(tmp_path):
    """A notify command with an emoji (beyond U+FFFF), a tab, a DEL and quotes: written into the
    run's config.toml, read back the same (JSON's surrogate-pair escapes are not TOML)."""
    from engine.config import dump_toml, loads_toml
    text = 'echo "😀\t\x7f\\ done" \'ok\''
    assert loads_toml(dump_toml({"notify": text}), "x")["notify"] == text
    res = _invoke(tmp_path / "home", "run", "preset", "demo", "--no-worker", "--arm", "bs512", "--notify", text)
    assert res.exit_code == 0, res.output
    (rd,) = [RunDir(p) for p in (tmp_path / "home" / "runs").iterdir()]
    assert rd.config().notify == text


def test_slurm_scripts_quote_the_home_and_refuse_newlines(tmp_path):
    from engine.config import ConfigError
    from engine.launch.slurm import SlurmOptions, script
    home = tmp_path / "my home"
    rd = RunDir.create(home, tiny(TINY_IMAGES, "steps=2"))
    text = script(rd, SlurmOptions(partition="gpu", gres="gpu:1", time="04:00:00"), resume=False)
    assert f'#SBATCH --chdir="{rd.path}"' in text.splitlines()
    assert [ln for ln in text.splitlines() if ln.startswith("#SBATCH")] == [
        f"#SBATCH --job-name=gpctl-{rd.id}", "#SBATCH --output=/dev/null", f'#SBATCH --chdir="{rd.path}"',
        "#SBATCH --partition=gpu", "#SBATCH --gres=gpu:1", "#SBATCH --time=04:00:00",
        "#SBATCH --signal=B:USR1@120", "#SBATCH --requeue"]
    bad = RunDir(tmp_path / "a\nb" / "runs" / "x")
    with pytest.raises(ConfigError, match="a home path with a newline"):
        script(bad, SlurmOptions(), resume=False)
    with pytest.raises(ConfigError, match="a control character"):
        SlurmOptions(extra=("--mem=4G\nrm -rf ~",))


def _hostile_checkpoint(src, dst, tensors=None, meta=None, raw_meta=None):
    """A copy of checkpoint `src` (weights and resume state) with changed tensors or metadata."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    with safe_open(str(src), framework="pt") as f:
        md = dict(f.metadata())
    weights = load_file(str(src))
    if tensors:
        weights = tensors(weights)
    if meta:
        mc = json.loads(md["model_config"])
        md["model_config"] = json.dumps(meta(mc))
    if raw_meta:
        md.update(raw_meta)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(dst), metadata=md)
    shutil.copy(src.with_name(src.name.replace(".safetensors", ".state.safetensors")),
                dst.with_name(dst.name.replace(".safetensors", ".state.safetensors")))
    return dst


def _off_by_one(w):
    name = next(k for k, v in w.items() if v.dim() == 2)
    v = w[name]
    return {**w, name: v[:-1].clone()}


@pytest.mark.parametrize("kind, change, message", [
    ("off_by_one", dict(tensors=_off_by_one), "does not fit its model_config (tensor "),
    ("extra_tensor", dict(tensors=lambda w: {**w, "evil": next(iter(w.values())).clone()}),
     "does not fit its model_config (has tensor 'evil' the model does not)"),
    ("unknown_key", dict(meta=lambda mc: {**mc, "evil": 1}), "unknown key 'model_config.evil'"),
    ("missing_keys", dict(meta=lambda mc: {"name": mc["name"]}), "does not fit its model_config"),
    ("negative_width", dict(meta=lambda mc: {**mc, "width": -8}), "model_config.width must be in [1, 65536], got -8"),
    ("huge_width", dict(meta=lambda mc: {**mc, "width": 65536, "n_embd": 10 ** 6}), "does not fit its model_config"),
    ("wrong_type", dict(meta=lambda mc: {**mc, "width": "8"}), "'model_config.width' must be an integer"),
    ("nested", dict(raw_meta={"step": "[" * 200_000 + "]" * 200_000}), "damaged gpctl metadata (nested too deeply)"),
    ("not_json", dict(raw_meta={"model_config": "{"}), "damaged gpctl metadata"),
])
def test_hostile_checkpoint_metadata_is_one_line_before_any_model_is_built(trained, tmp_path, kind, change, message):
    home, rd = trained
    (step, src), = [c for c in rd.list_checkpoints() if c[0] == 4]
    bad = _hostile_checkpoint(src, tmp_path / kind / "step_0000004.safetensors", **change)
    res = _invoke(home, "tv", str(src), str(bad), "--eval-from", rd.id)
    _one_line_refusal(res, message)
    res = _invoke(home, "tv", str(src), str(src), "--eval-from", rd.id, "--json")   # the healthy pair works
    assert res.exit_code == 0 and json.loads(res.stdout)[0]["tv"] == 0.0, res.output


def test_a_gpt2_checkpoint_is_checked_on_the_meta_device_too(tmp_path):
    import torch

    from engine.errors import CheckpointError
    from engine.analysis.tv import load_model
    from tests.conftest import TINY_LM
    rd = RunDir.create(tmp_path / "home", tiny(TINY_LM, "steps=2"))
    assert train(rd) == "done"
    (_, src), = rd.list_checkpoints()[-1:]
    model, meta = load_model(src, torch.device("cpu"))
    assert meta["model"] == "gpt2" and sum(p.numel() for p in model.parameters()) > 0
    bad = _hostile_checkpoint(src, tmp_path / "bad" / src.name, tensors=_off_by_one)
    with pytest.raises(CheckpointError, match=r"does not fit its model_config \(tensor '.*' is \[\d+, \d+\] where"):
        load_model(bad, torch.device("cpu"))


def test_a_control_file_once_untrusted_stays_untrusted_until_replaced(tmp_path):
    """Issue 31, the trust rule raced: a descriptor opened while the file was writable by others can
    write after the owner restored 0600. A file the run once saw untrusted (its inode) is refused for
    good; a new file (a new inode) is trusted again."""
    rd = _run(tmp_path / "home", "steps=10")

    def hook(t):
        if t.step == 2:
            os.chmod(rd.control_file, 0o666)              # seen by the poll at the next boundary
        if t.step == 3:
            os.chmod(rd.control_file, 0o600)              # restored: the mode looks clean again
        if t.step == 4:                                   # written through a descriptor opened earlier
            with open(rd.control_file, "a") as f:
                f.write(json.dumps({"id": "late", "set": {"lr": 0.5}}) + "\n")
        if t.step == 6:                                   # the owner replaces the file, as the reason says
            os.rename(rd.control_file, rd.path / "control.old")
            os.close(os.open(rd.control_file, os.O_WRONLY | os.O_CREAT, 0o600))
        if t.step == 7:
            with open(rd.control_file, "a") as f:
                f.write(json.dumps({"id": "fresh", "set": {"lr": 0.02}}) + "\n")
    assert train(rd, hooks=[hook]) == "done"
    acks = [(a["id"], a["status"], a["step"]) for a in _acks(rd)]
    assert acks == [("line-1", "rejected", 5), ("fresh", "applied", 8)]
    reason = _acks(rd)[0]["reason"]
    assert reason.startswith("untrusted: this control file was untrusted earlier (control file is writable by "
                             "others (mode 0o666)): a descriptor opened then may still write to it"), reason
    assert {r["lr"] for r in rd.metrics()[0] if "loss" in r} == {0.05, 0.02}


def test_a_home_writable_by_others_is_refused(tmp_path):
    home = tmp_path / "home"
    rd = _run(home, "steps=2")
    home.chmod(0o777)
    assert train(rd) == "failed"
    assert rd.status()["error"] == (f"RuntimeError: refusing to train: {home} is writable by others (mode 0o777): "
                                    f"another user could replace the run's folder; chmod go-w {home}")
    home.chmod(0o1777)                 # sticky: only a folder's owner may rename it
    rd.write_status(state="created")
    assert train(rd) == "done"


def test_a_run_folder_swapped_under_the_job_gets_nothing_written(tmp_path, capsys):
    """Someone who can write the home renames runs/ away and puts their own folder (with a link
    out of the home) where the run's was: the job stops at its next flush, writing nothing there."""
    home = tmp_path / "home"
    rd = _run(home, "steps=40", "log_every=1")
    outside = tmp_path / "outside.txt"
    outside.write_text("theirs\n")

    def swap(t):
        if t.step == 3:
            os.rename(home / "runs", home / "runs-moved")
            fake = rd.path
            fake.mkdir(parents=True)
            for name in ("metrics.jsonl", "events.jsonl", "status.json", "log.txt"):
                os.symlink(outside, fake / name)
    assert train(rd, hooks=[swap]) == "failed"
    assert outside.read_text() == "theirs\n"
    assert sorted(p.name for p in rd.path.iterdir()) == ["events.jsonl", "log.txt", "metrics.jsonl", "status.json"]
    assert f"error: {rd.path} is no longer the folder this job started in" in capsys.readouterr().err
    moved = RunDir(home / "runs-moved" / rd.id)
    assert [r["step"] for r in moved.metrics()[0]][-1] <= 4          # what it wrote before, in its own folder


def test_another_users_descriptor_opened_while_writable_is_refused_after_restore():
    """The race with a real second user: they open control.jsonl while it is writable by others,
    the owner restores 0600 (and an owner-only folder), then they write through the descriptor they
    kept. Their line is refused; the run trains on unsteered."""
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    from tests.test_control import _other_user
    other = _other_user()
    root = Path(tempfile.mkdtemp(prefix="gpctl-race-", dir="/tmp"))
    root.chmod(0o755)
    proc = None
    try:
        rd = _run(root, "steps=8")
        (root / "runs").chmod(0o755)
        line = json.dumps({"id": "evil", "set": {"lr": 0.5}})

        def hook(t):
            nonlocal proc
            if t.step == 2:
                rd.path.chmod(0o711)                        # others may pass through, not write it
                rd.control_file.chmod(0o666)
                proc = subprocess.Popen(["su", other, "-c", f"exec 3>>{rd.control_file}; echo opened; read go; "
                                         f"echo '{line}' >&3"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                assert proc.stdout.readline().strip() == "opened"
            if t.step == 3:
                rd.control_file.chmod(0o600)
                rd.path.chmod(0o700)
            if t.step == 4:
                proc.communicate("go\n", timeout=30)
                assert proc.returncode == 0
        assert train(rd, hooks=[hook]) == "done"
        (ack,) = _acks(rd)
        assert (ack["status"], ack["step"]) == ("rejected", 5)
        assert ack["reason"].startswith("untrusted: this control file was untrusted earlier (control file is "
                                        "writable by others (mode 0o666))")
        assert {r["lr"] for r in rd.metrics()[0] if "loss" in r} == {0.05}
    finally:
        if proc and proc.poll() is None:
            proc.kill()
        shutil.rmtree(root)


@pytest.mark.parametrize("body, message", [
    ("stall_minutes = " + "9" * 4000 + "\n", "'stall_minutes' must be a number in [0, 1000000]"),
    ("stall_minutes = nan\n", "'stall_minutes' must be a number in [0, 1000000]"),
    ("notify = " + "[" * 50 + "]" * 50 + "\n", "nested deeper than 16 levels"),
    ("stall_minutes = " + "9" * 5000 + "\n", "an integer of more than 4300 digits"),
])
def test_a_hostile_settings_file_is_one_warning_and_the_worker_serves_on(tmp_path, body, message, capsys):
    from engine.config import ConfigError
    from engine.control.notify import settings
    from engine.launch.worker import Worker
    home = tmp_path / "home"
    home.mkdir()
    (home / "settings.toml").write_text(body)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        settings(home)
    w = Worker(home, gpus=[], cpu_slots=1, idle_exit=0.0)
    w.check_stalls()                                    # what the worker's loop calls: one warning line
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: ") and message in err[0], err


def test_the_tuis_set_dialog_takes_a_nesting_bomb_as_one_toast(tmp_path):
    import asyncio

    from gpctl.tui.app import GpctlApp
    from textual.widgets import Input
    home = tmp_path / "home"
    rd = _run(home, "steps=2")
    rd.write_status(state="running", pid=os.getpid(), host=__import__("socket").gethostname())

    async def go():
        app = GpctlApp(home, live=False)
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.pause()
            await pilot.press("s")
            await pilot.pause()
            box = app.screen.query_one(Input)
            box.value = "lr=" + "[" * 5000 + "]" * 5000
            await pilot.press("enter")
            await pilot.pause()
            assert app.is_running
            return [str(n.message) for n in app._notifications]
    texts = asyncio.run(go())
    assert "lr: nested deeper than 16 levels" in texts, texts
    assert rd.control_file.read_text() == ""


def test_a_slurm_run_of_several_gpus_runs_torchrun_and_its_gres_must_match(tmp_path):
    """Issue 29: `gpus = N` on Slurm trained on one GPU (one process). The script now launches N ranks
    under torchrun, and a --gres that asks for another number of GPUs is refused before any run is made."""
    from engine.launch import slurm
    from engine.store.rundir import RunDir
    from tests.conftest import TINY_IMAGES, tiny
    rd = RunDir.create(tmp_path / "h", tiny(TINY_IMAGES, "gpus=4"))
    lines = slurm.script(rd, slurm.SlurmOptions(gres="gpu:a100:4"), False).splitlines()
    launch = [ln for ln in lines if "engine train" in ln]
    assert launch == [f"{sys.executable} -m torch.distributed.run --standalone --nproc_per_node=4 -m engine train "
                      '"$RUN_DIR" $RESUME &']
    one = RunDir.create(tmp_path / "h", tiny(TINY_IMAGES))
    assert [ln for ln in slurm.script(one, slurm.SlurmOptions(), False).splitlines() if "engine train" in ln] == [
        f'{sys.executable} -m engine train "$RUN_DIR" $RESUME &']        # negative control: one GPU, one process
    with pytest.raises(ConfigError, match=r"--gres gpu:2 asks for 2 GPU\(s\), but .* trains on gpus = 4 "
                                          r"\(give --gres gpu:4, or --set gpus=2\)"):
        slurm.script(rd, slurm.SlurmOptions(gres="gpu:2"), False)
    with pytest.raises(ConfigError, match="share one job script"):
        slurm.array_script([rd, one], slurm.SlurmOptions(), False, tmp_path)
    home = tmp_path / "cli"
    res = CliRunner().invoke(app, ["--home", str(home), "run", "preset", "demo", "--backend", "slurm", "--gres", "gpu:1",
                                   "--set", "gpus=2"])
    assert res.exit_code == 2 and "asks for 1 GPU(s), but bs32to512 trains on gpus = 2" in res.stderr
    assert not (home / "runs").exists() or not any((home / "runs").iterdir())


def test_a_slurm_run_over_two_nodes_is_one_srun_of_torchrun_and_local_workers_refuse_it(tmp_path):
    """Issue 29: `nodes = 2` on Slurm: two nodes, one task each, srun starting torchrun on each with a c10d
    rendezvous at the first node; the script, line by line. A local backend cannot start a second
    machine: refused in one line before any run is made."""
    from engine.launch import slurm
    from engine.store.rundir import RunDir
    from tests.conftest import TINY_IMAGES, tiny
    rd = RunDir.create(tmp_path / "h", tiny(TINY_IMAGES, "gpus=4", "nodes=2"))
    text = slurm.script(rd, slurm.SlurmOptions(gres="gpu:4", warn=0), False)
    lines = text.splitlines()
    assert lines[:7] == ["#!/bin/bash", f"#SBATCH --job-name=gpctl-{rd.id}", "#SBATCH --output=/dev/null",
                         f"#SBATCH --chdir={rd.path}", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1",
                         "#SBATCH --gres=gpu:4"]
    at = lines.index('GPCTL_HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)')
    assert lines[at + 1:at + 3] == ["GPCTL_PORT=$(( 20000 + ${SLURM_JOB_ID:-0} % 20000 ))",
                                    f"srun --nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=1 {sys.executable} -m "
                                    "torch.distributed.run --nnodes=2 --nproc_per_node=4 --rdzv_backend=c10d "
                                    '--rdzv_endpoint="$GPCTL_HEAD:$GPCTL_PORT" --rdzv_id="$SLURM_JOB_ID" -m engine train '
                                    '"$RUN_DIR" $RESUME &']
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0
    one = RunDir.create(tmp_path / "h", tiny(TINY_IMAGES, "gpus=4"))       # negative control: one node, no srun
    assert "srun" not in slurm.script(one, slurm.SlurmOptions(), False) and "--nodes" not in slurm.script(
        one, slurm.SlurmOptions(), False)
    with pytest.raises(ConfigError, match=r"\(gpus, nodes\) = \(4, 1\), \(4, 2\); submit them without --array"):
        slurm.array_script([rd, one], slurm.SlurmOptions(), False, tmp_path)
    home = tmp_path / "cli"
    res = CliRunner().invoke(app, ["--home", str(home), "run", "preset", "demo", "--set", "nodes=2"])
    assert res.exit_code == 2 and res.stderr.strip() == ("error: bs32to512: nodes = 2 spans several machines, which only "
                                                         "the Slurm backend starts (--backend slurm), or set nodes=1")
    assert not (home / "runs").exists() or not any((home / "runs").iterdir())
