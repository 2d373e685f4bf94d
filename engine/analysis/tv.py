"""Function-space distance between two checkpoints (Section 4 of the paper).

    TV(A, B) = mean over held-out examples (and token positions, for LMs) of ½‖softmax(A(x)) − softmax(B(x))‖₁

Both models see the same fixed evaluation set (the run's held-out set, optionally its first N
examples), in eval mode, batched, on the GPU when there is one, with bf16 autocast where the run
used it; softmaxes are taken in float32. One pass computes TV plus each model's loss and error, so
the cost is two forward passes. Matching pairs checkpoints of A and B by step, by lr_time, or by
evaluation loss (the paper's "at matched loss"): checkpoints taken at the same loss level
(`checkpoint_at_losses`) pair first, then each other checkpoint of A with B's nearest in loss (with
or without replacement); a pair whose recorded losses differ by more than `max_gap` of B's loss is
dropped and counted, never kept silently.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from engine.train.checkpoint import CheckpointError, load_weights, load_weights_into, read_meta
from engine.config import Config, ModelConfig
from engine.data import build_stream
from engine.models import build_model
from engine.store.rundir import RunDir


@dataclass
class TVResult:
    tv: float
    loss_a: float
    loss_b: float
    error_a: float
    error_b: float
    examples: int
    positions: int      # predicted positions per example (1 for classifiers)


def tv_per_item(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """½‖p_a − p_b‖₁ over the last dimension, in float32."""
    pa = F.softmax(logits_a.float(), dim=-1)
    pb = F.softmax(logits_b.float(), dim=-1)
    return 0.5 * (pa - pb).abs().sum(-1)


def model_config_of(meta: dict, path: Path) -> ModelConfig:
    """The checkpoint's model_config, checked as a run's config is (known keys, types, ranges)."""
    from engine.config import _RANGES, ConfigError, from_dict
    raw = meta.get("model_config")
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: its metadata has no model_config")
    try:
        mc = from_dict(ModelConfig, raw, str(path), prefix="model_config.")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    for key, (lo, hi) in _RANGES.items():
        if key.startswith("model.") and not lo <= getattr(mc, key[6:]) <= hi:
            raise CheckpointError(f"{path}: model_config.{key[6:]} must be in [{lo}, {hi}], got {getattr(mc, key[6:])}")
    return mc


def load_model(path: Path, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """The checkpoint's model, on `device`. Its metadata is checked before any model is built, and
    the model is first built on the meta device (no memory) to compare every tensor's name and shape
    with the file's header: a checkpoint whose tensors do not fit its model_config is one line, and
    a hostile model_config (a huge width) allocates nothing."""
    from engine.train.checkpoint import expected_shapes
    from engine.store.ckptmeta import tensor_shapes
    meta = read_meta(path)
    mc = model_config_of(meta, path)
    try:
        with torch.device("meta"):
            skeleton = build_model(mc)
    except Exception as e:  # noqa: BLE001 - a model_config the builders refuse: one line
        raise CheckpointError(f"{path}: its model_config builds no model ({type(e).__name__}: {str(e)[:120]})") from None
    want, have = expected_shapes(skeleton), tensor_shapes(path)
    for name in sorted(set(want) | set(have)):
        if want.get(name) != have.get(name):
            what = (f"has no tensor {name!r}" if name not in have else f"has tensor {name!r} the model does not"
                    if name not in want else f"tensor {name!r} is {list(have[name])} where its model_config makes {list(want[name])}")
            raise CheckpointError(f"{path}: does not fit its model_config ({what})")
    weights, meta = load_weights(path)
    model = build_model(mc).to(device)
    load_weights_into(model, weights, path)
    return model.eval(), meta


def check_compatible(meta_a: dict, meta_b: dict, path_a: Path, path_b: Path) -> None:
    a, b = meta_a["model_config"], meta_b["model_config"]
    if meta_a["model"] != meta_b["model"]:
        raise CheckpointError(f"incompatible checkpoints: {path_a.name} is {meta_a['model']}, {path_b.name} is {meta_b['model']}")
    key = "vocab_size" if meta_a["model"] == "gpt2" else "num_classes"
    if a[key] != b[key]:
        raise CheckpointError(f"incompatible checkpoints: {key} {a[key]} ({path_a}) vs {b[key]} ({path_b})")


class EvalSet:
    """The fixed evaluation examples of a run's config, on `device`, optionally only the first n."""

    def __init__(self, cfg: Config, device: torch.device, n: int = 0, batch_size: int = 0):
        self.cfg, self.device = cfg, device
        stream = build_stream(cfg, device)
        self.batch_size = batch_size or cfg.micro_batch_size or min(cfg.batch_size, 512)
        self.batches = []
        left = n or stream.eval_size
        for x, y in stream.eval_batches(self.batch_size):
            if left <= 0:
                break
            x, y = x[:left], (y[:left] if y is not None else None)
            left -= x.shape[0]
            self.batches.append((x, y))
        self.size = sum(x.shape[0] for x, _ in self.batches)


