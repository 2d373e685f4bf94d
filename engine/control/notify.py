"""Notifications: run the user's command when a run ends, fails, diverges, is lost, stalls, or snaps.

Commands come from the run's config (`notify`, set by `gpctl run … --notify CMD`) and from the
home's `settings.toml` (`notify = "CMD"`, `stall_minutes = 30`). Each runs through the shell,
detached (a slow mailer never holds up training), with its output appended to the run's log.txt and
these variables set:

    GPCTL_RUN  GPCTL_STATE  GPCTL_STEP  GPCTL_LOSS  GPCTL_EVAL_LOSS  GPCTL_ERROR  GPCTL_RUN_DIR  GPCTL_HOME

A `notify` event records each firing. Who fires: the training process for its own end (done, failed,
diverged; under DDP rank 0 only); the worker for what the process cannot say itself (killed without
a record, lost, stalled: no new record for `stall_minutes`) and for a running job's snap onto its
reference arm (`snapped`: engine.analysis.snap.announce, once, with a `snap` event).
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from engine.config import ConfigError, load_toml
from engine.store.rundir import RunDir

SETTINGS = "settings.toml"
STALL_MINUTES = 30.0


def settings(home: Path) -> dict:
    """The home's settings.toml ({} when there is none); a broken one raises ConfigError (one line)."""
    path = home / SETTINGS
    if not path.exists():
        return {}
    data = load_toml(path)
    unknown = set(data) - {"notify", "stall_minutes"}
    if unknown:
        raise ConfigError(f"{path}: unknown key '{sorted(unknown)[0]}' (known: notify, stall_minutes)")
    if not isinstance(data.get("notify", ""), str):
        raise ConfigError(f"{path}: 'notify' must be a string (a shell command)")
    minutes = data.get("stall_minutes", STALL_MINUTES)
    if isinstance(minutes, bool) or not isinstance(minutes, (int, float)) or not 0 <= minutes <= 10 ** 6:
        raise ConfigError(f"{path}: 'stall_minutes' must be a number in [0, 1000000] (0: never)")
    return data


def commands(rd: RunDir) -> list[str]:
    found = []
    try:
        if rd.config().notify:
            found.append(rd.config().notify)
    except ConfigError:
        pass
    try:
        home_cmd = settings(rd.home).get("notify")
    except ConfigError as e:
        rd.log(f"notify: {e}")
        home_cmd = None
    if home_cmd and home_cmd not in found:
        found.append(home_cmd)
    return found


def notify(rd: RunDir, state: str) -> int:
    """Fire every notification command for `state`; returns how many were started."""
    cmds = commands(rd)
    if not cmds:
        return 0
    s = rd.summary()
    fmt = (lambda v: "" if v is None else f"{v:.6g}")
    env = dict(os.environ, GPCTL_RUN=rd.id, GPCTL_STATE=state, GPCTL_STEP=str(s["step"]), GPCTL_LOSS=fmt(s["loss"]),
               GPCTL_EVAL_LOSS=fmt(s["eval_loss"]), GPCTL_ERROR=(s["error"] or "").splitlines()[0] if s["error"] else "",
               GPCTL_RUN_DIR=str(rd.path), GPCTL_HOME=str(rd.home))
    started = 0
    for cmd in cmds:
        try:
            with open(rd.log_file, "ab") as log:
                subprocess.Popen(cmd, shell=True, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True, cwd=str(rd.path))
            started += 1
        except OSError as e:
            rd.log(f"notify: could not start {cmd!r}: {e}")
    rd.append_event("notify", state=state, step=s["step"], commands=started)
    return started
