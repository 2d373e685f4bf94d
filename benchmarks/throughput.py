"""Training throughput of the engine's real training loop on this machine's accelerator.

    python benchmarks/throughput.py resnet   # ResNet-18, CIFAR-5m-shaped parts held on the GPU, batch 512, bf16,
                                             # crop + flip as the Fig. 4 presets use them
    python benchmarks/throughput.py gpt2     # GPT-2 124M (vocab padded to 50304), seq 2048, bf16, SDPA, tokens
                                             # read from prepared uint16 shards (engine/data/tokens.py)
    ... --compile  --steps N  --batch B  --device cpu --small   (a quick CPU smoke run of the same path)
    ... --concurrent K    K processes of this benchmark at once on one GPU (does --jobs-per-gpu pay?)

Prints one JSON line: img/s or tok/s over the timed steps (after warm-up, compile included in the
warm-up), timed on the wall clock between two device syncs and with CUDA events; the model FLOP
utilization against a dense bf16 peak of 989 TFLOP/s (H100/H200 SXM) at 3.33 GFLOP/img and
0.98 GFLOP/token; host syncs in the timed steps (torch.cuda sync debug mode, counted); graphs compiled;
and `stream_rate`: samples (tokens) per second of the data stream alone, to show the data path is not
the limit.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from engine.config import build  # noqa: E402
from engine.store.rundir import RunDir  # noqa: E402
from engine.train.loop import Trainer, compiled_graphs  # noqa: E402

PEAK_BF16 = 989e12
FLOPS = {"resnet": 3.33e9, "gpt2": 0.98e9}   # fwd+bwd per image / per token, at full size
STREAM_TOKENS = 64 * 2048                    # the stream alone is timed on reads of the full model's batch


def make_parts(folder: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(2):
        np.savez(folder / f"part{i}.npz", X=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                 Y=rng.integers(0, 10, n))


def make_token_shards(folder: Path, tokens: int, vocab: int, seq: int) -> Path:
    """Prepared shards (the real format and reader) holding random tokens below `vocab`; the tokenizer
    they name is a small BPE trained here (the machine may be offline), so its fingerprint matches."""
    from tokenizers import ByteLevelBPETokenizer

    from engine.data.c4 import load_tokenizer
    from engine.data.tokens import shard_name, write_meta, write_shard

    tok_dir = folder / "tok"
    tok_dir.mkdir(parents=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["throughput benchmark tokens"] * 4, vocab_size=260, min_frequency=1,
                            special_tokens=["<|endoftext|>"])
    bpe.save_model(str(tok_dir))
    tok = load_tokenizer(str(tok_dir))
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", tokens), ("validation", 8 * seq)):
        k, shards = 0, []
        for lo in range(0, n, 50_000_000):
            m = min(n - lo, 50_000_000)
            write_shard(folder / shard_name(split, k), rng.integers(0, vocab, m, dtype=np.uint16))
            shards.append({"file": shard_name(split, k), "tokens": m})
            k += 1
        splits[split] = {"documents": 0, "tokens": n, "shards": shards}
    write_meta(folder, tok, str(tok_dir), "random", splits)
    return tok_dir


def config(which: str, tmp: Path, args) -> dict:
    common = {"name": which, "preset": "throughput", "steps": args.steps, "eval_every": 0,
              "log_every": 10, "device": args.device,
              "compile": {"true": True, "false": False}.get(args.compile, args.compile)}
    if which == "resnet":
        folder = tmp / "c5m"
        folder.mkdir()
        batch = args.batch or (32 if args.small else 512)
        make_parts(folder, max(4096 if args.small else 8192, batch * args.steps // 2 + 1024))
        return {**common, "lr": 0.05, "batch_size": batch,
                "model": {"name": "resnet18", "width": 8 if args.small else 64},
                "data": {"source": "cifar5m", "path": str(folder), "eval_samples": 64,
                         "hold": "host",      # what "auto" gives a full CIFAR-5m (18.4 GB); the small
                         "augment": ["crop", "flip"]}}     # set here would go on the device (--set data.hold=...)
    small = {"n_layer": 2, "n_head": 2, "n_embd": 64, "vocab_size": 512, "n_positions": 128}
    full = {"n_layer": 12, "n_head": 12, "n_embd": 768, "vocab_size": 50304, "n_positions": 2048}
    seq = 128 if args.small else 2048
    batch = args.batch or (4 if args.small else 64)
    micro = 4 if args.small else min(batch, args.micro)
    folder = tmp / "shards"
    folder.mkdir()
    tok_dir = make_token_shards(folder, max(batch * seq * (args.steps + 8), 2 * STREAM_TOKENS),
                                50257 if not args.small else small["vocab_size"], seq)
    return {**common, "lr": 6e-4, "batch_size": batch, "micro_batch_size": micro,
            "model": {"name": "gpt2", **(small if args.small else full)},
            "data": {"source": "c4", "path": str(folder), "tokenizer": str(tok_dir), "seq_len": seq,
                     "eval_samples": 4},
            "optim": {"name": "adamw", "grad_clip": 1.0}}


def stream_rate(trainer: Trainer, batch: int, seconds: float = 2.0) -> float:
    """Samples per second the data stream alone delivers to the device (batches of `batch`)."""
    s, cuda = trainer.stream, trainer.device.type == "cuda"
    saved = s.state_dict()
    s.load_state_dict({"position": 0})
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        try:
            x, _ = s.next_batch(batch)
        except Exception:   # noqa: BLE001 - ran out of prepared tokens: rate over what was read
            break
        n += batch
    if cuda:
        torch.cuda.synchronize()
    rate = n / (time.perf_counter() - t0)
    s.load_state_dict(saved)
    return rate


def measure(which: str, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        from engine.config import apply_overrides
        cfg = build(apply_overrides(config(which, Path(tmp), args), args.set), "throughput")
        rd = RunDir.create(Path(tmp) / "home", cfg)
        t = Trainer(rd, cfg)
        t.setup(resume=False)
        t.save_checkpoint = lambda: None
        t.evaluate = lambda: {}
        cuda = t.device.type == "cuda"
        clock = {}
        graphs0 = compiled_graphs()

        def timer(tr):
            if tr.step == args.warmup:      # compile and cuDNN autotuning happened in the warm-up steps
                if cuda:
                    torch.cuda.synchronize()
                if args.barrier:
                    _barrier(args.barrier, args.barrier_n)
                if cuda:
                    clock["ev0"] = torch.cuda.Event(enable_timing=True)
                    clock["ev0"].record()
                    torch.cuda.set_sync_debug_mode("warn")
                clock["t0"], clock["s0"] = time.perf_counter(), tr.samples
        t.hooks.append(timer)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t.run()    # its last flush waits for the device
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
                ev1 = torch.cuda.Event(enable_timing=True)
                ev1.record()
                torch.cuda.synchronize()
        t1 = time.perf_counter()
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        samples = t.samples - clock["s0"]
        steps = t.step - args.warmup
        per_s = samples / (t1 - clock["t0"])
        ev_s = samples / (clock["ev0"].elapsed_time(ev1) / 1000) if cuda else None
        unit = "img/s" if which == "resnet" else "tok/s"
        full = not args.small
        if args.profile:
            profile(t, cfg.batch_size)
        read = max(cfg.batch_size, STREAM_TOKENS // cfg.data.seq_len) if cfg.is_lm else cfg.batch_size
        rate_stream = stream_rate(t, read) * t.tokens_per_sample
        return {"bench": which, "set": args.set, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
                "precision": t.precision, "compile": t.compiled and t.compile_mode, "compile_why": t.compile_why, "batch": cfg.batch_size,
                "micro": cfg.micro_batch_size, "hold": None if cfg.is_lm else cfg.data.hold,
                "attention": cfg.model.attention if cfg.is_lm else None,
                "rate": round(per_s, 1), "rate_cuda_events": round(ev_s, 1) if ev_s else None, "unit": unit,
                "mfu_bf16_989": round(per_s * FLOPS[which] / PEAK_BF16, 4) if full else None,
                "stream_rate": round(rate_stream, 1),
                "host_syncs": len(syncs) if cuda else None,   # in the timed steps and the final flush
                "graphs": compiled_graphs() - graphs0, "steps_timed": steps,
                "final_loss": t.last_record.get("loss"),
                "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None}


def profile(t: Trainer, batch: int, steps: int = 5) -> None:
    """Where a step's time goes: the top kernels by device time and the CPU time of the same steps
    (a step whose CPU time exceeds its device time is dispatch-bound). Printed to stderr."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if t.device.type == "cuda" else [])
    with torch_profile(activities=acts) as prof:
        for _ in range(steps):
            t._train_step(batch)
        if t.device.type == "cuda":
            torch.cuda.synchronize()
    sort = "cuda_time_total" if t.device.type == "cuda" else "cpu_time_total"
    print(f"== profile: {t.cfg.name} batch {batch}, {steps} steps, compile {t.compiled and t.compile_mode}", file=sys.stderr)
    print(prof.key_averages().table(sort_by=sort, row_limit=18, max_name_column_width=60), file=sys.stderr)


