"""DDP on the CPU: two gloo ranks under torchrun train like one process on the whole batch."""
import subprocess
import sys

import pytest
import torch

from engine.train import checkpoint as ckpt
from engine.store.rundir import RunDir
from engine.train.loop import train
from tests.conftest import TINY_LM, tiny

pytestmark = pytest.mark.slow


def torchrun(rd, n=2, *extra):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                           "-m", "engine", "train", str(rd.path), *extra],
                          capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


def test_two_ranks_match_one_process_and_only_rank0_writes(tmp_path):
    cfg = tiny(TINY_LM, "steps=6", "batch_size=8", "micro_batch_size=2", "checkpoint_every=3", "eval_every=3")
    single = RunDir.create(tmp_path, cfg, run_id="single")
    assert train(single) == "done"
    ddp = RunDir.create(tmp_path, cfg, run_id="ddp")
    res = torchrun(ddp)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    a = [r for r in single.metrics()[0] if "loss" in r]
    b = [r for r in ddp.metrics()[0] if "loss" in r]
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]           # one record per step: rank 0 alone writes
    assert [r["samples"] for r in b] == [r["samples"] for r in a]
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-4)
    wa, _ = ckpt.load_weights(single.checkpoint_path(6))
    wb, _ = ckpt.load_weights(ddp.checkpoint_path(6))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    starts = [e for e in ddp.events()[0] if e["event"] == "start"]
    assert len(starts) == 1 and ddp.status()["state"] == "done"
    ends = [e for e in ddp.events()[0] if e["event"] == "end"]      # issue 13: every rank wrote its own end
    assert [(e["state"], e["step"]) for e in ends] == [("done", 6)]


def test_control_request_applies_on_all_ranks_at_a_flush_boundary(tmp_path):
    cfg = tiny(TINY_LM, "steps=8", "batch_size=8", "log_every=2", "eval_every=0")
    rd = RunDir.create(tmp_path, cfg)
    from engine.control import append_request
    append_request(rd, {"id": "x", "set": {"lr": 5e-4}})
    res = torchrun(rd)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    (ack,) = [e for e in rd.events()[0] if e["event"] == "control"]
    assert (ack["id"], ack["status"], ack["step"]) == ("x", "applied", 0)
    assert {r["lr"] for r in rd.metrics()[0] if "loss" in r} == {5e-4}


def test_one_rank_under_torchrun_is_ddp_of_world_one(tmp_path):
    cfg = tiny(TINY_LM, "steps=3", "batch_size=4", "eval_every=0")
    single = RunDir.create(tmp_path, cfg, run_id="single")
    assert train(single) == "done"
    rd = RunDir.create(tmp_path, cfg, run_id="ddp1")
    res = torchrun(rd, 1)
    assert res.returncode == 0, res.stderr[-2000:]
    assert [r["loss"] for r in rd.metrics()[0] if "loss" in r] == pytest.approx(
        [r["loss"] for r in single.metrics()[0] if "loss" in r], rel=1e-5)


def test_compiled_ddp_prewarms_each_ranks_slice_and_matches_one_process(tmp_path):
    """Issue 13: under DDP the compiled model is pre-warmed on each rank's share of every planned
    batch size (all ranks in step, or the gradient all-reduce would hang), and the run still trains
    like one process (dynamo's eager backend: the same graphs and guards, no code generation)."""
    over = ("steps=6", "batch_size=8", "eval_every=3", "compile=true", "compile_backend=eager",
            "changes=[{at_step=3, batch_size=16}]")
    single = RunDir.create(tmp_path, tiny(TINY_LM, *over), run_id="single")
    assert train(single) == "done"
    ddp = RunDir.create(tmp_path, tiny(TINY_LM, *over), run_id="ddp")
    res = torchrun(ddp)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    (warm,) = [e for e in ddp.events()[0] if e["event"] == "prewarm"]
    assert (warm["sizes"], warm["graphs"]) == ([4, 8], 2)           # per rank: 8 / 2 and 16 / 2
    (ends,) = [e for e in ddp.events()[0] if e["event"] == "end"]
    assert ends["graphs"] == 2                                     # none built after the pre-warm
    a = [r["loss"] for r in single.metrics()[0] if "loss" in r]
    b = [r["loss"] for r in ddp.metrics()[0] if "loss" in r]
    assert len(b) == 6 and b == pytest.approx(a, rel=1e-4)


