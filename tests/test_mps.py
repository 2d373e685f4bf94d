"""Issue 29: NVIDIA MPS for `--jobs-per-gpu`. Whether a control daemon listens is read from its
control pipe (a FIFO in $CUDA_MPS_PIPE_DIRECTORY, default /tmp/nvidia-mps): a FIFO made here stands
in for the daemon's; a regular file or a folder of that name, or no such path, is no daemon."""
import os

from engine.train.mps import mps_line, mps_pipe


def test_a_control_fifo_is_a_daemon_and_anything_else_is_not(tmp_path):
    env = {"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path / "mps")}
    assert mps_pipe(env) is None                                  # no folder
    (tmp_path / "mps").mkdir()
    assert mps_pipe(env) is None                                  # no control pipe
    (tmp_path / "mps" / "control").write_text("")
    assert mps_pipe(env) is None                                  # a regular file is not the daemon's pipe
    os.remove(tmp_path / "mps" / "control")
    os.mkfifo(tmp_path / "mps" / "control")
    assert mps_pipe(env) == tmp_path / "mps"


def test_the_worker_line_says_whether_packed_jobs_time_slice(tmp_path):
    env = {"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path)}
    assert mps_line(1, env) is None                                # one job per GPU: nothing to say
    assert mps_line(8, env) == (f"MPS: no control daemon at {tmp_path}/control: the 8 jobs sharing each GPU "
                                "time-slice it; small batches pack better under MPS (`nvidia-cuda-mps-control -d`, "
                                "docs/gpu.md)")
    os.mkfifo(tmp_path / "control")
    assert mps_line(8, env) == (f"MPS: a control daemon listens at {tmp_path}/control: the 8 jobs sharing each GPU "
                                "can run their kernels concurrently (each run's start event records whether it saw it)")


def test_with_mps_starts_a_daemon_of_its_own_runs_the_command_under_it_and_stops_it(tmp_path):
    """benchmarks/with_mps.sh with a stand-in nvidia-cuda-mps-control on PATH (the real one needs a
    GPU): `-d` makes the control FIFO, `quit` on stdin removes it. The command sees the daemon through
    mps_pipe (what the engine's start event records); without the tool it exits 3 and runs nothing."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    shim = tmp_path / "bin" / "nvidia-cuda-mps-control"
    shim.parent.mkdir()
    shim.write_text('#!/bin/sh\nif [ "$1" = "-d" ]; then mkfifo "$CUDA_MPS_PIPE_DIRECTORY/control"; '
                    'echo started > "$CUDA_MPS_LOG_DIRECTORY/control.log"; exit 0; fi\n'
                    'read cmd; [ "$cmd" = quit ] && rm "$CUDA_MPS_PIPE_DIRECTORY/control"\n')
    shim.chmod(0o755)
    probe = [sys.executable, "-c", "from engine.train.mps import mps_pipe; import os; "
             "print(mps_pipe(), os.environ['CUDA_MPS_PIPE_DIRECTORY'])"]
    env = {**os.environ, "PATH": f"{shim.parent}:{os.environ['PATH']}", "PYTHONPATH": str(root)}
    res = subprocess.run(["bash", str(root / "benchmarks/with_mps.sh"), *probe], capture_output=True, text=True,
                         env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    seen, pipe = res.stdout.split()
    assert seen == pipe and pipe.startswith("/tmp/gpctl-mps.")
    assert not Path(pipe).exists()                                   # stopped and cleaned up
    assert "started" in res.stderr                                   # the daemon's log, shown
    env["PATH"] = "/usr/bin:/bin"
    res = subprocess.run(["bash", str(root / "benchmarks/with_mps.sh"), "touch", str(tmp_path / "ran")],
                         capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 3 and "nvidia-cuda-mps-control not found" in res.stderr
    assert not (tmp_path / "ran").exists()
