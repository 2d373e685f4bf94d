"""One run in full, as `gpctl show` prints it and the TUI's detail screen shows it: state (and why,
when a file is unreadable), progress, the job and each attempt, how its config differs from its
preset arm (or parent), checkpoints, events as sentences."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from engine.store.ckptmeta import read_meta
from engine.config import ConfigError
from engine.errors import CheckpointError
from engine.store.fork import children
from engine.store import state as states_
from engine.store import provenance
from engine.store.jobs import JobStore
from engine.store.rundir import RunDir, UnknownRun
from gpctl.common import fmt as _f


def run_info(home: Path, rd: RunDir) -> dict:
    """Everything `gpctl show --json` prints."""
    events, _ = rd.events()
    s = rd.summary()
    problems = rd.problems(full=True)                 # the whole of every file, not only its end
    job = _job(home, rd)
    # the one state rule (engine/store/state.py), with every file read whole rather than its end
    s["state"] = states_.shown(dict(s, problem=problems or None), job and job["state"])
    try:
        cfg = rd.config()
    except ConfigError:
        cfg = None
    diff_from, diff = _config_diff(home, cfg) if cfg else ("", [])
    return {"id": rd.id, "path": str(rd.path), "state": s["state"], "problems": problems, "status": rd.status(),
            "summary": s, "parent": cfg.parent or None if cfg else None, "children": children(home, rd),
            "parent_overrides": cfg.parent_overrides if cfg else [],
            "job": job, "config_differs_from": diff_from,
            "config_diff": [{"key": k, "was": a, "now": b} for k, a, b in diff],
            "checkpoints": [{"step": st, "file": p.name, **_meta(p)} for st, p in rd.list_checkpoints()],
            "provenance": provenance.read(rd.path), "imported": rd.imported(),
            "code_changes": [e for e in events if e.get("event") == "code_changed"],
            "events": events[-20:]}


def run_lines(rd: RunDir, info: dict, full_config: bool = False) -> list[str]:
    """run_info as the lines `gpctl show` prints."""
    from engine.control import event_text
    lines: list[str] = []
    say = lines.append
    s, problems, job = info["summary"], info["problems"], info["job"]
    steps = f"/{s['steps']}" if s["steps"] else ""
    say(f"{rd.id}  {s['preset']}/{s['arm']}  {s['state']}" + (f"  on {s['device']}" if s["device"] else ""))
    for p in problems:
        say(f"unreadable: {p}")
    if s["state"] == "unreadable" and s["run_state"] not in ("unknown",):
        say(f"recorded state: {s['run_state']}")
    say(f"step {s['step']}{steps}  samples {s['samples']}  lr_time {_f(s['lr_time'], 1)}  lr {_g(s['lr'])}  "
        f"batch {s['batch_size'] or '-'}  loss {_f(s['loss'])}  eval loss {_f(s['eval_loss'])}")
    if s["error"]:
        say(f"error: {s['error']}")
    say(f"dir {rd.path}")
    if info.get("imported") is not None:
        at = info["imported"].get("at")
        when = time.strftime(" on %Y-%m-%d %H:%M", time.localtime(at)) if isinstance(at, (int, float)) else ""
        say(f"imported from {info['imported'].get('from', 'a report')}{when}: read-only here (it takes no "
            f"request and does not resume)")
    if job:
        where = f"slurm job {job['slurm_id']}" if job["backend"] == "slurm" else f"worker {job['worker'] or '-'}"
        say(f"job {job['state']}  attempts {job['attempts']}  {where}  devices {job['devices'] or '-'}  "
            f"exit code {job['exit_code'] if job['exit_code'] is not None else '-'}")
        for a in job["history"]:
            why = f": {a['error'].splitlines()[0]}" if a["error"] else ""
            say(f"  attempt {a['attempt']} ended {a['state']}{why}")
        if job["error"] and job["state"] not in ("queued", "running"):
            say(job["error"])
    say(f"code {code_line(info['provenance'])}")
    for e in info["code_changes"]:
        say(f"  at step {e.get('step')}: {event_text(e)}")
    if info["parent"]:
        say(f"parent {info['parent']}  (forked with {' '.join(info['parent_overrides']) or 'no overrides'})")
    if info["children"]:
        say(f"children {', '.join(info['children'])}")
    diff_from = info["config_differs_from"]
    if diff_from:
        if info["config_diff"]:
            say(f"config, where it differs from {diff_from}:")
            for d in info["config_diff"]:
                say(f"  {d['key']} = {_toml_value(d['now'])}    (was {_toml_value(d['was'])})")
        else:
            say(f"config: as {diff_from}")
    if full_config:
        say("config.toml:")
        say(rd.config_file.read_text(errors="replace").rstrip())
    for c in info["checkpoints"]:
        say(f"  checkpoint {c['file']}  lr_time {_f(c.get('lr_time'), 1)}  eval loss {_f(c.get('eval_loss'))}")
    for e in info["events"]:
        t = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.get("time", 0)))
        say(f"  {t}  {event_text(e)}")
    return lines


def code_line(prov: dict | None) -> str:
    """"gpctl 0.1.0, git 24a1c48…, python 3.11.2, torch 2.5.1, on HOST" (or that it was not recorded)."""
    if prov is None:
        return "not recorded (a run made before gpctl kept provenance.json)"
    env = prov.get("environment") if isinstance(prov.get("environment"), dict) else {}
    extra = [f"python {env['python']}" if env.get("python") else "", f"torch {env['torch']}" if env.get("torch") else "",
             f"created on {env['host']}" if env.get("host") else ""]
    return ", ".join([provenance.code_text(prov.get("code"))] + [x for x in extra if x])


def diff_lines(home: Path, a: RunDir, b: RunDir) -> list[str]:
    """`gpctl show A --diff B`: how two runs' config, code and environment differ, one line a key."""
    from engine.config import to_dict
    out = [f"{a.id} vs {b.id}"]
    try:
        ca, cb = _flat(to_dict(a.config())), _flat(to_dict(b.config()))
    except ConfigError as e:
        return out + [f"config: unreadable ({str(e).splitlines()[0]})"]
    skip = {"name", "parent_checkpoint"}
    keys = [k for k in sorted(set(ca) | set(cb)) if k not in skip and ca.get(k) != cb.get(k)]
    out.append("config: the same" if not keys else f"config: {len(keys)} key{'s' if len(keys) != 1 else ''} differ")
    out += [f"  {k}: {_toml_value(ca.get(k))} | {_toml_value(cb.get(k))}" for k in keys]
    pa, pb = provenance.read(a.path), provenance.read(b.path)
    if pa is None or pb is None:
        out.append("code: not recorded for " + " and ".join(r.id for r, p in ((a, pa), (b, pb)) if p is None))
        return out
    if provenance.same_code(pa["code"], pb["code"]):
        out.append(f"code: the same ({provenance.code_text(pa['code'])})")
    else:
        out += ["code: differs", f"  {a.id}: {provenance.code_text(pa['code'])}",
                f"  {b.id}: {provenance.code_text(pb['code'])}"]
        ga, gb = pa["code"].get("git") or {}, pb["code"].get("git") or {}
        if ga.get("commit") and gb.get("commit") and ga["commit"] != gb["commit"]:
            out.append(f"  git diff {ga['commit'][:10]} {gb['commit'][:10]}   (from the checkout: what changed)")
    ea = pa.get("environment") if isinstance(pa.get("environment"), dict) else {}
    eb = pb.get("environment") if isinstance(pb.get("environment"), dict) else {}
    env = [k for k in ("python", "torch", "platform", "host") if ea.get(k) != eb.get(k)]
    out.append("environment: the same" if not env else "environment: " + ", ".join(
        f"{k} {ea.get(k)} | {eb.get(k)}" for k in env))
    return out


