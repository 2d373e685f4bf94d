"""`gpctl report PRESET|RUN… --out DIR` and `gpctl import DIR`: results that travel without a network.

A report is one self-contained folder (written whole under a temporary name, then renamed):

    index.html            opens from the disk with no server and no network (no external URL; a
                          Content-Security-Policy that forbids fetching any); says which figures are missing
    report.json           what made it (command, time, gpctl's version, host), the runs, the verdicts
    figures/*.svg, *.png  the paper's panel (held-out loss, EMA 0.8, on the figure's axis), train loss,
                          and with --tv TV at matched loss (Figs. 7/8)
    tables/*.csv          runs (config, state, last losses, code), fits, snaps
    records/<id>.metrics.parquet, <id>.events.parquet     every record and event
    runs/<id>/            each run's own files: config.toml, provenance.json, code.diff, records, events
                          (and with --checkpoints its checkpoints: TV and forks on another machine)
    MANIFEST.sha256       sha256 of every file (`sha256sum -c MANIFEST.sha256` checks it)

The verdicts are the figures' and the CLI's own: each changed arm's fit against the reference
(`gpctl figure`: residual, gap before T0, the seed spread), each changed run's snap with its
never-changed control (`gpctl snap`), and with --tv TV at matched loss against the seed baseline
(`gpctl figure --tv`). `gpctl import DIR` (engine/store/bundle.py) checks every checksum and brings
the runs into another home, read-only.
"""
from __future__ import annotations

import csv
import html
import json
import math
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from engine.config import ConfigError
from engine.store import bundle, provenance
from engine.store.rundir import RunDir
from gpctl.common import State, complete_run, friendly, out, print_json

FORMAT = "gpctl-report"
VERSION = 1


def _clean(v):
    """JSON without NaN or infinity (null instead: a browser's JSON.parse refuses them)."""
    from gpctl.compare import _finite     # the one such rule, shared with gpctl tv --follow --json
    return _finite(v)


def pick(targets: list[str]) -> tuple[object | None, dict[str, RunDir]]:
    """(the preset, {arm: run}) for one preset name with runs here (its latest run of each arm);
    else (None, {id: run}) for runs and groups (gpctl plot's rule)."""
    from engine.presets import load_preset
    from gpctl.compare import runs_or_group
    from gpctl.runs import latest_runs
    if len(targets) == 1:
        try:
            p = load_preset(targets[0], check=False)
        except ConfigError:
            p = None
        if p is not None:
            runs = latest_runs(State.home, p.name)
            if not runs:
                raise ConfigError(f"no runs of preset '{p.name}' in {State.home / 'runs'} (gpctl run preset {p.name})")
            return p, runs
    from engine.store.rundir import UnknownRun
    picked: dict[str, RunDir] = {}
    for t in targets:
        try:
            found = runs_or_group(t)
        except UnknownRun as e:
            raise UnknownRun(f"{e} (and '{t}' is not a preset: gpctl presets lists them)") from None
        for rd in found:
            picked.setdefault(rd.id, rd)
    return None, picked


def _has_evals(rd: RunDir) -> bool:
    return bool(rd.eval_records())


def _snaps(runs: dict[str, RunDir]) -> list[dict]:
    """`gpctl snap` of every run whose noise changed (planned, requested or forked)."""
    from engine.analysis.snap import direction
    from gpctl.runs import measure_snap
    got = []
    for rd in runs.values():
        try:
            if direction(rd) is None:
                continue
            got.append(measure_snap(State.home, rd))
        except ConfigError as e:
            got.append({"run": rd.id, "verdict": "no reference", "sentence": str(e).splitlines()[0]})
    return got


