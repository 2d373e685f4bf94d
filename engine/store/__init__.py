"""The store layer: a home's files and its queue (no torch; imports engine.fs and engine.config only).

    rundir.py    a run directory: config, status, records (metrics/events), checkpoints' names, logs
    jobs.py      jobs.db: the queue (SQLite, WAL), claimed by workers, read by every command
    ckptmeta.py  a checkpoint's safetensors header, read without torch
    fork.py      a new run from another's checkpoint (files only: the trainer loads it)
"""
