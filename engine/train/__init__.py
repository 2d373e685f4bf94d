"""The training layer: one run's process (torch).

    loop.py         the Trainer: setup, the step loop, evals, control at step boundaries, the end
    checkpoint.py   weights and optimizer state in safetensors (written atomically, read without pickle)
    distributed.py  DDP: ranks, broadcast of control lines, the leader that alone writes records
    mps.py          NVIDIA MPS for jobs that share a GPU: is a control daemon there (no torch)
"""