def _figures(p, runs: dict[str, RunDir], root: Path, x: str | None, tv: bool) -> tuple[list[dict], dict]:
    """Draw the figures into root/figures; ([{name, title, files}], verdicts)."""
    from gpctl.figures import draw_panel, fit_sentence, loss_figure, panel_data
    from gpctl.runs import figure_axis
    figs, verdicts = [], {"fits": [], "snaps": [], "tv": []}
    fdir = root / "figures"
    fdir.mkdir(mode=0o700)

    def both(name: str) -> list[Path]:
        return [fdir / f"{name}.svg", fdir / f"{name}.png"]

    rds = list(runs.values())
    if p is not None:
        axis = figure_axis(p, x)
        data = panel_data(runs, p.contract, axis, 0.8)
        if any(c["x"] for c in data["curves"]):
            title = f"{p.figure}: {p.name}" if p.figure else p.name
            draw_panel(data, both("panel"), title=title)
            figs.append({"name": "panel", "title": f"{title}: held-out loss (EMA 0.8) on {axis}, the reference "
                                                  f"translated onto each changed arm"})
        verdicts["fits"] = [dict(f, sentence=fit_sentence(f, axis)) for f in data["fits"]]
    else:
        axis = (x or "step").replace("-", "_")
        with_evals = [rd for rd in rds if _has_evals(rd)]
        if with_evals:
            loss_figure(with_evals, both("held_out"), x=axis, evals=True, title="held-out loss (EMA 0.8 over the evals)")
            figs.append({"name": "held_out", "title": f"held-out loss (EMA 0.8 over the evals) on {axis}"})
    with_train = [rd for rd in rds if rd.train_records()]
    if with_train:
        loss_figure(with_train, both("train"), x=axis, coef=0.8, title="train loss (EMA 0.8)")
        figs.append({"name": "train", "title": f"train loss (EMA 0.8) on {axis}"})
    if tv:
        if p is None:
            raise ConfigError("--tv needs a preset (its reference arm and seed baselines): gpctl report PRESET --tv")
        from gpctl.compare import tv_panel
        got = tv_panel(p, runs, axis, both("tv"))
        figs.append({"name": "tv", "title": f"TV to {p.contract.reference} at matched held-out loss against {axis}"})
        verdicts["tv"] = [{"sentence": s} for s in got["sentences"]]
        _write_csv(root / "tables" / "tv.csv", got["pairs"])
    verdicts["snaps"] = _snaps(runs)
    for f in figs:
        f["files"] = [f"figures/{f['name']}.svg", f"figures/{f['name']}.png"]
    return figs, verdicts


def _write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(exist_ok=True, mode=0o700)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: json.dumps(_clean(v)) if isinstance(v, (list, dict)) else v for k, v in r.items()})


def run_rows(runs: dict[str, RunDir]) -> list[dict]:
    rows = []
    for arm, rd in runs.items():
        cfg, s = rd.config(), rd.summary()
        recs = rd.train_records()
        first, last = (recs[0], recs[-1]) if recs else ({}, {})
        prov = provenance.read(rd.path)
        rows.append({"id": rd.id, "arm": cfg.name, "preset": cfg.preset, "state": s["state"],
                     "step": s["step"], "steps": cfg.steps, "seed": cfg.seed,
                     "batch_size": cfg.batch_size, "batch_size_last": last.get("batch_size"),
                     "lr": cfg.lr, "lr_last": last.get("lr"), "first_step": first.get("step"),
                     "eval_loss": s["eval_loss"], "eval_error": s["eval_error"], "loss_ema": s["loss_ema"],
                     "device": s["device"], "mode": cfg.data.mode,
                     "code": provenance.code_text(prov.get("code")) if prov else "not recorded"})
    return rows