@torch.no_grad()
def compare_models(model_a, model_b, evalset: EvalSet, autocast=None) -> TVResult:
    ctx = autocast or nullcontext()
    tv = loss_a = loss_b = err_a = err_b = torch.zeros((), device=evalset.device, dtype=torch.float64)
    count = 0
    positions = 1
    for x, y in evalset.batches:
        with ctx:
            la, lb = model_a(x), model_b(x)
        if y is None:  # LM: positions 1..L-1 are predicted from their prefix
            la, lb, target = la[:, :-1], lb[:, :-1], x[:, 1:]
            positions = target.shape[1]
        else:
            target = y
        tv = tv + tv_per_item(la, lb).sum(dtype=torch.float64)
        loss_a = loss_a + F.cross_entropy(la.flatten(0, -2).float(), target.flatten(), reduction="sum").double()
        loss_b = loss_b + F.cross_entropy(lb.flatten(0, -2).float(), target.flatten(), reduction="sum").double()
        err_a = err_a + (la.argmax(-1) != target).sum()
        err_b = err_b + (lb.argmax(-1) != target).sum()
        count += target.numel()
    return TVResult(tv=float(tv) / count, loss_a=float(loss_a) / count, loss_b=float(loss_b) / count,
                    error_a=float(err_a) / count, error_b=float(err_b) / count,
                    examples=evalset.size, positions=positions)


def autocast_for(cfg: Config, device: torch.device):
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else None


# ------------------------------------------------------------------ checkpoints of runs, and matching

@dataclass
class Ckpt:
    run: str
    step: int
    path: Path
    lr_time: float
    eval_loss: float | None
    levels: tuple[float, ...] = ()     # loss levels it was taken at (checkpoint_at_losses)


def checkpoints(rd: RunDir) -> list[Ckpt]:
    out = []
    for step, path in rd.list_checkpoints():
        m = read_meta(path)
        levels = m.get("loss_levels") if isinstance(m.get("loss_levels"), list) else []
        out.append(Ckpt(rd.id, step, path, m["lr_time"], m.get("eval_loss"),
                        tuple(float(v) for v in levels if isinstance(v, (int, float)))))
    return out


@dataclass
class Pairing:
    """Which checkpoints of A and B are compared, and which candidate pairs were dropped, and why."""
    by: str
    pairs: list[tuple[Ckpt, Ckpt]]
    dropped: list[tuple[Ckpt, Ckpt, float]]      # (a, b, |loss gap|): beyond max_gap of B's loss
    max_gap: float | None                        # the tolerance (a fraction of B's loss); None: none
    replacement: bool                            # may one checkpoint of B serve several of A
    unmatched: int = 0                           # checkpoints of A with no candidate in B at all

    def summary(self) -> dict:
        return {"pairing": self.by, "kept": len(self.pairs), "dropped": len(self.dropped),
                "unmatched": self.unmatched, "max_gap": self.max_gap, "replacement": self.replacement,
                "level_pairs": sum(1 for a, b in self.pairs if set(a.levels) & set(b.levels))}


