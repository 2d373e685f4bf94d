"""The control layer: what passes between a run and its user (no torch; imports engine.store only).

    request.py   a request: validated, conditioned, applied at a step boundary, described in words
    reader.py    the run's side: reads control.jsonl, bounded and guarded, under the trust rule
    client.py    people's and tools' side: append a request, wait for its answer
    notify.py    a run's end (or stall) told to its user's command

The control file: requests to a running job, applied at step boundaries and answered in events.

    control.jsonl, one JSON object per line, appended by people and tools:
        {"id": "a1b2", "set": {"lr": 0.005}}
        {"set": {"batch_size": 512}}
        {"set": {"lr": 6e-4}, "ramp": 100}          reach it linearly over 100 LR-normalized steps
        {"action": "checkpoint"}                     checkpoint at the next boundary
        {"action": "stop"}                           checkpoint, then end cleanly (state "stopped")

The loop polls at the first step boundary `control.poll_ms` after its last poll. A poll is one fstat(); the file is read only when its size, mtime
or inode changed, and only from the byte offset already consumed. Each complete line is applied
once, in order; a line without its newline yet is left for the next poll. Every line is answered
in events.jsonl with {"event": "control", "id", "line", "status": "applied" | "rejected", ...} and
the step, samples and lr_time where it took effect, or the reason it was rejected.

One `Request` (below) is the protocol: it validates itself against a run's config, knows when a
conditional one (at_step / at_lr_time / when) may apply, applies itself to the trainer, and its
answer reads as a sentence (`describe`). The trainer, the CLI and the TUI all use it; the CLI and
the TUI check a request with it before they write. No content of the file can end a run: lines over
MAX_LINE bytes are rejected by size, undecodable or unparsable ones with a reason.

Combination with the preset's schedule: a manual lr replaces the scheduled lr from then on (the
schedule's shape and its planned lr changes no longer apply; the event says so). Manual and
planned batch-size changes both apply, in the order they come.

Trust: the file must be owned by the run's user and writable by nobody else. If its owner or mode
changes, the lines that arrive are rejected ("untrusted") and the run goes on.
Rewrites: if the file shrinks, gets a new inode, or the bytes already consumed change (an editor
saved over it), the event "control_rewritten" reports it and the lines then present are skipped —
never re-applied; new lines appended after that are read as usual.
"""
from __future__ import annotations

from engine.control.client import append_request, wait_for_ack
from engine.control.reader import (MAX_LINE, MAX_READ, REWRITE_SCAN, TAIL, ControlReader, ControlState, Line,
                                   parents_untrusted, run_dir_untrusted, untrusted_reason)
from engine.control.request import (ACTIONS, BATCH_FACTOR, CONDITIONS, LOSS_EMA, LR_FACTOR, RAISE_RAMP, MAX_WAITING, QUOTE,
                                    REQUEST_KEYS, SET_KEYS, WHEN_KEYS, ControlError, Request, changed_text, condition_met,
                                    describe, event_text, expired, kept, parse_when, parse_words,
                                    request_id, validate)

__all__ = ["ACTIONS", "BATCH_FACTOR", "CONDITIONS", "LOSS_EMA", "LR_FACTOR", "RAISE_RAMP", "MAX_LINE", "MAX_READ", "MAX_WAITING",
           "QUOTE", "REQUEST_KEYS", "REWRITE_SCAN", "SET_KEYS", "TAIL", "WHEN_KEYS", "ControlError",
           "ControlReader", "ControlState", "Line", "Request", "append_request", "changed_text", "condition_met", "describe",
           "event_text", "expired", "kept", "parents_untrusted", "parse_when", "parse_words", "request_id",
           "run_dir_untrusted", "untrusted_reason", "validate", "wait_for_ack"]
