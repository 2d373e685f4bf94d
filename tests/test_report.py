"""Issue 30: `gpctl report PRESET|RUN… --out DIR` writes a folder that travels without a network
(figures, verdicts, tables, configs and provenance, Parquet records, a checksum manifest, an
index.html a headless browser opens from the disk), and `gpctl import DIR` brings its runs into
another home read-only, after checking every checksum."""
import hashlib
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from typer.testing import CliRunner

from gpctl.cli import app
from tests.test_snap import T0, TAU, XS, high, low, make

runner = CliRunner()
BROWSER = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


def demo_runs(home):
    """The demo's three arms with hand-made curves: the dropped arm follows bs512 shifted right by
    TAU after T0 (tests/test_snap.py), the seed baseline 0.01 above the reference; train records too."""
    dropped = make(home, "demo-bs32to512-aaaaaa", np.where(XS <= T0, high(XS), low(XS - TAU)),
                   {"batch_size": [32, 512]}, arm="bs32to512")
    ref = make(home, "demo-bs512-bbbbbb", low(XS), arm="bs512")
    seed = make(home, "demo-bs512_seed2-cccccc", low(XS) + 0.01, arm="bs512_seed2")
    for rd, f in ((dropped, lambda x: np.where(x <= T0, high(x), low(x - TAU))), (ref, low),
                  (seed, lambda x: low(x) + 0.01)):
        rd.append_metrics([{"step": x, "samples": x * 32, "lr_time": float(x), "wall": x * 0.01,
                            "loss": float(f(x)) + 0.1, "lr": 0.05, "batch_size": 32} for x in range(1, 401, 5)])
        rd.write_status(state="done")
    return dropped, ref, seed


def gp(home, *args):
    return runner.invoke(app, ["--home", str(home), *args])


