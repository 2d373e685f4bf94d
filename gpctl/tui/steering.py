"""The TUI's steering and queue keys: each refuses at once on a run it cannot act on, asks in a
dialog, then calls the operations the CLI calls (gpctl.steer's checks, gpctl.runs, the backends) with
the home passed in. A mixin of GpctlApp (app.py)."""
from __future__ import annotations

from functools import partial

from engine.config import ConfigError
from engine.control import ControlError, Request, append_request
from engine.store.jobs import JobStore
from engine.store.rundir import RunDir, run_dir
from gpctl.tui.dialogs import Ask, Confirm, Pick


def fork_words(words: list[str]) -> tuple[int | None, float | None, str | None, list[str]]:
    """The fork dialog's words, as `gpctl fork` takes them: --step N | --lr-time T, --name NAME, and
    KEY=VALUE overrides. Returns (step, lr_time, name, overrides); anything else is a ValueError
    naming the word."""
    step = lr_time = name = None
    overrides: list[str] = []
    it = iter(words)
    for w in it:
        if w in ("--step", "--lr-time", "--name"):
            v = next(it, None)
            if v is None:
                raise ValueError(f"{w} needs a value")
            try:
                if w == "--step":
                    step = int(v)
                elif w == "--lr-time":
                    lr_time = float(v)
                else:
                    name = v
            except ValueError:
                raise ValueError(f"{w} needs a {'whole number' if w == '--step' else 'number'}, got {v!r}") from None
        elif w.startswith("-"):
            raise ValueError(f"unknown option {w!r} (--step N, --lr-time T, --name NAME, KEY=VALUE)")
        elif "=" in w:
            overrides.append(w)
        else:
            raise ValueError(f"expected KEY=VALUE, got {w!r}")
    if step is not None and lr_time is not None:
        raise ValueError("--step and --lr-time: give one")
    return step, lr_time, name, overrides


def queue_action(method):
    """An action that reads or writes jobs.db: a store that cannot be opened (garbage, a lost WAL, a
    full disk) is one error toast naming it, never the end of the TUI."""
    import functools
    import sqlite3

    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sqlite3.DatabaseError as e:
            self.notify(f"{self.home / 'jobs.db'}: {e}", severity="error")
    return guarded