def match(a: list[Ckpt], b: list[Ckpt], by: str, max_gap: float | None = None,
          replacement: bool = True) -> list[tuple[Ckpt, Ckpt]]:
    """Pair each checkpoint of A with one of B: equal step, nearest lr_time, or nearest eval loss
    (the kept pairs of pair_up)."""
    return pair_up(a, b, by, max_gap, replacement).pairs


def pair_up(a: list[Ckpt], b: list[Ckpt], by: str, max_gap: float | None = None,
            replacement: bool = True) -> Pairing:
    """By loss: checkpoints of one loss level pair first; then each other scored checkpoint of A
    with B's nearest in eval loss (without replacement: the closest pairs first, each of B once).
    A pair whose losses differ by more than max_gap x B's loss is dropped and counted."""
    if by not in ("step", "lr_time", "loss"):
        raise ValueError(f"unknown pairing {by!r}")
    if by == "step":
        steps = {c.step: c for c in b}
        pairs = [(ca, steps[ca.step]) for ca in a if ca.step in steps]
        return Pairing(by, pairs, [], None, True, len(a) - len(pairs))
    if by == "lr_time":
        pairs = [(ca, min(b, key=lambda cb: abs(cb.lr_time - ca.lr_time))) for ca in a] if b else []
        return Pairing(by, pairs, [], None, True, len(a) - len(pairs))
    sa = [c for c in a if c.eval_loss is not None]
    sb = [c for c in b if c.eval_loss is not None]
    chosen: list[tuple[Ckpt, Ckpt]] = []
    used_a: set[int] = set()
    used_b: set[int] = set()
    for ca in sa:                                  # the same loss level: the match the run was built for
        for cb in sb:
            if set(ca.levels) & set(cb.levels) and (replacement or id(cb) not in used_b) and id(ca) not in used_a:
                chosen.append((ca, cb))
                used_a.add(id(ca))
                used_b.add(id(cb))
    rest = [ca for ca in sa if id(ca) not in used_a]
    if replacement:
        chosen += [(ca, min(sb, key=lambda cb: abs(cb.eval_loss - ca.eval_loss))) for ca in rest if sb]
    else:
        cands = sorted(((abs(ca.eval_loss - cb.eval_loss), i, j) for i, ca in enumerate(rest)
                        for j, cb in enumerate(sb) if id(cb) not in used_b), key=lambda t: t[0])
        taken_a: set[int] = set()
        for _, i, j in cands:
            if i not in taken_a and id(sb[j]) not in used_b:
                chosen.append((rest[i], sb[j]))
                taken_a.add(i)
                used_b.add(id(sb[j]))
    order = {id(c): k for k, c in enumerate(a)}
    chosen.sort(key=lambda p: order[id(p[0])])
    kept, dropped = [], []
    for ca, cb in chosen:
        gap = abs(ca.eval_loss - cb.eval_loss)
        if max_gap is not None and gap > max_gap * abs(cb.eval_loss):
            dropped.append((ca, cb, gap))
        else:
            kept.append((ca, cb))
    return Pairing(by, kept, dropped, max_gap, replacement, len(a) - len(chosen))


def _cache_key(ca: Ckpt, cb: Ckpt, n: int) -> str:
    sa, sb = os.stat(ca.path), os.stat(cb.path)
    return f"{ca.path.name}@{sa.st_mtime_ns}|{cb.run}/{cb.path.name}@{sb.st_mtime_ns}|n={n}"


