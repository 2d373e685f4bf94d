"""The launch layer: where and when runs train.

    backends.py  the contract a launcher meets (local worker, Slurm)
    worker.py    a local worker: claims jobs from jobs.db, runs `python -m engine train`, records ends
    slurm.py     sbatch scripts from quoted, validated values; job ids and states from squeue/sacct
"""