def open_in_browser(index):
    """The DOM after index.html's scripts ran, from a headless browser with no network."""
    res = subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          f"--user-data-dir={index.parent.parent / 'browser-profile'}",
                          "--virtual-time-budget=5000", "--dump-dom", index.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def test_a_presets_report_holds_the_figures_verdicts_records_and_checksums(tmp_path):
    home, rep = tmp_path / "home", tmp_path / "rep"
    dropped, ref, seed = demo_runs(home)
    res = gp(home, "report", "demo", "--out", str(rep))
    assert res.exit_code == 0, res.output
    meta = json.loads((rep / "report.json").read_text())
    assert meta["format"] == "gpctl-report" and meta["preset"] == "demo"
    assert meta["runs"] == {"bs32to512": dropped.id, "bs512": ref.id, "bs512_seed2": seed.id}
    # the verdicts are gpctl figure's and gpctl snap's own numbers
    fig = json.loads(gp(home, "figure", "demo", "--json").stdout)
    (fit,) = meta["verdicts"]["fits"]
    assert fit["tau"] == pytest.approx(fig["fits"][0]["tau"]) and abs(fit["tau"] - TAU) <= 0.25
    assert fit["residual"] == pytest.approx(fig["fits"][0]["residual"])
    assert fit["seed_spread"] == pytest.approx(0.01)           # the baseline is 0.01 above the reference
    snap = json.loads(gp(home, "snap", dropped.id, "--json").stdout)
    (s,) = meta["verdicts"]["snaps"]
    assert s["verdict"] == "snapped" == snap["verdict"] and s["sentence"] == snap["sentence"]
    assert res.stdout.splitlines()[1] == snap["sentence"]
    # figures as SVG and PNG
    for name in ("panel", "train"):
        assert (rep / "figures" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert b"<svg" in (rep / "figures" / f"{name}.svg").read_bytes()[:2000]
    # records as Parquet, equal to the run's metrics.jsonl
    import pandas as pd
    df = pd.read_parquet(rep / "records" / f"{dropped.id}.metrics.parquet")
    recs = dropped.metrics()[0]
    assert len(df) == len(recs) == len(XS) + 80
    ev = df[df["eval_loss"].notna()]
    assert ev["eval_loss"].tolist() == [r["eval_loss"] for r in recs if "eval_loss" in r]
    # every run's own files, byte for byte, with its config and provenance
    for rd in (dropped, ref, seed):
        for name in ("config.toml", "metrics.jsonl", "events.jsonl", "provenance.json"):
            assert (rep / "runs" / rd.id / name).read_bytes() == (rd.path / name).read_bytes()
    rows = (rep / "tables" / "runs.csv").read_text().splitlines()
    assert rows[0].startswith("id,arm,preset,state,step,steps,seed,") and len(rows) == 4
    # the manifest: every file, and sha256sum (an independent checker) agrees
    listed = dict(reversed(line.split("  ", 1)) for line in (rep / "MANIFEST.sha256").read_text().splitlines())
    on_disk = {p.relative_to(rep).as_posix() for p in rep.rglob("*") if p.is_file()} - {"MANIFEST.sha256"}
    assert set(listed) == on_disk
    assert all(hashlib.sha256((rep / k).read_bytes()).hexdigest() == v for k, v in listed.items())
    ok = subprocess.run(["sha256sum", "--quiet", "-c", "MANIFEST.sha256"], cwd=rep, capture_output=True)
    assert ok.returncode == 0, ok.stdout
    # index.html fetches nothing from a network: no URL with a scheme but the page's own folder
    page = (rep / "index.html").read_text()
    assert not re.search(r"(src|href)=['\"](?!figures/|runs/|records/|MANIFEST)", page)
    assert "http://" not in page and "https://" not in page and "Content-Security-Policy" in page
    assert snap["sentence"] in page.replace("&#x27;", "'")
    # negative control: a damaged file fails the checker
    (rep / "tables" / "runs.csv").write_text("changed\n")
    bad = subprocess.run(["sha256sum", "--quiet", "-c", "MANIFEST.sha256"], cwd=rep, capture_output=True, text=True)
    assert bad.returncode == 1 and "tables/runs.csv: FAILED" in bad.stdout


@pytest.mark.skipif(BROWSER is None, reason="no chromium here (.ci/run installs it)")
def test_the_report_opens_in_a_headless_browser_with_every_figure_and_says_which_is_missing(tmp_path):
    home, rep = tmp_path / "home", tmp_path / "rep"
    demo_runs(home)
    assert gp(home, "report", "demo", "--out", str(rep)).exit_code == 0
    dom = open_in_browser(rep / "index.html")
    assert re.search(r'id="figures-status" data-ok="2" data-total="2">2 of 2 figures present<', dom), dom[-3000:]
    assert dom.count('data-state="loaded"') == 2 and "figure missing:" not in dom.split("<script>")[0]
    assert "snapped to demo-bs512-bbbbbb shifted right by 49.9 step" in dom
    # negative control: a copy without one figure says so, by name
    (rep / "figures" / "train.svg").unlink()
    dom = open_in_browser(rep / "index.html")
    assert "1 of 2 figures present" in dom and 'data-state="missing"' in dom
    assert '<p class="missing">figure missing: figures/train.svg</p>' in dom


def test_import_checks_every_checksum_and_brings_the_runs_in_read_only(tmp_path):
    home, rep, laptop = tmp_path / "home", tmp_path / "rep", tmp_path / "laptop"
    dropped, ref, seed = demo_runs(home)
    assert gp(home, "report", "demo", "--out", str(rep)).exit_code == 0
    res = gp(laptop, "import", str(rep))
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[-1] == f"3 run(s) imported into {laptop / 'runs'}, 0 skipped"
    for rd in (dropped, ref, seed):
        for name in ("config.toml", "metrics.jsonl", "events.jsonl", "status.json", "provenance.json"):
            assert (laptop / "runs" / rd.id / name).read_bytes() == (rd.path / name).read_bytes()
    # looked at and compared there as where it ran: the same figure's numbers, the same snap
    here = json.loads(gp(home, "figure", "demo", "--json").stdout)
    there = json.loads(gp(laptop, "figure", "demo", "--json").stdout)
    assert here == there
    assert gp(laptop, "snap", dropped.id).stdout == gp(home, "snap", dropped.id).stdout
    ls = gp(laptop, "ls", "--wide").stdout
    assert re.search(rf"{dropped.id}\s+done \(imported\)", ls)
    show = gp(laptop, "show", dropped.id).stdout
    assert f"imported from {rep.resolve()} on " in show and "read-only here" in show
    # read-only: no request, no resume, nothing written
    before = (laptop / "runs" / ref.id / "control.jsonl").read_bytes()
    res = gp(laptop, "drop", ref.id, "--batch-factor", "2", "--queued-ok")
    assert res.exit_code == 2 and res.stderr.strip() == (f"error: run {ref.id} was imported from {rep.resolve()} and is "
                                                         f"read-only here: steer it in the home it ran in")
    res = gp(laptop, "resume", ref.id)
    assert res.exit_code == 2 and "read-only here: it resumes in the home it ran in" in res.stderr
    assert (laptop / "runs" / ref.id / "control.jsonl").read_bytes() == before
    # again: the same copy is skipped; into the home it came from: refused by name, nothing replaced
    res = gp(laptop, "import", str(rep))
    assert res.exit_code == 0 and res.stdout.splitlines()[-1] == f"0 run(s) imported into {laptop / 'runs'}, 3 skipped"
    assert f"{dropped.id}: already here from the same report, skipped" in res.stdout
    res = gp(home, "import", str(rep))
    assert res.exit_code == 2 and res.stderr.strip() == (
        f"error: run {dropped.id} already exists in {home / 'runs'} and is not an import of this copy; "
        f"nothing imported (remove or rename one of them)")
    assert not (home / "runs" / dropped.id / "imported.json").exists()


@pytest.mark.parametrize("damage,says", [
    ("change", "its sha256 is not the one in MANIFEST.sha256"),
    ("remove", "listed in MANIFEST.sha256 but missing"),
    ("add", "not in MANIFEST.sha256: the folder was added to"),
    ("link", "not a regular file (a link or a device)"),
    ("manifest", "leaves the report folder"),
])
def test_a_damaged_report_is_refused_by_name_and_nothing_is_imported(tmp_path, damage, says):
    home, rep, laptop = tmp_path / "home", tmp_path / "rep", tmp_path / "laptop"
    dropped, _, _ = demo_runs(home)
    assert gp(home, "report", "demo", "--out", str(rep)).exit_code == 0
    target = rep / "runs" / dropped.id / "metrics.jsonl"
    if damage == "change":
        data = bytearray(target.read_bytes())
        data[100] ^= 1                                     # one bit of one record
        target.write_bytes(bytes(data))
    elif damage == "remove":
        target.unlink()
    elif damage == "add":
        target = rep / "runs" / dropped.id / "extra.jsonl"
        target.write_text("{}\n")
    elif damage == "link":
        target.unlink()
        os.symlink("/etc/passwd", target)
    else:
        target = rep / "MANIFEST.sha256"
        with open(target, "a") as f:
            f.write(f"{'0' * 64}  ../../etc/passwd\n")
    res = gp(laptop, "import", str(rep))
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1, res.output
    assert res.stderr.startswith(f"error: {target}") and says in res.stderr
    assert not (laptop / "runs").exists() or not any((laptop / "runs").iterdir())


def test_report_errors_are_one_line_and_write_nothing(tmp_path):
    home, rep = tmp_path / "home", tmp_path / "rep"
    demo_runs(home)
    rep.mkdir()
    (rep / "keep.txt").write_text("mine\n")
    res = gp(home, "report", "demo", "--out", str(rep))
    assert res.exit_code == 2 and res.stderr.strip() == (f"error: --out {rep}: exists and is not an empty folder (a report "
                                                         f"is written whole, never into another; give a new folder)")
    assert [p.name for p in rep.iterdir()] == ["keep.txt"]
    res = gp(home, "report", "nosuch", "--out", str(tmp_path / "r2"))
    assert res.exit_code == 2 and res.stderr.strip() == (f"error: unknown run 'nosuch' in {home / 'runs'} (and 'nosuch' "
                                                         f"is not a preset: gpctl presets lists them)")
    res = gp(home, "report", "demo", "--out", str(tmp_path / "r3"), "--x", "nope")
    assert res.exit_code == 2 and "--x must be one of" in res.stderr
    assert not (tmp_path / "r2").exists() and not (tmp_path / "r3").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]    # no temporary folder left
    res = gp(tmp_path / "empty", "import", str(tmp_path / "nothing"))
    assert res.exit_code == 2 and res.stderr.strip() == f"error: {tmp_path / 'nothing'}: not a folder (give a report folder: gpctl report … --out DIR)"
    res = gp(tmp_path / "empty", "import", str(tmp_path))
    assert res.exit_code == 2 and res.stderr.strip() == (f"error: {tmp_path}: no MANIFEST.sha256 (not a gpctl report "
                                                         f"folder, or an incomplete copy)")