class SteeringKeys:
    # ------------------------------------------------------------------ steering keys
    def _selected(self) -> RunDir | None:
        sel = self.table.selected_id
        if sel is None:
            self.notify("no run selected", severity="warning")
            return None
        if sel in self._groups:
            self.notify(f"{sel} is {len(self._groups[sel])} runs (one row per seed family): G shows them one "
                        "per row, to act on one", severity="warning")
            return None
        return run_dir(self.home, sel)

    def _send(self, rd: RunDir, request: dict) -> None:
        from gpctl.steer import check_request
        try:   # validated as the CLI does, before anything is written
            rid = append_request(rd, check_request(rd, request, queued_ok=False))
        except (ControlError, ConfigError, OSError) as e:
            self.notify(str(e), severity="error")
            return
        from gpctl.steer import request_words
        self.notify(f"{rd.id}: sent {request_words(request)} (request {rid}); its acknowledgement shows in the events")

    def _steerable(self, action: bool = False) -> RunDir | None:
        """The selected run if it takes this kind of request now; else say why at once, before any dialog."""
        from gpctl.steer import refusal
        rd = self._selected()
        if rd is None:
            return None
        why = refusal(rd, action)
        if why:
            self.notify(why, severity="warning")
            return None
        return rd

    def _ask_request(self, rd: RunDir, prompt: str, parse, value: str = "") -> None:
        """Ask in a dialog; `parse(answer)` makes the request to send (its ControlError, ValueError or
        OverflowError is shown as one line, and nothing is sent)."""
        def done(answer: str | None) -> None:
            if not answer:
                return
            try:
                request = parse(answer)
            except (ControlError, ValueError, OverflowError) as e:
                self.notify(str(e), severity="error")
                return
            self._send(rd, request)

        self.push_screen(Ask(prompt, value), done)

    def _noise(self, lower: bool) -> None:
        from engine.control import BATCH_FACTOR, LR_FACTOR, RAISE_RAMP
        from gpctl.steer import noise_request
        rd = self._steerable()
        if rd is None:
            return

        def parse(answer: str) -> dict:
            what, _, k = answer.strip().partition(" ")
            try:
                factor = float(k) if k.strip() else None
            except ValueError:
                raise ControlError(f"expected a number after '{what}', got {k.strip()!r}") from None
            if what == "batch":   # "batch 0" is a bad factor, not the default
                return noise_request(rd, None, BATCH_FACTOR if factor is None else int(factor), lower, ramp=0.0)
            if what == "lr":
                return noise_request(rd, LR_FACTOR if factor is None else factor, None, lower,
                                     ramp=0.0 if lower else RAISE_RAMP)
            raise ControlError(f"expected 'lr K' or 'batch K', got {answer!r}")

        verb = "drop" if lower else "raise"
        self._ask_request(rd, f"{verb} noise of {rd.id}: 'lr K' (lr {'÷' if lower else '×'} K) or 'batch K'", parse,
                          "lr 10")

    def action_drop(self) -> None:
        self._noise(lower=True)

    def action_raise_noise(self) -> None:
        self._noise(lower=False)

    def action_set(self) -> None:
        rd = self._steerable()
        if rd is not None:
            self._ask_request(rd, f"set on {rd.id}: lr=… batch_size=… [ramp=N]",
                              lambda answer: Request.from_words(answer.split()).body)

    def action_stop(self) -> None:
        rd = self._steerable(action=True)
        if rd:
            self.push_screen(Confirm(f"stop {rd.id}? (it checkpoints and ends; gpctl resume continues it)"),
                             lambda yes: self._send(rd, {"action": "stop"}) if yes else None)

    def action_checkpoint(self) -> None:
        rd = self._steerable(action=True)
        if rd:
            self._send(rd, {"action": "checkpoint"})

    def action_fork(self) -> None:
        """Fork at a checkpoint (the latest, prefilled) with overrides and a name, as `gpctl fork` does."""
        from engine.store.fork import fork
        from gpctl import queue
        rd = self._selected()
        if rd is None:
            return

        def done(answer: str | None) -> None:
            if answer is None:
                return
            try:
                step, lr_time, name, overrides = fork_words(answer.split())
                child = fork(self.home, rd, step=step, lr_time=lr_time, overrides=overrides, name=name)
            except Exception as e:  # noqa: BLE001 - shown, not fatal
                self.notify(f"fork failed: {e}", severity="error")
                return
            queue.enqueue([child], home=self.home)
            queue.ensure_worker(home=self.home)
            self.notify(f"forked {child.id} (queued)")
            self.refresh_data()

        ckpts = rd.list_checkpoints()
        self.push_screen(Ask(f"fork {rd.id}: [--step N | --lr-time T] [--name NAME] k=v … (checkpoints at steps "
                             f"{', '.join(str(st) for st, _ in ckpts[-6:]) or 'none yet'})",
                             f"--step {ckpts[-1][0]} " if ckpts else ""), done)

    @queue_action
    def action_cancel(self) -> None:
        rd = self._selected()
        if rd is None:
            return
        store = JobStore.for_reading(self.home)
        try:
            job = store.get(rd.id)
        finally:
            store.close()
        if job is None or job.state not in ("queued", "running"):   # refuse before the dialog, as d r s t do
            self.notify(f"{rd.id} has no queued or running job to cancel"
                        + (f" (its job is {job.state})" if job else " (it is not in the queue)"), severity="warning")
            return
        self.push_screen(Confirm(f"cancel {rd.id}'s job? (a running one checkpoints and stops)"),
                         lambda yes: self._cancel(rd) if yes else None)

    @queue_action
    def _cancel(self, rd: RunDir) -> None:
        from engine.launch import backends
        store = JobStore(self.home)
        try:
            self.notify(f"{rd.id}: {backends.cancel(store, rd.id)}")   # scancel for a Slurm job
        except KeyError:
            self.notify(f"{rd.id} is not in the queue", severity="warning")
        except (RuntimeError, OSError) as e:                           # sbatch tools missing, a read-only home
            self.notify(f"{rd.id}: {e}", severity="error")
        finally:
            store.close()
        self.refresh_data()

    @queue_action
    def action_resume(self) -> None:
        from gpctl import queue
        from gpctl import runs as ops
        rd = self._selected()
        if rd is None:
            return
        try:
            said = ops.resume_job(self.home, rd)     # what `gpctl resume` does, with its refusals
        except (ConfigError, ValueError) as e:
            self.notify(str(e), severity="warning")
            return
        queue.ensure_worker(home=self.home)
        self.notify(said)
        self.refresh_data()

    def action_enqueue(self) -> None:
        """A preset from a picker, then its overrides (k=v …, as `gpctl run preset NAME --set`)."""
        from engine.presets import list_presets
        from gpctl import queue
        from gpctl import runs as ops

        def enqueue(name: str, answer: str | None) -> None:
            if answer is None:
                return
            overrides = answer.split()
            try:           # a bad override is refused by create_runs, in the words `--set` uses
                rds = ops.create_runs(name, overrides, self.home)
            except Exception as e:  # noqa: BLE001 - one line, not a crash
                self.notify(str(e).splitlines()[0] if str(e) else type(e).__name__, severity="error")
                return
            queue.enqueue(rds, home=self.home)
            queue.ensure_worker(home=self.home)
            self.notify(f"queued {len(rds)} runs of {name}" + (f" with {' '.join(overrides)}" if overrides else ""))
            self.refresh_data()

        def picked(choice: str | None) -> None:
            if choice:
                name = choice.split()[0]
                self.push_screen(Ask(f"enqueue {name}: overrides k=v … (empty: as the preset says)"),
                                 partial(enqueue, name))

        self.push_screen(Pick("enqueue a preset", [f"{p.name}  ({p.figure})" for p in list_presets()]), picked)