def _num(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if math.isfinite(v) else "-"
    return str(v)


CSP = ("default-src 'none'; img-src 'self' file: data:; style-src 'unsafe-inline'; "
       "script-src 'unsafe-inline'; connect-src 'none'")
# each figure says when its file is missing or unreadable (a copy without it): never a blank box
SCRIPT = """
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('img'), ok = 0;
  imgs.forEach(function (img) {
    var fine = img.complete && img.naturalWidth > 0;
    img.dataset.state = fine ? 'loaded' : 'missing';
    if (fine) { ok++; } else {
      var p = document.createElement('p'); p.className = 'missing';
      p.textContent = 'figure missing: ' + img.getAttribute('src'); img.after(p);
    }
  });
  var s = document.getElementById('figures-status');
  s.textContent = ok + ' of ' + imgs.length + ' figures present';
  s.dataset.ok = ok; s.dataset.total = imgs.length;
});
"""


def write_html(root: Path, meta: dict, figs: list[dict], verdicts: dict, rows: list[dict]) -> Path:
    e = html.escape
    parts = ["<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
             f"<meta http-equiv='Content-Security-Policy' content=\"{CSP}\">",
             f"<title>{e(meta['title'])}</title>",
             "<style>body{font:14px/1.45 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}"
             "img{max-width:100%;border:1px solid #eee}.missing{color:#b00;font-weight:bold}"
             "code{background:#f4f4f4;padding:0 3px}li{margin:.3em 0}</style></head><body>",
             f"<h1>{e(meta['title'])}</h1>",
             f"<p>Made by <code>{e(meta['command'])}</code> on {e(meta['made_text'])} on {e(meta['host'])} "
             f"(gpctl {e(str(meta['gpctl']))}). Held-out loss is the paper's measure (EMA 0.8 over the evals); "
             f"train loss is shown as such.</p>", "<h2>Verdicts</h2>"]
    sentences = ([("fit", f["sentence"]) for f in verdicts["fits"]] + [("snap", s["sentence"]) for s in verdicts["snaps"]]
                 + [("TV", t["sentence"]) for t in verdicts["tv"]])
    if sentences:
        parts.append("<ul id='verdicts'>" + "".join(f"<li><b>{e(k)}</b>: {e(s)}</li>" for k, s in sentences) + "</ul>")
    else:
        parts.append("<p id='verdicts'>No verdicts: no run here changed its noise, and no preset names a reference.</p>")
    if not verdicts["tv"]:
        parts.append("<p>TV at matched loss was not computed for this report (<code>gpctl report PRESET --tv</code>).</p>")
    parts += ["<h2>Figures</h2>", "<p id='figures-status'>figures not checked (scripts are off)</p>"]
    for f in figs:
        parts.append(f"<figure><img src='{e(f['files'][0])}' alt='{e(f['title'])}'>"
                     f"<figcaption>{e(f['title'])} (<a href='{e(f['files'][1])}'>PNG</a>, "
                     f"<a href='{e(f['files'][0])}'>SVG</a>)</figcaption></figure>")
    cols = ("id", "arm", "state", "step", "steps", "seed", "batch_size", "batch_size_last", "lr", "lr_last",
            "eval_loss", "eval_error", "loss_ema", "mode", "device", "code")
    heads = {"batch_size": "batch", "batch_size_last": "batch (last)", "lr_last": "lr (last)",
             "eval_loss": "held-out loss (last)", "eval_error": "held-out error (last)", "loss_ema": "train loss (EMA 0.8)"}
    parts += ["<h2>Runs</h2>", "<table id='runs'><tr>" + "".join(f"<th>{e(heads.get(c, c))}</th>" for c in cols)
              + "<th>files</th></tr>"]
    for r in rows:
        rid = e(r["id"])
        links = (f"<a href='runs/{rid}/config.toml'>config</a> <a href='runs/{rid}/provenance.json'>provenance</a> "
                 f"<a href='records/{rid}.metrics.parquet'>records</a> <a href='runs/{rid}/events.jsonl'>events</a>")
        parts.append("<tr>" + "".join(f"<td>{e(_num(r[c]))}</td>" for c in cols) + f"<td>{links}</td></tr>")
    parts += ["</table>", "<h2>Checking and importing</h2>",
              "<p>Every file is listed with its sha256 in <a href='MANIFEST.sha256'>MANIFEST.sha256</a>: "
              "<code>sha256sum -c MANIFEST.sha256</code> in this folder checks them. "
              "<code>gpctl --home HOME import THIS_FOLDER</code> brings the runs into another home, read-only "
              "(they can be listed, shown, plotted and compared there).</p>",
              f"<script>{SCRIPT}</script>", "</body></html>"]
    path = root / "index.html"
    path.write_text("\n".join(parts) + "\n")
    return path


def write_report(targets: list[str], outdir: Path, command: str, x: str | None = None, tv: bool = False,
                 checkpoints: bool = False) -> dict:
    """Write the report folder `outdir` (see the module's docstring); its report.json as a dict."""
    from gpctl import __version__
    from gpctl.export import export_tables
    if outdir.exists() and (not outdir.is_dir() or any(outdir.iterdir())):
        raise ConfigError(f"--out {outdir}: exists and is not an empty folder (a report is written whole, "
                          f"never into another; give a new folder)")
    p, runs = pick(targets)
    outdir.parent.mkdir(parents=True, exist_ok=True)
    tmp = outdir.parent / f".{outdir.name}.writing.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(mode=0o700)
    try:
        figs, verdicts = _figures(p, runs, tmp, x, tv)
        rows = run_rows(runs)
        (tmp / "records").mkdir(mode=0o700)
        copied = 0
        for rd in runs.values():
            export_tables(rd, tmp / "records", "parquet")
            copied += bundle.copy_run(rd.path, tmp / "runs" / rd.id, checkpoints=checkpoints)
        _write_csv(tmp / "tables" / "runs.csv", rows)
        if verdicts["fits"]:
            _write_csv(tmp / "tables" / "fits.csv", verdicts["fits"])
        if verdicts["snaps"]:
            _write_csv(tmp / "tables" / "snaps.csv", [{k: v for k, v in s.items() if k != "control"} |
                                                      {"control": (s.get("control") or {}).get("run")}
                                                      for s in verdicts["snaps"]])
        now = time.time()
        title = (f"gpctl report: {p.name}" + (f" ({p.figure})" if p.figure else "")) if p is not None else \
            f"gpctl report: {len(runs)} run{'s' * (len(runs) != 1)}"
        meta = {"format": FORMAT, "version": VERSION, "title": title, "command": command, "made": now,
                "made_text": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(now)), "host": socket.gethostname(),
                "gpctl": __version__, "preset": p.name if p is not None else None,
                "runs": {arm: rd.id for arm, rd in runs.items()}, "checkpoints": checkpoints,
                "figures": figs, "verdicts": verdicts}
        (tmp / "report.json").write_text(json.dumps(_clean(meta), indent=1, default=str) + "\n")
        write_html(tmp, meta, figs, verdicts, rows)
        bundle.write_manifest(tmp)
        if outdir.exists():
            outdir.rmdir()               # empty (checked above)
        os.rename(tmp, outdir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    meta["bytes_of_runs"] = copied
    return meta


@friendly
def report(targets: Annotated[list[str], typer.Argument(help="A preset (its latest runs), or runs and groups.",
                                                        autocompletion=complete_run)],
           out_dir: Annotated[Path, typer.Option("--out", "-o", help="A new folder for the report.")] = Path("report"),
           x: Annotated[Optional[str], typer.Option("--x", help="x-axis (default: the preset's figure's; step for runs).")] = None,
           tv: Annotated[bool, typer.Option("--tv", help="Also TV at matched loss to the preset's reference (from "
                                                         "checkpoints: minutes on a CPU).")] = False,
           checkpoints: Annotated[bool, typer.Option("--checkpoints", help="Carry the runs' checkpoints too (TV and "
                                                                           "forks where it is imported).")] = False,
           as_json: Annotated[bool, typer.Option("--json", help="Print report.json.")] = False) -> None:
    """A self-contained report folder: figures (SVG, PNG), verdicts, tables, every run's config and
    provenance, records as Parquet, a checksum manifest, and an index.html that opens with no network."""
    from engine.analysis.curves import AXES
    if x is not None and x.replace("-", "_") not in AXES:
        raise ConfigError(f"--x must be one of {', '.join(AXES)}, got {x!r}")
    command = "gpctl report " + " ".join(targets) + f" --out {out_dir}" + (f" --x {x}" if x else "") + \
        (" --tv" if tv else "") + (" --checkpoints" if checkpoints else "")
    meta = write_report(targets, out_dir, command, x, tv, checkpoints)
    if as_json:
        print_json(_clean(meta), default=str)
        return
    for kind in ("fits", "snaps", "tv"):
        for v in meta["verdicts"][kind]:
            out.print(v["sentence"], markup=False)
    out.print(f"wrote {out_dir / 'index.html'} ({len(meta['runs'])} runs, {len(meta['figures'])} figures; "
              f"check: sha256sum -c MANIFEST.sha256 in {out_dir})", markup=False)


@friendly
def import_(folder: Annotated[Path, typer.Argument(help="A report folder (gpctl report --out).")],
            as_json: Annotated[bool, typer.Option("--json", help="Print what was imported as JSON.")] = False) -> None:
    """Bring a report's runs into this home, read-only, after checking every checksum: results from an
    offline cluster, listed, shown, plotted and compared here."""
    if not folder.is_dir():
        raise ConfigError(f"{folder}: not a folder (give a report folder: gpctl report … --out DIR)")
    res = bundle.import_runs(State.home, folder)
    if as_json:
        print_json(res)
        return
    for rid in res["imported"]:
        out.print(f"imported {rid} (read-only)", markup=False)
    for rid in res["skipped"]:
        out.print(f"{rid}: already here from the same report, skipped", markup=False)
    out.print(f"{len(res['imported'])} run(s) imported into {State.home / 'runs'}, {len(res['skipped'])} skipped",
              markup=False)


def register(app: typer.Typer) -> None:
    app.command()(report)
    app.command("import")(import_)
