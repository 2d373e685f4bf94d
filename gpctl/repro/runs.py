"""`gpctl repro`'s runs: the preset's arms on fresh seeds, then the forks at T0 with their live
requests in the control file (batch and lr, drop and raise), queued like `gpctl run` and waited for."""
from __future__ import annotations

import time

from engine.config import ConfigError
from engine.control import BATCH_FACTOR, RAISE_RAMP as LR_RAMP, append_request   # the paper's, as drop/raise use them
from engine.presets import load_preset
from engine.store.fork import fork as fork_run
from engine.store.rundir import RunDir
from gpctl import queue
from gpctl.common import State
from gpctl.repro.claims import Report
from gpctl.steer import noise_request

def _queue_and_wait(rds: list[RunDir], cpu_slots: int = 1) -> None:
    queue.enqueue(rds)
    queue.ensure_worker(cpu_slots=cpu_slots)
    states = queue.wait_for(rds)
    bad = [f"{rd.id} ({s})" for rd, s in zip(rds, states) if s != "done"]
    if bad:
        raise ConfigError(f"repro: runs did not finish: {', '.join(bad)} (gpctl show RUN; gpctl logs RUN)")


def run_all(preset: str, seed: int = 0, cpu_slots: int = 1) -> Report:
    """The preset's runs with every arm's seed moved by `seed` (rule 5: record on fresh seeds), then the forks."""
    rep = Report(preset, seed=seed)
    t = time.perf_counter()
    cfgs = load_preset(preset, check=False).configs()   # each arm's plan is checked here, once
    for cfg in cfgs:
        cfg.seed += seed
    rds = [RunDir.create(State.home, cfg) for cfg in cfgs]
    if preset == "repro":   # the language-model part, queued with the rest (its arms are named lm_*)
        lm = load_preset("repro_lm", check=False).configs()
        for cfg in lm:
            cfg.seed += seed
        rds += [RunDir.create(State.home, cfg) for cfg in lm]
    rep.runs = {rd.config().name: rd for rd in rds}
    _queue_and_wait(rds, cpu_slots)
    rep.timings["preset runs"] = time.perf_counter() - t
    t0 = t0_of(rep)
    t = time.perf_counter()
    forks = []
    if "high" in rep.runs:   # the live drop: high forked at T0, batch x16 through the control file
        live = fork_run(State.home, rep.runs["high"], step=t0, name="high_live")
        append_request(live, dict(noise_request(live, None, BATCH_FACTOR, lower=True, ramp=0.0), queued_ok=True))
        forks.append(live)
    if "low" in rep.runs:    # the raise: low forked at T0, batch /16 through the control file
        raised = fork_run(State.home, rep.runs["low"], step=t0, name="low_raise")
        append_request(raised, dict(noise_request(raised, None, BATCH_FACTOR, lower=False, ramp=0.0), queued_ok=True))
        forks.append(raised)
    if "high" in rep.runs and "low_lr" in rep.runs:
        forks += lr_forks(rep.runs["high"], rep.runs["low_lr"], t0)
    rep.runs.update({rd.config().name: rd for rd in forks})
    _queue_and_wait(forks, cpu_slots)
    rep.timings["forks"] = time.perf_counter() - t
    return rep


def lr_forks(high: RunDir, low_lr: RunDir, t0: int) -> list[RunDir]:
    """The lr drop and the lr raise (Figs. 4b, 5b), like `gpctl fork` + `gpctl drop/raise --lr-factor`:
    `high` (lr = lr_ref, so step T0 is lr_time T0) forked at T0 with its lr divided by K, and `low_lr`
    forked at lr_time T0 with its lr multiplied by K over a ramp of LR_RAMP LR-normalized steps (the
    paper ramps lr increases), both run on to the lr arms' end in lr_time, at the lr arm's cadence."""
    import math
    h, lo = high.config(), low_lr.config()
    k, end = h.lr / lo.lr, lo.steps * lo.lr / lo.lr_ref          # lr factor; the lr arms' last lr_time
    cadence = [f"eval_every={lo.eval_every}", f"checkpoint_every={lo.checkpoint_every}", "checkpoint_at_losses=[]"]
    drop_steps = t0 + math.ceil((end - t0) * lo.lr_ref / lo.lr)
    dropped = fork_run(State.home, high, step=t0, name="high_lr_drop", overrides=[f"steps={drop_steps}", *cadence])
    append_request(dropped, dict(noise_request(dropped, k, None, lower=True, ramp=0.0), queued_ok=True))
    # the ramp is linear in lr_time: it takes lr_ref * R / (b - a) * ln(b / a) steps from lr a to b in
    # the continuous limit; the stepped schedule (the lr is held through each step) covers a little less
    # lr_time, so the raised run ends a few LR-normalized steps short of the others (994.5 of 1000 on
    # the calibration seed: less than one eval interval; the fits use the common range)
    a, b, at = lo.lr, lo.lr * k, round(t0 * lo.lr_ref / lo.lr)
    ramp_steps = lo.lr_ref * LR_RAMP / (b - a) * math.log(b / a)
    raise_steps = at + math.ceil(ramp_steps + (end - t0 - LR_RAMP) * lo.lr_ref / b)
    raised = fork_run(State.home, low_lr, step=at, name="low_lr_raise",
                      overrides=[f"steps={raise_steps}", f"eval_every={round(lo.eval_every * a / b)}",
                                 f"checkpoint_every={lo.checkpoint_every}"])
    append_request(raised, dict(noise_request(raised, k, None, lower=False, ramp=LR_RAMP), queued_ok=True))
    return [dropped, raised]


def t0_of(rep: Report) -> int:
    return rep.runs["high_drop"].config().changes[0].at_step


# ------------------------------------------------------------------ checking

def seed_runs(rep: Report, arm: str) -> list[RunDir]:
    """An arm and its extra seeds (`high`, `high_s2`, `high_s3`): rule 5's seeds of the noisy arms."""
    r = rep.runs
    return [r[k] for k in sorted(r, key=lambda k: (k != arm, k))
            if k == arm or (k.startswith(arm + "_s") and k[len(arm) + 2:].isdigit())]