@pytest.mark.slow
def test_a_report_with_checkpoints_gives_the_same_tv_where_it_is_imported(tmp_path):
    """--tv --checkpoints: TV at matched loss in the report (Figs. 7/8), and `gpctl tv` on the imported
    runs elsewhere gives the same numbers from the checkpoints that travelled."""
    from tests.test_figures import TV_PRESET
    preset = tmp_path / "tvfig.toml"
    preset.write_text(TV_PRESET)
    home, rep, laptop = tmp_path / "home", tmp_path / "rep", tmp_path / "laptop"
    assert gp(home, "run", "preset", str(preset), "--foreground").exit_code == 0
    res = gp(home, "report", str(preset), "--out", str(rep), "--tv", "--checkpoints")
    assert res.exit_code == 0, res.output
    meta = json.loads((rep / "report.json").read_text())
    assert any(v["sentence"].startswith("bs32to128 vs bs128: ") for v in meta["verdicts"]["tv"])
    assert (rep / "figures" / "tv.svg").exists() and (rep / "figures" / "tv.png").exists()
    tv_rows = (rep / "tables" / "tv.csv").read_text().splitlines()
    assert len(tv_rows) > 2
    assert gp(laptop, "import", str(rep)).exit_code == 0
    a, b = meta["runs"]["bs32to128"], meta["runs"]["bs128"]
    assert sorted(p.name for p in (laptop / "runs" / a / "checkpoints").iterdir()) == \
        sorted(p.name for p in (home / "runs" / a / "checkpoints").iterdir())
    (laptop / "runs" / a / "tv_cache.json").unlink()      # computed again there, from the checkpoints
    here = json.loads(gp(home, "tv", a, b, "--match-loss", "--json").stdout)["pairs"]
    there = json.loads(gp(laptop, "tv", a, b, "--match-loss", "--json").stdout)["pairs"]
    assert [(r["step_a"], r["step_b"], r["tv"]) for r in there] == [(r["step_a"], r["step_b"], r["tv"]) for r in here]
    assert len(here) >= 2
    import csv
    in_report = {(int(r["step_a"]), int(r["step_b"])): float(r["tv"])
                 for r in csv.DictReader((rep / "tables" / "tv.csv").open()) if r["arm"] == "bs32to128"}
    assert {(r["step_a"], r["step_b"]): r["tv"] for r in here} == pytest.approx(in_report, abs=1e-12)
