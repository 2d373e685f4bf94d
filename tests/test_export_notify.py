"""Issue 15: export (CSV, Parquet, TensorBoard) round-trips, the notebook API, notifications."""
import json
import math
import time

import pandas as pd
import pytest
from typer.testing import CliRunner

from engine.store.fork import fork
from engine.store.jobs import JobStore
from engine.store.rundir import RunDir
from engine.train.loop import train
from gpctl import runs
from gpctl.cli import app
from tests.conftest import TINY_IMAGES, tiny

runner = CliRunner()


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    home = tmp_path_factory.mktemp("export") / "home"
    made = {}
    for arm, seed in (("low", 0), ("low_s2", 1), ("high", 0)):
        extra = ["lr=0.2"] if arm == "high" else []
        rd = RunDir.create(home, tiny(TINY_IMAGES, "steps=6", "eval_every=3", "checkpoint_every=3",
                                      f"seed={seed}", *extra, name=arm))
        assert train(rd) == "done"
        made[arm] = rd
    child = fork(home, made["high"], step=3, overrides=["lr=0.05"], name="high-dropped")
    assert train(child) == "done"
    made["fork"] = child
    return home, made


def _same(a, b) -> bool:
    if a is None or (isinstance(a, float) and math.isnan(a)):
        return b is None or (isinstance(b, float) and math.isnan(b))
    return a == b


def test_csv_and_parquet_read_back_equal_to_the_records(home, tmp_path):
    home, made = home
    rd = made["fork"]
    recs = rd.metrics()[0]
    for fmt, read in (("csv", pd.read_csv), ("parquet", pd.read_parquet)):
        res = runner.invoke(app, ["--home", str(home), "export", rd.id, "--format", fmt, "--out", str(tmp_path / fmt)])
        assert res.exit_code == 0, res.output
        back = read(tmp_path / fmt / f"{rd.id}.metrics.{fmt}").to_dict("records")
        assert len(back) == len(recs)
        for r, b in zip(recs, back):
            assert all(_same(b.get(k), r.get(k)) for k in set(r) | set(b)), (r, b)
        events = read(tmp_path / fmt / f"{rd.id}.events.{fmt}")
        assert [json.loads(j) for j in events["json"]] == rd.events()[0]
        assert events["text"].iloc[0].startswith("forked from ")
    res = runner.invoke(app, ["--home", str(home), "export", rd.id, "--format", "xlsx"])
    assert res.exit_code == 2 and res.stderr.strip() == "error: --format must be one of csv, parquet, tensorboard, got 'xlsx'"