@pytest.mark.parametrize("micro", [2, 4])
def test_two_ranks_record_the_noise_scale_one_process_records(tmp_path, micro):
    """Issue 30: under DDP the noise scale is free too: each rank's micro-batch gradients (micro 2: two
    a rank; micro 4: the rank's whole slice, which one process would see as two micro-batches) are the
    small-batch gradients. Two gloo ranks record the fields one process records on the same global
    batch of 8, and train the same."""
    cfg = tiny(TINY_LM, "steps=6", "batch_size=8", f"micro_batch_size={micro}", "log_every=3", "eval_every=0",
               "checkpoint_every=0")
    single = RunDir.create(tmp_path, cfg, run_id="single")
    assert train(single) == "done"
    ddp = RunDir.create(tmp_path, tiny(TINY_LM, "steps=6", "batch_size=8", f"micro_batch_size={micro}", "log_every=3",
                                       "eval_every=0", "checkpoint_every=0"), run_id="ddp")
    res = torchrun(ddp)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    keys = ("grad_norm", "noise_g2", "noise_tr_sigma", "lr_over_batch")
    b = [r for r in ddp.train_records() if "noise_g2" in r]
    assert [r["step"] for r in b] == [3, 6]
    if micro == 2:        # the same four micro-batches of 2 (rank r reads the r-th half of the batch)
        a = [r for r in single.train_records() if "noise_g2" in r]
        for ra, rb in zip(a, b):
            for k in keys:
                assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-9), k
    else:                 # one process with micro 4 has one gradient per half as well: the same estimate
        one = RunDir.create(tmp_path, tiny(TINY_LM, "steps=6", "batch_size=8", "micro_batch_size=4", "log_every=3",
                                           "eval_every=0", "checkpoint_every=0"), run_id="one4")
        assert train(one) == "done"
        a = [r for r in one.train_records() if "noise_g2" in r]
        for ra, rb in zip(a, b):
            for k in keys:
                assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-9), k
    la = [r["loss"] for r in single.train_records()]
    assert [r["loss"] for r in ddp.train_records()] == pytest.approx(la, rel=1e-4)   # training unchanged


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_localhost_train_like_one_process(tmp_path):
    """Issue 29: two torchrun launchers with --nnodes 2 and a c10d rendezvous (what `nodes = 2` runs on
    each Slurm node) train, over gloo, like one process on the whole batch; rank 0 alone writes."""
    cfg = tiny(TINY_LM, "steps=6", "batch_size=8", "micro_batch_size=2", "checkpoint_every=3", "eval_every=3")
    single = RunDir.create(tmp_path, cfg, run_id="single")
    assert train(single) == "done"
    rd = RunDir.create(tmp_path, cfg, run_id="two-nodes")
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
           f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=gpctl-test", "-m", "engine", "train", str(rd.path)]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    a, b = single.train_records(), rd.train_records()
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6] and [r["samples"] for r in b] == [r["samples"] for r in a]
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-4)
    wa, _ = ckpt.load_weights(single.checkpoint_path(6))
    wb, _ = ckpt.load_weights(rd.checkpoint_path(6))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    starts = [e for e in rd.events()[0] if e["event"] == "start"]
    assert len(starts) == 1 and starts[0].get("world") == 2 and rd.status()["state"] == "done"


def test_the_generated_slurm_script_for_two_nodes_runs_them_through_srun(tmp_path):
    """The job script `nodes = 2` writes, run by bash with `srun` and `scontrol` standing in for Slurm's
    (srun starts the command once per node, here both on this machine): the rendezvous at the first
    node of SLURM_JOB_NODELIST, the port from the job id, two ranks, and one process's records."""
    import os

    from engine.launch.slurm import SlurmOptions, script
    cfg = tiny(TINY_LM, "steps=6", "batch_size=8", "micro_batch_size=2", "eval_every=3", "nodes=2")
    single = RunDir.create(tmp_path, tiny(TINY_LM, "steps=6", "batch_size=8", "micro_batch_size=2", "eval_every=3"),
                           run_id="single")
    assert train(single) == "done"
    rd = RunDir.create(tmp_path, cfg, run_id="slurm-two-nodes")
    job = tmp_path / "slurm.sh"
    job.write_text(script(rd, SlurmOptions(warn=0), resume=False))
    shims = tmp_path / "shims"
    shims.mkdir()
    (shims / "scontrol").write_text('#!/bin/bash\n[ "$1 $2 $3" = "show hostnames n[7-8]" ] || exit 3\n'
                                    'echo 127.0.0.1\necho 127.0.0.2\n')
    (shims / "srun").write_text('#!/bin/bash\necho "srun $*" >> "$SRUN_LOG"\nn=1\n'
                                'while [[ "$1" == --* ]]; do case "$1" in --nodes=*) n="${1#--nodes=}";; esac; shift; done\n'
                                'pids=()\nfor ((i=0; i<n; i++)); do SLURM_NODEID=$i SLURM_PROCID=$i "$@" & pids+=($!); done\n'
                                'rc=0\nfor p in "${pids[@]}"; do wait "$p" || rc=$?; done\nexit $rc\n')
    for f in shims.iterdir():
        f.chmod(0o755)
    port = _free_port()
    while not 20000 <= port < 40000:          # the script takes its port as 20000 + job id % 20000
        port = _free_port()
    env = {**os.environ, "PATH": f"{shims}:{os.environ['PATH']}", "SLURM_JOB_ID": str(port - 20000),
           "SLURM_JOB_NODELIST": "n[7-8]", "OMP_NUM_THREADS": "1", "SRUN_LOG": str(tmp_path / "srun.log")}
    res = subprocess.run(["bash", str(job)], env=env, capture_output=True, text=True, timeout=300)
    log = (rd.path / "log.txt").read_text()
    assert res.returncode == 0, log[-3000:]
    (call,) = (tmp_path / "srun.log").read_text().splitlines()
    assert call == (f"srun --nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=1 {sys.executable} -m torch.distributed.run "
                    f"--nnodes=2 --nproc_per_node=1 --rdzv_backend=c10d --rdzv_endpoint=127.0.0.1:{port} "
                    f"--rdzv_id={port - 20000} -m engine train {rd.path}")
    a, b = single.train_records(), rd.train_records()
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-4)
    starts = [e for e in rd.events()[0] if e["event"] == "start"]
    assert len(starts) == 1 and starts[0].get("world") == 2 and rd.status()["state"] == "done"