def pair_runs(rd_a: RunDir, rd_b: RunDir, by: str = "step", at_steps: list[int] | None = None,
              max_gap: float | None = None, replacement: bool = True) -> Pairing:
    """The checkpoints of runs A and B that tv_curve compares (and the pairs it drops)."""
    cfg_a, cfg_b = rd_a.config(), rd_b.config()
    for key in ("source", "image_size", "seq_len"):
        if getattr(cfg_a.data, key) != getattr(cfg_b.data, key):
            raise CheckpointError(f"runs {rd_a.id} and {rd_b.id} train on different data (data.{key})")
    if cfg_a.data_seed != cfg_b.data_seed and cfg_a.data.source.startswith("synthetic"):
        raise CheckpointError(f"runs {rd_a.id} and {rd_b.id} have different synthetic tasks (data_seed)")
    ca = checkpoints(rd_a)
    if at_steps:
        ca = [c for c in ca if c.step in set(at_steps)]
    return pair_up(ca, checkpoints(rd_b), by, max_gap, replacement)


def tv_curve(rd_a: RunDir, rd_b: RunDir, by: str = "step", at_steps: list[int] | None = None,
             eval_samples: int = 0, device: str = "auto", evalset: EvalSet | None = None,
             on_pair: Callable[[int, int, str], None] | None = None, max_gap: float | None = None,
             replacement: bool = True, pairing: Pairing | None = None) -> list[dict]:
    """TV for each kept pair of checkpoints of A and B (pair_runs, or `pairing`); cached in A's run
    directory. `on_pair(done, total, what)` is told before each pair that is computed (not read from
    the cache). Each row has `match_gap`: B's recorded eval loss less A's, the gap it was paired at."""
    from engine.train.loop import pick_device

    cfg_a = rd_a.config()
    pairing = pairing or pair_runs(rd_a, rd_b, by, at_steps, max_gap, replacement)
    pairs = pairing.pairs
    if not pairs:
        return []
    dev = pick_device(device)
    cache = rd_a.read_tv_cache()
    rows, todo = [], []
    n = eval_samples
    for pa, pb in pairs:
        key = _cache_key(pa, pb, n)
        if key in cache:
            rows.append(dict(cache[key]))
        else:
            rows.append(None)
            todo.append((len(rows) - 1, key, pa, pb))
    if todo:
        evalset = evalset or EvalSet(cfg_a, dev, n)
        ac = autocast_for(cfg_a, dev)
        for k, (i, key, pa, pb) in enumerate(todo):
            if on_pair:
                on_pair(k, len(todo), f"step {pa.step} of {pa.run} vs step {pb.step} of {pb.run}")
            ma, meta_a = load_model(pa.path, dev)
            mb, meta_b = load_model(pb.path, dev)
            check_compatible(meta_a, meta_b, pa.path, pb.path)
            res = compare_models(ma, mb, evalset, ac)
            row = {"run_a": pa.run, "run_b": pb.run, "step_a": pa.step, "step_b": pb.step,
                   "lr_time_a": pa.lr_time, "lr_time_b": pb.lr_time, **asdict(res),
                   "loss_gap": res.loss_a - res.loss_b}
            rows[i] = cache[key] = row
            rows[i] = dict(row)
        rd_a.write_tv_cache(cache)
    for row, (pa, pb) in zip(rows, pairs):
        row["match_gap"] = (pa.eval_loss - pb.eval_loss) if pa.eval_loss is not None and pb.eval_loss is not None \
            else None
        row["levels"] = sorted(set(pa.levels) & set(pb.levels), reverse=True)
    return rows


def tv_files(path_a: Path, path_b: Path, cfg: Config, eval_samples: int = 0, device: str = "auto") -> dict:
    """TV of two checkpoint files (any compatible gpctl safetensors), on the held-out set of `cfg`."""
    from engine.train.loop import pick_device

    dev = pick_device(device)
    ma, meta_a = load_model(path_a, dev)
    mb, meta_b = load_model(path_b, dev)
    check_compatible(meta_a, meta_b, path_a, path_b)
    res = compare_models(ma, mb, EvalSet(cfg, dev, eval_samples), autocast_for(cfg, dev))
    return {"run_a": str(path_a), "run_b": str(path_b), "step_a": meta_a.get("step"), "step_b": meta_b.get("step"),
            "lr_time_a": meta_a.get("lr_time"), "lr_time_b": meta_b.get("lr_time"), **asdict(res),
            "loss_gap": res.loss_a - res.loss_b}
