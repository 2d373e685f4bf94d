"""NVIDIA MPS (Multi-Process Service) for jobs that share a GPU (`gpctl worker --jobs-per-gpu N`).

Without MPS the GPU time-slices between processes: each job's kernels run alone in its slice, so
eight batch-32 ResNet-18 jobs, each keeping the GPU ~4 % busy, reached 14.0k img/s together on an
H200 (docs/gpu.md), well short of what their kernels could do side by side. With an MPS control
daemon running, the CUDA driver of every process that starts CUDA connects to one MPS server,
which runs the clients' kernels concurrently. Whether a daemon is there is read from its control
pipe (`$CUDA_MPS_PIPE_DIRECTORY/control`, default /tmp/nvidia-mps): the worker says it at start,
and a run's `start` event records it on CUDA. A daemon listening does not prove that a job's
process connected (a server of another user, a different pipe directory in its environment):
the `start` event records what the job saw; docs/gpu.md says how to start and stop one.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

DEFAULT_PIPE = "/tmp/nvidia-mps"


def mps_pipe(env: dict | None = None) -> Path | None:
    """The MPS pipe directory whose control pipe exists (a FIFO), or None."""
    env = os.environ if env is None else env
    folder = Path(env.get("CUDA_MPS_PIPE_DIRECTORY") or DEFAULT_PIPE)
    try:
        st = os.stat(folder / "control")
    except OSError:
        return None
    return folder if stat.S_ISFIFO(st.st_mode) else None


def mps_line(jobs_per_gpu: int, env: dict | None = None) -> str | None:
    """What a GPU worker packing several jobs per GPU says at start about MPS; None for one per GPU."""
    if jobs_per_gpu <= 1:
        return None
    folder = mps_pipe(env)
    if folder is not None:
        return (f"MPS: a control daemon listens at {folder}/control: the {jobs_per_gpu} jobs sharing each GPU "
                "can run their kernels concurrently (each run's start event records whether it saw it)")
    return (f"MPS: no control daemon at {Path((env if env is not None else os.environ).get('CUDA_MPS_PIPE_DIRECTORY') or DEFAULT_PIPE)}"
            f"/control: the {jobs_per_gpu} jobs sharing each GPU time-slice it; small batches pack better "
            "under MPS (`nvidia-cuda-mps-control -d`, docs/gpu.md)")
