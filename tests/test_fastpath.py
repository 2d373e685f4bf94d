"""Issue 13: the GPU fast path, checked on the CPU where the CPU can check it.

- a steady-state window of training steps does no host sync (no .item/.tolist/.cpu/float/bool);
- torch.compile across a planned batch change builds the graphs the policy says, and eval adds none;
- prepared uint16 token shards stream token for token what the raw-text C4 stream gives;
- DDP ranks read their own slice of a batch (augmentation included); a batch that does not divide
  among the ranks is refused;
- the control file is checked by time, not every step, and where a request applied is recorded.
"""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from engine.data import build_stream
from engine.store.rundir import RunDir
from engine.train.loop import compile_policy, train
from tests.conftest import TINY_IMAGES, TINY_LM, tiny
from tests.test_data import _c4_cfg, _c4_folder

CPU = torch.device("cpu")
SYNCS = ("item", "tolist", "cpu", "numpy", "__float__", "__bool__", "__int__")


class SyncDetector:
    """Counts calls of the Tensor methods that move a value to the host (a device sync on CUDA)
    while `on` is set; installed by a trainer hook so it covers whole steps, data included."""

    def __init__(self, monkeypatch, start: int, stop: int):
        self.calls, self.devices, self.on, self.start, self.stop = [], [], False, start, stop
        for name in SYNCS:
            orig = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, orig))

    def _wrap(self, name, orig):
        def wrapped(t, *a, **k):
            if self.on:
                import traceback
                self.calls.append((name, traceback.format_stack(limit=4)[-2].strip()))
                self.devices.append(t.device.type)
            return orig(t, *a, **k)
        return wrapped

    def hook(self, trainer):
        self.on = self.start <= trainer.step < self.stop


def _cifar_parts(folder, n=512):
    folder.mkdir()
    rng = np.random.default_rng(0)
    np.savez(folder / "part0.npz", X=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), Y=rng.integers(0, 10, n))
    return folder


@pytest.mark.parametrize("which", ["cifar_sgd", "cifar_host", "gpt2_adamw"])
def test_steady_state_steps_do_no_host_sync(tmp_path, monkeypatch, which):
    if which.startswith("cifar"):   # CIFAR-5m held in memory, crop + flip, momentum SGD with clipping
        cfg = tiny(TINY_IMAGES, "data.source=\"cifar5m\"", f"data.path=\"{_cifar_parts(tmp_path / 'c5m')}\"",
                   "data.image_size=32", "data.augment=[\"crop\", \"flip\"]", "data.eval_samples=32",
                   "steps=30", "log_every=100", "eval_every=0", "optim.grad_clip=1.0",
                   f'data.hold="{"device" if which == "cifar_sgd" else "host"}"')
    else:                      # GPT-2 on uniform tokens, fused AdamW (non-fused AdamW reads each step count)
        cfg = tiny(TINY_LM, "steps=30", "log_every=100", "eval_every=0", "data.teacher_sharpness=0.0",
                   "optim.fused=\"on\"")
    det = SyncDetector(monkeypatch, 5, 25)
    rd = RunDir.create(tmp_path / "h", cfg)
    assert train(rd, hooks=[det.hook]) == "done", rd.log_file.read_text()[-2000:]
    if which == "cifar_host":   # the host-held set gathers on the host, from indices drawn on the host:
        # .cpu()/.numpy() of host tensors, which sync nothing (on CUDA, too: its indices never leave the CPU)
        assert det.calls and set(det.devices) == {"cpu"}
        assert {(n, c.splitlines()[0].split(", in ")[-1]) for n, c in det.calls} == {("cpu", "get"), ("numpy", "get")}
        assert all("engine/data/images.py" in c for _, c in det.calls)
        return
    assert det.calls == []
    # negative control: the same window with a flush inside it (log_every 10) is caught
    det2 = SyncDetector(monkeypatch, 5, 25)
    rd2 = RunDir.create(tmp_path / "h", tiny(TINY_LM, "steps=30", "log_every=10", "eval_every=0",
                                              "data.teacher_sharpness=0.0", "optim.fused=\"on\"", name="ctl"))
    assert train(rd2, hooks=[det2.hook]) == "done"
    assert {name for name, _ in det2.calls} >= {"tolist"}