def test_tensorboard_event_files_read_back_with_tensorboards_reader(home, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    home, made = home
    rd = made["high"]
    res = runner.invoke(app, ["--home", str(home), "export", rd.id, "--format", "tensorboard", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    acc = EventAccumulator(str(tmp_path / rd.id), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    train_recs = [r for r in rd.metrics()[0] if "loss" in r]
    evals = [r for r in rd.metrics()[0] if "eval_loss" in r]
    loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert [s for s, _ in loss] == [r["step"] for r in train_recs]
    assert [v for _, v in loss] == pytest.approx([r["loss"] for r in train_recs], rel=1e-6)   # float32
    assert [(e.step, e.value) for e in acc.Scalars("eval/loss")] == \
        [(r["step"], pytest.approx(r["eval_loss"], rel=1e-6)) for r in evals]
    assert "train/lr" in acc.Tags()["scalars"] and "events" in "".join(acc.Tags()["tensors"])


def test_runs_load_gives_dataframes_with_families_seeds_and_forks(home):
    home, made = home
    loaded = runs.load(home)
    assert len(loaded) == 4
    df = loaded.metrics()
    assert set(df["run"]) == {rd.id for rd in made.values()}
    per = df[df["kind"] == "train"].groupby("run")["step"].apply(list).to_dict()
    assert per[made["low"].id] == [1, 2, 3, 4, 5, 6] and per[made["fork"].id] == [4, 5, 6]
    fam = df.drop_duplicates("run").set_index("run")
    assert fam.loc[made["low_s2"].id, "family"] == "low" and fam.loc[made["low_s2"].id, "seed"] == 1
    assert fam.loc[made["fork"].id, "parent"] == made["high"].id
    mean = df[(df["family"] == "low") & (df["kind"] == "train")].groupby("step")["loss"].mean()
    by_hand = [(a["loss"] + b["loss"]) / 2 for a, b in zip(
        [r for r in made["low"].metrics()[0] if "loss" in r], [r for r in made["low_s2"].metrics()[0] if "loss" in r])]
    assert list(mean) == pytest.approx(by_hand)
    ev = loaded.events()
    assert (ev["event"] == "forked").sum() == 1
    assert list(runs.load(home, preset="tiny").info()["run"]) == loaded.ids
    assert runs.load(home, preset="none").metrics().empty


def _recorder(tmp_path):
    out = tmp_path / "notified.txt"
    return out, f'printf "%s %s %s %s\\n" "$GPCTL_RUN" "$GPCTL_STATE" "$GPCTL_STEP" "$GPCTL_LOSS" >> {out}'


def _lines(path, n, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            time.sleep(0.3)                      # and no more come
            return path.read_text().splitlines()
        time.sleep(0.05)
    return path.read_text().splitlines() if path.exists() else []


def test_a_notification_fires_once_per_end_with_the_runs_variables(tmp_path):
    out, cmd = _recorder(tmp_path)
    home = tmp_path / "home"
    rd = RunDir.create(home, tiny(TINY_IMAGES, "steps=4", f"notify={json.dumps(cmd)}"))
    assert train(rd) == "done"
    s = rd.summary()
    assert _lines(out, 1) == [f"{rd.id} done 4 {s['loss']:.6g}"]
    assert [e["state"] for e in rd.events()[0] if e["event"] == "notify"] == ["done"]
    div = RunDir.create(home, tiny(TINY_IMAGES, "steps=30", "lr=1e6", "optim.grad_clip=0.0", "log_every=1",
                                   f"notify={json.dumps(cmd)}"))
    assert train(div) == "diverged"
    lines = _lines(out, 2)
    assert len(lines) == 2 and lines[1].split()[:2] == [div.id, "diverged"]
    quiet = RunDir.create(home, tiny(TINY_IMAGES, "steps=2"))     # negative control: no command, no firing
    assert train(quiet) == "done"
    assert not [e for e in quiet.events()[0] if e["event"] == "notify"] and len(_lines(out, 3, timeout=1)) == 2


def test_the_homes_notify_fires_for_lost_and_stalled_runs_once(tmp_path):
    import socket
    import subprocess

    from engine.launch.worker import Running, Worker
    out, cmd = _recorder(tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    (home / "settings.toml").write_text(f"notify = {json.dumps(cmd)}\nstall_minutes = 0.001\n")
    rd = RunDir.create(home, tiny(TINY_IMAGES, "steps=4"))
    store = JobStore(home)
    store.enqueue(rd.id, rd.path)
    host = socket.gethostname()
    w = Worker(home)
    job = store.claim(w.id, host, None)
    w.running[job.id] = Running(job, [], None, 0)
    time.sleep(0.1)
    w.check_stalls()
    w.check_stalls()                                  # still stalled: not news
    assert _lines(out, 1) == [f"{rd.id} stalled 0 "]
    w.running.clear()
    dead = subprocess.Popen(["true"])
    dead.wait()
    store.update(job.id, pid=dead.pid, worker=f"{host}:gone")
    Worker(home).reconcile()
    assert _lines(out, 2)[1] == f"{rd.id} lost 0 "
    (home / "settings.toml").write_text("notify = 5\n")              # a broken settings file: one line, no crash
    from engine.config import ConfigError
    from engine.control.notify import settings
    with pytest.raises(ConfigError, match="settings.toml: 'notify' must be a string"):
        settings(home)