def _barrier(folder: str, n: int, timeout: float = 60.0) -> None:
    Path(folder, f"ready.{os.getpid()}").touch()
    t0 = time.perf_counter()
    while len(list(Path(folder).glob("ready.*"))) < n and time.perf_counter() - t0 < timeout:
        time.sleep(0.01)


def concurrent(args) -> dict:
    """K copies of this benchmark on one GPU at once, timed over the same window (a file barrier
    after each one's warm-up): the aggregate rate says whether packing jobs on a GPU pays."""
    with tempfile.TemporaryDirectory() as bar:
        cmd = [sys.executable, __file__, args.which, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--device", args.device, "--barrier", bar, "--barrier-n", str(args.concurrent)]
        cmd += [f"--set={item}" for item in args.set]
        cmd += (["--batch", str(args.batch)] if args.batch else []) + [f"--compile={args.compile}"] + \
            (["--small"] if args.small else [])
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(args.concurrent)]
        outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    from engine.train.mps import mps_pipe
    mps = mps_pipe() is not None          # an MPS control daemon in this environment (benchmarks/with_mps.sh)
    return {"bench": f"{args.which} x{args.concurrent}{' mps' if mps else ''}", "batch": outs[0]["batch"],
            "unit": outs[0]["unit"], "rate": round(sum(o["rate"] for o in outs), 1),
            "per_job": [o["rate"] for o in outs], "compile": args.compile, "mps": mps}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("which", choices=["resnet", "gpt2"])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--batch", type=int, default=0, help="batch size (default: 512 images, 64 sequences)")
    ap.add_argument("--micro", type=int, default=16, help="GPT-2 micro-batch (sequences per forward)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--compile", nargs="?", const="true", default="false", choices=["true", "false", "auto"],
                    help="torch.compile: --compile (true), --compile=auto (what the presets run), default false")
    ap.add_argument("--small", action="store_true", help="tiny sizes: a CPU smoke run of the same path")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key (channels_last=false, compile_mode=\"reduce-overhead\")")
    ap.add_argument("--profile", action="store_true", help="print a profile of 5 more steps to stderr")
    ap.add_argument("--concurrent", type=int, default=0, help="run K copies at once; report the aggregate")
    ap.add_argument("--barrier", default="", help=argparse.SUPPRESS)
    ap.add_argument("--barrier-n", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.steps <= args.warmup:
        ap.error(f"--steps must be above --warmup ({args.warmup})")
    print(json.dumps(concurrent(args) if args.concurrent else measure(args.which, args)), flush=True)


if __name__ == "__main__":
    main()
