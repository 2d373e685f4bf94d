"""A checkpoint's metadata, read without torch (listing checkpoints must not pay torch's import)."""
from __future__ import annotations

import json
from pathlib import Path

from engine.errors import CheckpointError

FORMAT = "gpctl-checkpoint-1"


def _header(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= 100 * 2**20:
                raise ValueError(f"header length {n}")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
        return header
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({e})") from None


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's name and shape, from the safetensors header (no tensor is read)."""
    out = {}
    for name, info in _header(path).items():
        if name == "__metadata__":
            continue
        shape = info.get("shape") if isinstance(info, dict) else None
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise CheckpointError(f"{path}: tensor {name[:60]!r} has no valid shape in its header")
        out[name] = tuple(shape)
    return out


def read_meta(path: Path) -> dict:
    """The metadata of a weights file, JSON-decoded (step, samples, lr_time, eval_loss, model, ...).

    Read from the safetensors header itself (8-byte little-endian length, then JSON), so listing
    checkpoints needs neither torch nor the tensors."""
    raw = _header(path).get("__metadata__") or {}
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint (metadata is not an object)")
    if raw.get("gpctl") != FORMAT:
        raise CheckpointError(f"{path}: not a gpctl checkpoint (no '{FORMAT}' metadata)")
    try:
        return {k: json.loads(v) for k, v in raw.items() if k not in ("format", "gpctl")}
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: damaged gpctl metadata ({str(e)[:100]})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: damaged gpctl metadata (nested too deeply)") from None