def _eager_compile(monkeypatch):
    """torch.compile with dynamo's eager backend: real tracing, guards and recompiles, no C++ codegen
    (inductor on 2 CPU cores would take minutes); the GPU check compiles with inductor."""
    import torch._dynamo
    torch._dynamo.reset()
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: real(m, **{**kw, "backend": "eager"}))


def test_compile_across_a_planned_batch_change_builds_one_graph_per_size(tmp_path, monkeypatch):
    _eager_compile(monkeypatch)
    cfg = tiny(TINY_LM, "compile=true", "steps=8", "batch_size=4", "eval_every=2", "log_every=2",
               "changes=[{at_step=4, batch_size=8}]")
    assert compile_policy(cfg) == {"dynamic": False, "recompile_limit": 10}
    rd = RunDir.create(tmp_path, cfg)
    assert train(rd) == "done", rd.log_file.read_text()[-2000:]
    end = [e for e in rd.events()[0] if e["event"] == "end"][0]
    assert end["graphs"] == 2          # batch 4, batch 8; four evals (batch 4 of 8 samples) add none
    # negative control: evaluating through the compiled module (the old path) adds graphs
    torch._dynamo.reset()
    rd2 = RunDir.create(tmp_path, tiny(TINY_LM, "compile=true", "steps=8", "batch_size=4", "eval_every=2",
                                       "log_every=2", "changes=[{at_step=4, batch_size=8}]", "data.eval_samples=6",
                                       name="old"))

    def eval_compiled(t):
        t.eval_fwd = t.fwd
    assert train(rd2, hooks=[eval_compiled]) == "done"
    end2 = [e for e in rd2.events()[0] if e["event"] == "end"][0]
    assert end2["graphs"] > 2


def _prepare(folder, tok_dir, out, shard_tokens):
    from engine.data.c4 import documents, load_tokenizer
    from engine.data.tokens import prepare, write_meta
    from engine.config import DataConfig

    tok = load_tokenizer(str(tok_dir))
    dc = DataConfig(source="c4", path=str(folder))
    splits = {s: prepare(documents(dc, s), tok, out, s, shard_tokens=shard_tokens, batch_docs=7)
              for s in ("train", "validation")}
    return write_meta(out, tok, str(tok_dir), str(folder), splits)


def test_prepared_shards_stream_equals_raw_text_token_for_token(tmp_path, tokenizer_dir):
    raw = _c4_folder(tmp_path)
    meta = _prepare(raw, tokenizer_dir, tmp_path / "prep", shard_tokens=100)   # many shards: reads cross them
    assert len(meta["splits"]["train"]["shards"]) > 5 and meta["splits"]["train"]["documents"] == 60
    a = build_stream(_c4_cfg(raw, tokenizer_dir), CPU)
    b = build_stream(_c4_cfg(tmp_path / "prep", tokenizer_dir), CPU)
    assert type(b.source).__name__ == "PreparedTokens"
    for n in (3, 5, 1, 7):
        xa, xb = a.next_batch(n)[0], b.next_batch(n)[0]
        assert xb.dtype == xa.dtype and torch.equal(xa, xb)
    assert torch.equal(next(a.eval_batches(4))[0], next(b.eval_batches(4))[0])
    # resume from the stream position
    c = build_stream(_c4_cfg(tmp_path / "prep", tokenizer_dir), CPU)
    c.load_state_dict(json.loads(json.dumps(b.state_dict())))
    assert torch.equal(c.next_batch(4)[0], a.next_batch(4)[0])
    # negative control: a shard stream of another tokenization differs
    other = _prepare(raw, tokenizer_dir, tmp_path / "prep2", shard_tokens=100)
    x = np.memmap(tmp_path / "prep2" / other["splits"]["train"]["shards"][0]["file"], dtype=np.uint16, mode="r+",
                  offset=1024)
    x[5] = (int(x[5]) + 1) % 300
    x.flush()
    d = build_stream(_c4_cfg(tmp_path / "prep2", tokenizer_dir), CPU)
    assert not torch.equal(d.next_batch(1)[0], build_stream(_c4_cfg(raw, tokenizer_dir), CPU).next_batch(1)[0])