def _job(home: Path, rd: RunDir) -> dict | None:
    from gpctl import queue
    store = JobStore.for_reading(home, lenient=True)
    if store.problem:
        print(f"warning: {store.problem}", file=sys.stderr)
    if store.writable:
        queue.sync(store)
    job = store.get(rd.id)
    info = dict(vars(job), history=store.attempts(job.id)) if job else None
    store.close()
    return info


def _meta(path: Path) -> dict:
    try:
        m = read_meta(path)
        return {"lr_time": m.get("lr_time"), "eval_loss": m.get("eval_loss")}
    except CheckpointError:
        return {"error": "unreadable"}


def _g(v) -> str:
    return "-" if v is None else f"{v:.4g}"


def _toml_value(v) -> str:
    return json.dumps(v) if not isinstance(v, str) else repr(v).replace("'", '"')


def _config_diff(home: Path, cfg) -> tuple[str, list[tuple[str, object, object]]]:
    """Keys where the run's config differs from its parent's (a fork) or its preset arm's, flattened
    to dotted keys; ("", []) when there is nothing to compare with (a preset file since moved)."""
    from engine.config import to_dict
    from engine.presets import load_preset
    from engine.store.rundir import run_dir
    try:
        if cfg.parent:
            base, label = run_dir(home, cfg.parent).config(), f"its parent {cfg.parent}"
        else:
            base = load_preset(cfg.preset, check=False).configs(arms=[cfg.name], check=False)[0]
            label = f"preset {cfg.preset} [runs.{cfg.name}]"
    except (ConfigError, UnknownRun, OSError):
        return "", []
    a, b = _flat(to_dict(base)), _flat(to_dict(cfg))
    skip = {"name", "preset", "parent", "parent_checkpoint", "parent_overrides", "group"}
    return label, [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if k not in skip and a.get(k) != b.get(k)]


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
