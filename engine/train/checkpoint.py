"""Checkpoints in safetensors, never pickle.

    checkpoints/step_0001500.safetensors        the weights, with metadata: step, samples, lr_time,
                                                eval_loss, model, model_config (and hf_config for GPT-2)
    checkpoints/step_0001500.state.safetensors  what an exact resume needs: optimizer tensors, RNG
                                                states; metadata "state" = JSON of the loop, schedule,
                                                stream position and optimizer hyper-parameters

Both are written to a temp file and renamed, the state file first, so a checkpoint whose weights
file exists is complete. GPT-2 weights use transformers' names (`transformer.h.0...`, no tied
lm_head): `export_hf(ckpt, folder)` adds config.json so `GPT2LMHeadModel.from_pretrained(folder)` works.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from engine.store.ckptmeta import FORMAT, read_meta  # noqa: F401  (torch-free; re-exported here)
from engine.errors import CheckpointError  # noqa: F401  (re-exported: engine.train.checkpoint.CheckpointError)


def _base(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)   # torch.compile
    return getattr(model, "module", model)        # DDP


def model_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    m = _base(model)
    if hasattr(m, "hf"):  # GPT-2: transformers' own names; lm_head is tied to wte
        sd = {k: v for k, v in m.hf.state_dict().items() if k != "lm_head.weight"}
    else:
        sd = m.state_dict()
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def expected_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """The names and shapes `model_weights` would save for `model` (works on the meta device)."""
    m = _base(model)
    sd = {k: v for k, v in m.hf.state_dict().items() if k != "lm_head.weight"} if hasattr(m, "hf") else m.state_dict()
    return {k: tuple(v.shape) for k, v in sd.items()}


def load_weights_into(model: nn.Module, weights: dict[str, torch.Tensor], path: Path) -> None:
    m = _base(model)
    target = m.hf if hasattr(m, "hf") else m
    missing, unexpected = target.load_state_dict(weights, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        what = missing[:1] and f"missing '{missing[0]}'" or f"unexpected '{unexpected[0]}'"
        raise CheckpointError(f"{path}: does not fit this model ({what})")
    if hasattr(m, "hf"):
        m.hf.tie_weights()


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except SafetensorError as e:     # safetensors' own I/O errors: a full disk is an OSError here
            if "No space left" in str(e) or "os error 28" in str(e):
                raise OSError(errno.ENOSPC, "No space left on device", str(path)) from None
            if "os error 122" in str(e):
                raise OSError(errno.EDQUOT, "Disk quota exceeded", str(path)) from None
            raise
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)          # a failed write (a full disk) leaves nothing behind
        except OSError:
            pass
        raise


def state_path(weights_path: Path) -> Path:
    return weights_path.with_name(weights_path.name.replace(".safetensors", ".state.safetensors"))


def save(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict, state: dict) -> Path:
    """Write weights (+meta) and resume state (+optimizer, RNG) for one step."""
    tensors: dict[str, torch.Tensor] = {}
    opt = optimizer.state_dict()
    scalars: dict[str, dict] = {}
    for idx, st in opt["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{idx}.{k}"] = v.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(idx), {})[k] = v
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    full_state = {"format": FORMAT, "optim_groups": opt["param_groups"], "optim_scalars": scalars, **state}
    _save_atomic(tensors, state_path(path), {"state": json.dumps(full_state)})
    try:
        _save_atomic(model_weights(model), path, {"format": "pt", "gpctl": FORMAT,
                                                  **{k: json.dumps(v) for k, v in meta.items()}})
    except BaseException:
        try:
            os.unlink(state_path(path))   # half a checkpoint is none: free its space
        except OSError:
            pass
        raise
    return path


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    meta = read_meta(path)
    try:
        return load_file(str(path)), meta
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt checkpoint ({e})") from None


def load_state(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    sp = state_path(path)
    try:
        from safetensors import safe_open
        with safe_open(str(sp), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(sp))
        state = json.loads(meta["state"])
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{sp}: corrupt or missing resume state ({e})") from None
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{sp}: unknown resume-state format {state.get('format')!r}")
    return tensors, state


def restore(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Load weights, optimizer and RNG from a checkpoint; returns the loop state saved with it."""
    weights, _ = load_weights(path)
    load_weights_into(model, weights, path)
    tensors, state = load_state(path)
    per_param: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            per_param.setdefault(int(idx), {})[name] = v
    for idx, sc in state["optim_scalars"].items():
        per_param.setdefault(int(idx), {}).update(sc)
    optimizer.load_state_dict({"state": per_param, "param_groups": state["optim_groups"]})
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    return state


def export_hf(path: Path, folder: Path) -> Path:
    """Make a folder `GPT2LMHeadModel.from_pretrained` reads: config.json + model.safetensors."""
    meta = read_meta(path)
    if not meta.get("hf_config"):
        raise CheckpointError(f"{path}: model '{meta.get('model')}' is not a transformers model")
    folder.mkdir(parents=True, exist_ok=True)
    cfg = dict(meta["hf_config"], architectures=["GPT2LMHeadModel"])
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    shutil.copyfile(path, folder / "model.safetensors")
    return folder