def test_prepared_shards_refuse_another_tokenizer_and_a_cut_shard(tmp_path, tokenizer_dir):
    from tokenizers import ByteLevelBPETokenizer

    from engine.data import DataMissing

    raw = _c4_folder(tmp_path)
    meta = _prepare(raw, tokenizer_dir, tmp_path / "prep", shard_tokens=10_000)
    other = tmp_path / "tok2"
    other.mkdir()
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["a b c d e f g"] * 10, vocab_size=270, min_frequency=1, special_tokens=["<|endoftext|>"])
    bpe.save_model(str(other))
    with pytest.raises(DataMissing, match=r"prep: prepared with tokenizer .* but data.tokenizer loads another"):
        build_stream(_c4_cfg(tmp_path / "prep", other), CPU)
    shard = tmp_path / "prep" / meta["splits"]["train"]["shards"][0]["file"]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 10)
    with pytest.raises(DataMissing, match=r"header says \d+ tokens but the file holds \d+ \(cut short\?\)"):
        build_stream(_c4_cfg(tmp_path / "prep", tokenizer_dir), CPU)


def test_gpctl_data_prepare_c4_then_train_on_it(tmp_path, tokenizer_dir):
    raw = _c4_folder(tmp_path)
    out = tmp_path / "prep"
    cmd = [sys.executable, "-m", "gpctl", "data", "prepare", "c4", "--path", str(raw), "--tokenizer",
           str(tokenizer_dir), "--out", str(out), "--shard-tokens", "500"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    meta = json.loads((out / "meta.json").read_text())
    t, v = meta["splits"]["train"], meta["splits"]["validation"]
    assert lines[0] == f"train: 60 documents, {t['tokens']} tokens in {len(t['shards'])} shard(s)"
    assert lines[1] == f"validation: 20 documents, {v['tokens']} tokens in {len(v['shards'])} shard(s)"
    assert sum(s["tokens"] for s in t["shards"]) == t["tokens"] and max(s["tokens"] for s in t["shards"]) == 500
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2
    assert again.stderr.strip() == f"error: {out}: already holds prepared shards (meta.json); choose another --out"
    rd = RunDir.create(tmp_path / "h", _c4_cfg(out, tokenizer_dir, "steps=4"))
    assert train(rd) == "done", rd.log_file.read_text()[-2000:]


def test_ddp_rank_slices_equal_the_whole_batch_with_augmentation(tmp_path):
    cfg = tiny(TINY_IMAGES, "data.source=\"cifar5m\"", f"data.path=\"{_cifar_parts(tmp_path / 'c5m', 64)}\"",
               "data.image_size=32", "data.augment=[\"crop\", \"flip\"]", "data.eval_samples=8")
    whole = build_stream(cfg, CPU)
    ranks = [build_stream(cfg, CPU) for _ in range(4)]
    for n in (8, 16, 4):
        x, y = whole.next_batch(n)
        parts = [s.next_batch(n, part=(r, 4)) for r, s in enumerate(ranks)]
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
    assert {s.position for s in ranks} == {whole.position}
    with pytest.raises(ValueError, match="batch of 6 does not divide among 4 ranks"):
        whole.next_batch(6, part=(0, 4))


def test_ddp_batch_that_does_not_divide_is_refused(tmp_path):
    from tests.test_ddp import torchrun
    cfg = tiny(TINY_LM, "steps=4", "batch_size=8", "changes=[{at_step=2, batch_size=7}]")
    rd = RunDir.create(tmp_path, cfg)
    res = torchrun(rd)
    assert res.returncode != 0
    assert rd.status()["state"] == "failed"
    assert rd.status()["error"] == ("ValueError: batch_size 7 does not divide among 2 ranks (gpus = 1): "
                                    "every batch size of the run must be a multiple of it")
    assert [e["event"] for e in rd.events()[0]] == ["error"]   # rank 0 alone wrote it, before any start


def test_control_file_is_checked_by_time_and_the_step_is_recorded(tmp_path, monkeypatch):
    import engine.train.loop as train_mod

    clock = {"t": 0}

    def now():   # 10 ms per step boundary
        clock["t"] += 1
        return (clock["t"] - 1) / 100
    monkeypatch.setattr(train_mod, "_now", now)

    def at(step, line):
        def hook(t):
            if t.step == step:
                with open(t.rd.control_file, "a") as f:
                    f.write(line + "\n")
        return hook
    applied = {}
    for poll_ms in (0, 100):
        clock["t"] = 0
        cfg = tiny(TINY_IMAGES, "steps=20", f"control.poll_ms={poll_ms}", name=f"p{poll_ms}")
        rd = RunDir.create(tmp_path, cfg)
        assert train(rd, hooks=[at(3, '{"id": "x", "set": {"lr": 0.02}}')]) == "done"
        ev = [e for e in rd.events()[0] if e["event"] == "control" and e.get("status") == "applied"]
        applied[poll_ms] = ev[0]["step"]
        assert [r["lr"] for r in rd.metrics()[0] if "loss" in r][applied[poll_ms]] == 0.02
    # written by a hook during step 3's boundary (after that boundary's check): read at the next check,
    # the next boundary with poll_ms 0; with 100 ms, boundaries 0, 10, 20 (10 ms apart) check the file
    assert applied == {0: 4, 100: 10}


def test_gpt2_forward_equals_transformers_and_is_causal():
    """Our forward skips transformers' mask preparation (a host sync); it must still be GPT2LMHeadModel."""
    from engine.config import ModelConfig
    from engine.models import build_model

    torch.manual_seed(0)
    m = build_model(ModelConfig(name="gpt2", n_layer=3, n_head=2, n_embd=16, vocab_size=64, n_positions=32)).eval()
    tokens = torch.randint(0, 64, (3, 20))
    with torch.no_grad():
        ours, theirs = m(tokens), m.hf(input_ids=tokens).logits
        assert torch.allclose(ours, theirs, atol=1e-5)
        changed = tokens.clone()
        changed[:, 12] = (changed[:, 12] + 1) % 64        # a later token never changes earlier logits
        again = m(changed)
    assert torch.equal(again[:, :12], ours[:, :12]) and not torch.allclose(again[:, 12:], ours[:, 12:])
    # negative control: shifted positions are a different model
    body = m.hf.transformer
    with torch.no_grad():
        h = body.wte(tokens) + body.wpe(torch.arange(1, 21))
        for block in body.h:
            out = block(h)
            h = out[0] if isinstance(out, tuple) else out
        assert not torch.allclose(m.hf.lm_head(body.ln_f(h)), theirs, atol=1e-3)


@pytest.mark.parametrize("splits", [
    {"train": {"shards": [{"file": "../../etc/passwd", "tokens": 5}]}},
    {"train": {"shards": [{"file": "/etc/passwd", "tokens": 5}]}},
    {"train": {"shards": "c4_train_000000.bin"}},
    {"train": [1, 2]},
    {"train": {"shards": [{"file": 7}]}},
])
def test_a_hostile_meta_json_is_one_line_and_reads_nothing_outside(tmp_path, tokenizer_dir, splits):
    from engine.data import DataMissing

    raw = _c4_folder(tmp_path)
    meta = _prepare(raw, tokenizer_dir, tmp_path / "prep", shard_tokens=10_000)
    (tmp_path / "prep" / "meta.json").write_text(json.dumps(dict(meta, splits=splits)))
    with pytest.raises(DataMissing) as e:
        build_stream(_c4_cfg(tmp_path / "prep", tokenizer_dir), CPU)
    assert str(e.value) == (f"{tmp_path / 'prep' / 'meta.json'}: split 'train' does not list its shards as plain "
                            f"file names in this folder")


def _records(rd):
    return [{k: v for k, v in r.items() if k != "wall"} for r in rd.metrics()[0]]


def test_prewarm_compiles_every_planned_size_before_step_one_and_changes_nothing(tmp_path, monkeypatch):
    """Issue 13: compile's shapes are pre-warmed, so the noise drop at step 4 does not wait for the
    compiler; the pre-warm (on held-out batches) leaves batch-norm statistics, gradients and RNG as
    they were: the records equal those of a run compiled as it goes."""
    from engine.train import loop as train_mod
    _eager_compile(monkeypatch)
    over = ("compile=true", "steps=8", "batch_size=4", "eval_every=2", "log_every=2",
            "changes=[{at_step=4, batch_size=8}]")
    seen = []

    def graphs_at(t):
        seen.append((t.step, train_mod.compiled_graphs() - t._graphs_before))
    warm = RunDir.create(tmp_path, tiny(TINY_IMAGES, *over, name="warm"))
    assert train(warm, hooks=[graphs_at]) == "done"
    ev = [e for e in warm.events()[0] if e["event"] == "prewarm"]
    assert [(e["sizes"], e["graphs"]) for e in ev] == [([4, 8], 2)]
    assert seen[0] == (0, 2) and seen[-1] == (7, 2)                       # none built after step 0
    torch._dynamo.reset()
    monkeypatch.setattr(train_mod.Trainer, "prewarm", lambda self: None)
    cold = RunDir.create(tmp_path, tiny(TINY_IMAGES, *over, name="cold"))
    seen.clear()
    assert train(cold, hooks=[graphs_at]) == "done"
    assert seen[0] == (0, 0) and seen[-1][1] == 2                          # compiled as it went
    assert _records(warm) == _records(cold) and len(_records(warm)) == 8 + 4


def test_prewarm_without_restoring_the_model_changes_the_run(tmp_path, monkeypatch):
    """Negative control for the test above: a pre-warm that leaves its batch-norm statistics behind
    changes the eval losses."""
    from engine.train import loop as train_mod
    _eager_compile(monkeypatch)
    over = ("compile=true", "steps=8", "batch_size=4", "eval_every=2", "log_every=2",
            "changes=[{at_step=4, batch_size=8}]")
    cold_cfg = tiny(TINY_IMAGES, *over, name="cold")
    monkeypatch.setattr(train_mod.Trainer, "_prewarm_restore", lambda self, saved: None)
    leaky = RunDir.create(tmp_path, tiny(TINY_IMAGES, *over, name="leaky"))
    assert train(leaky) == "done"
    torch._dynamo.reset()
    monkeypatch.setattr(train_mod.Trainer, "prewarm", lambda self: None)
    cold = RunDir.create(tmp_path, cold_cfg)
    assert train(cold) == "done"
    evals = lambda rd: [r["eval_loss"] for r in _records(rd) if "eval_loss" in r]   # noqa: E731
    assert evals(leaky) != evals(cold)


def test_prewarm_sizes_are_the_shapes_still_to_come():
    from types import SimpleNamespace

    from engine.schedule import Schedule
    from engine.train.loop import Trainer
    cfg = tiny(TINY_IMAGES, "batch_size=4", "steps=30", "changes=[{at_step=5, batch_size=16}, {at_step=9, batch_size=64}]")
    t = SimpleNamespace(cfg=cfg, schedule=Schedule(cfg), dist=SimpleNamespace(world=1))
    assert Trainer.prewarm_sizes(t) == [4, 16, 64]
    t.schedule.noise.applied[0] = True                 # resumed after the first change (its batch is now 16)
    t.schedule.noise.batch_size = 16
    assert Trainer.prewarm_sizes(t) == [16, 64]
    cfg = tiny(TINY_IMAGES, "batch_size=8", "micro_batch_size=4", "steps=30", "changes=[{at_step=5, batch_size=32}]")
    t = SimpleNamespace(cfg=cfg, schedule=Schedule(cfg), dist=SimpleNamespace(world=2))
    assert Trainer.prewarm_sizes(t) == [4]               # per rank 4 and 16: micro-batches of 4 only
    cfg = tiny(TINY_IMAGES, "batch_size=8", "noise_micro=2", "steps=30", "changes=[{at_step=5, batch_size=32}]")
    t = SimpleNamespace(cfg=cfg, schedule=Schedule(cfg), dist=SimpleNamespace(world=1))
    assert Trainer.prewarm_sizes(t) == [2, 8, 32]         # the flush steps' micro-batches of noise_micro too


@pytest.mark.parametrize("restore", [True, False])
def test_prewarm_puts_back_the_rng_that_dropout_drew(tmp_path, monkeypatch, restore):
    """GPT-2 with dropout: the pre-warm's forwards draw dropout masks; with the RNG put back the train
    losses equal a cold-compiled run's, without it (the negative control) they differ."""
    from engine.train import loop as train_mod
    _eager_compile(monkeypatch)
    over = ("compile=true", "steps=6", "batch_size=4", "log_every=2", "model.dropout=0.1",
            "changes=[{at_step=3, batch_size=8}]")
    if not restore:
        monkeypatch.setattr(train_mod.Trainer, "_prewarm_restore", lambda self, saved: None)
    warm = RunDir.create(tmp_path, tiny(TINY_LM, *over, name="warm"))
    assert train(warm) == "done"
    torch._dynamo.reset()
    monkeypatch.setattr(train_mod.Trainer, "prewarm", lambda self: None)
    cold = RunDir.create(tmp_path, tiny(TINY_LM, *over, name="cold"))
    assert train(cold) == "done"
    losses = lambda rd: [r["loss"] for r in _records(rd) if "loss" in r]   # noqa: E731
    assert len(losses(warm)) == 6
    assert (losses(warm) == losses(cold)) is restore


def test_compile_auto_is_eager_on_the_cpu_and_picks_a_mode_by_model_on_cuda():
    """Issue 29: the default, compile = "auto", resolved per device and model."""
    from engine.train.loop import compile_choice
    img, lm = tiny(TINY_IMAGES), tiny(TINY_LM)
    assert img.compile == "auto" and lm.compile == "auto"
    assert compile_choice(img, "cpu") == (False, "", "compile = auto: eager on the CPU")
    assert compile_choice(lm, "cpu")[0] is False
    assert compile_choice(img, "cuda") == (True, "reduce-overhead", "compile = auto: a convnet on CUDA, with CUDA graphs")
    assert compile_choice(tiny(TINY_IMAGES, "micro_batch_size=8"), "cuda") == (
        True, "default", "compile = auto: on CUDA, default mode")                   # accumulation: no graphs (yet)
    assert compile_choice(lm, "cuda") == (True, "default", "compile = auto: on CUDA, default mode")
    assert compile_choice(tiny(TINY_LM, 'compile_mode="max-autotune"'), "cuda")[1] == "max-autotune"
    assert compile_choice(tiny(TINY_IMAGES, "compile=true"), "cpu") == (True, "default", "compile = true")
    assert compile_choice(tiny(TINY_IMAGES, "compile=false"), "cuda") == (False, "", "compile = false")


def test_a_compile_that_fails_trains_eager_says_so_and_changes_nothing(tmp_path, monkeypatch):
    """A compiler error (a missing toolchain, an unsupported op) never kills the run: one event says
    why, and the run trains eager, record for record what an eager run records."""
    class Broken:
        def __init__(self, module):
            self.module = module

        def __call__(self, *a, **k):
            raise RuntimeError("inductor: no C++ compiler found\nlong traceback text")

        def no_sync(self):
            return self.module.no_sync()
    monkeypatch.setattr(torch, "compile", lambda m, **kw: Broken(m))
    over = ("steps=6", "batch_size=4", "eval_every=3", "log_every=2")
    rd = RunDir.create(tmp_path, tiny(TINY_IMAGES, "compile=true", *over, name="broken"))
    assert train(rd) == "done", rd.log_file.read_text()[-2000:]
    (failed,) = [e for e in rd.events()[0] if e["event"] == "compile_failed"]
    assert (failed["step"], failed["mode"], failed["reason"]) == (0, "default", "RuntimeError: inductor: no C++ compiler found")
    assert "torch.compile failed (RuntimeError: inductor: no C++ compiler found); this run trains eager" in \
        rd.log_file.read_text()
    eager = RunDir.create(tmp_path, tiny(TINY_IMAGES, "compile=false", *over, name="eager"))
    assert train(eager) == "done"
    assert _records(rd) == _records(eager) and len(_records(rd)) == 6 + 2     # 6 steps, 2 evals
    start = [e for e in eager.events()[0] if e["event"] == "start"][0]
    assert (start["compile"], start["compile_why"]) == ("off", "compile = false")


def test_with_cuda_graph_steps_the_grads_are_preallocated_zeroed_in_place_and_train_the_same(tmp_path):
    """CUDA-graph replays need stable .grad buffers (torch's cudagraph_trees): with graph steps on, every
    parameter's .grad is allocated before the first backward and zeroed in place after each step, so
    its storage never changes; the updates are the eager run's. Run on the CPU by turning the flag on
    (cudagraph_mark_step_begin only marks a step there); negative control: eager frees them."""
    from engine.train.loop import Trainer
    over = ("steps=5", "batch_size=8", "micro_batch_size=4", "eval_every=0", "log_every=5", "noise_scale=false")
    losses, ptrs = {}, {}
    for graphs in (True, False):
        rd = RunDir.create(tmp_path, tiny(TINY_IMAGES, *over, name=f"g{graphs}"))
        t = Trainer(rd, rd.config())
        t.setup(resume=False)
        t._graph_steps = graphs
        seen = []
        for _ in range(3):
            losses.setdefault(graphs, []).append(float(t._train_step(8)))
            seen.append([None if p.grad is None else (p.grad.data_ptr(), float(p.grad.abs().sum()))
                         for p in t.model.parameters()])
        ptrs[graphs] = seen
    assert all(g is not None and g[1] == 0.0 for step in ptrs[True] for g in step)      # zeroed in place
    assert [g[0] for g in ptrs[True][0]] == [g[0] for g in ptrs[True][2]]               # the same storage
    assert all(g is None for step in ptrs[False] for g in step)                          # eager: freed
    assert losses[True] == losses[False]


def test_a_padded_vocabulary_is_the_same_gpt2_and_its_checkpoints_load_in_transformers(tmp_path):
    """Issue 29: the head's GEMM runs on the vocabulary padded to a multiple of model.pad_vocab (61 -> 64
    here, 50257 -> 50304 in the presets); the logits, the loss and the gradients are the unpadded
    model's, and the weights keep GPT-2's shapes, so a checkpoint still loads in transformers."""
    from transformers import GPT2LMHeadModel

    from engine.config import ModelConfig
    from engine.models import build_model
    from engine.train import checkpoint as ckpt
    from engine.train.loop import loss_fn
    kw = dict(name="gpt2", n_layer=2, n_head=2, n_embd=16, vocab_size=61, n_positions=32)
    torch.manual_seed(0)
    padded = build_model(ModelConfig(**kw, pad_vocab=64))
    plain = build_model(ModelConfig(**kw, pad_vocab=1))
    plain.load_state_dict(padded.state_dict())
    assert padded.pad == 3 and plain.pad == 0
    assert padded.hf.lm_head.weight.shape == (61, 16)                   # no padding among the parameters
    tokens = torch.randint(0, 61, (3, 20))
    out = {}
    for name, m in (("padded", padded), ("plain", plain)):
        m.zero_grad()
        logits = m(tokens)
        loss = loss_fn(logits, tokens, None)
        loss.backward()
        out[name] = (logits.detach(), loss.item(), {k: p.grad.clone() for k, p in m.named_parameters()})
    assert out["padded"][0].shape == (3, 20, 61)
    assert torch.allclose(out["padded"][0], out["plain"][0], atol=1e-6)
    assert out["padded"][1] == pytest.approx(out["plain"][1], abs=1e-6)
    assert all(torch.allclose(out["padded"][2][k], g, atol=1e-6) for k, g in out["plain"][2].items())
    with torch.no_grad():
        assert torch.allclose(padded(tokens), padded.hf(input_ids=tokens).logits, atol=1e-5)
    # negative control: the padded logits kept (not sliced back) put mass on tokens that do not exist
    body = padded.hf.transformer
    with torch.no_grad():
        h = body.wte(tokens) + body.wpe(torch.arange(20))
        for block in body.h:
            o = block(h)
            h = o[0] if isinstance(o, tuple) else o
        unsliced = torch.nn.functional.linear(body.ln_f(h), torch.nn.functional.pad(padded.hf.lm_head.weight, (0, 0, 0, 3)))
    assert abs(loss_fn(unsliced, tokens, None).item() - out["plain"][1]) > 1e-3
    # a padded run's checkpoint: GPT-2's shapes, read by transformers with equal logits
    cfg = tiny(TINY_LM, "steps=2", "eval_every=0", "model.vocab_size=61", "data.vocab_size=61", "model.pad_vocab=64")
    rd = RunDir.create(tmp_path, cfg)
    assert train(rd) == "done"
    hf = GPT2LMHeadModel.from_pretrained(str(ckpt.export_hf(rd.checkpoint_path(2), tmp_path / "hf"))).eval()
    ours = build_model(cfg.model)
    weights, _ = ckpt.load_weights(rd.checkpoint_path(2))
    ckpt.load_weights_into(ours, weights, rd.checkpoint_path(2))
    x = torch.randint(0, 61, (2, 16))
    with torch.no_grad():
        assert hf.config.vocab_size == 61 and torch.allclose(hf(input_ids=x).logits, ours.eval()(x), atol=1e-5)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor's CPU code needs a C++ compiler")
def test_a_run_compiled_by_inductor_records_what_an_eager_run_records(tmp_path):
    """Issue 29: compile = true with inductor generating real code (C++ on the CPU), forward and loss
    in one graph, two batch sizes pre-warmed: its losses are the eager run's to 1e-4 (fused kernels
    reorder float sums); negative control: another learning rate is further away than that."""
    over = ("steps=6", "batch_size=8", "eval_every=3", "log_every=2", 'model.name="cnn"', "model.width=4",
            "model.depth=2", "changes=[{at_step=3, batch_size=16}]", "noise_scale=false")
    runs = {}
    for name, extra in (("eager", "compile=false"), ("inductor", "compile=true"), ("other_lr", "lr=0.03")):
        rd = RunDir.create(tmp_path, tiny(TINY_IMAGES, extra, *over, name=name))
        assert train(rd) == "done", rd.log_file.read_text()[-2000:]
        runs[name] = rd
    assert not [e for e in runs["inductor"].events()[0] if e["event"] == "compile_failed"]
    (end,) = [e for e in runs["inductor"].events()[0] if e["event"] == "end"]
    (warm,) = [e for e in runs["inductor"].events()[0] if e["event"] == "prewarm"]
    assert warm["sizes"] == [8, 16] and end["graphs"] >= 2

    def losses(rd, key):
        return [r[key] for r in rd.metrics()[0] if key in r]
    for key in ("loss", "eval_loss"):
        a, b = losses(runs["eager"], key), losses(runs["inductor"], key)
        assert len(a) == len(b) > 0 and b == pytest.approx(a, rel=1e-4), key
    assert losses(runs["other_lr"], "eval_loss") != pytest.approx(losses(runs["eager"], "eval_loss"), rel=1e-3)


def test_a_named_attention_kernel_is_the_same_function_and_the_only_kernel_allowed():
    """Issue 29: model.attention picks GPT-2's SDPA kernel (cudnn on Hopper is measured by
    gpu_check.sh). The math kernel gives auto's logits; a kernel that cannot run here (cuDNN on the
    CPU) raises rather than measure another under its name; a name that is none is refused."""
    from engine.config import ConfigError, ModelConfig
    from engine.models import build_model
    kw = dict(name="gpt2", n_layer=2, n_head=2, n_embd=16, vocab_size=61, n_positions=32)
    torch.manual_seed(0)
    auto = build_model(ModelConfig(**kw))
    tokens = torch.randint(0, 61, (3, 20))
    with torch.no_grad():
        ref = auto(tokens)
        for name in ("math", "flash"):
            other = build_model(ModelConfig(**kw, attention=name))
            other.load_state_dict(auto.state_dict())
            assert torch.allclose(other(tokens), ref, atol=1e-5), name
        traced = torch.compile(other, backend="aot_eager", fullgraph=True)    # dynamo traces the kernel's context
        assert torch.allclose(traced(tokens), ref, atol=1e-5)
        cudnn = build_model(ModelConfig(**kw, attention="cudnn"))
        with pytest.raises(RuntimeError, match="No (available kernel|viable backend)"):
            cudnn(tokens)
    with pytest.raises(ConfigError, match="'model.attention' = 'fast' is not one of auto, cudnn, flash, efficient, math"):
        tiny(TINY_LM, 'model.attention="fast"')
