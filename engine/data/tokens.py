"""Prepared token shards: a text corpus tokenized once, read at GPU speed through a memory map.

    gpctl data prepare c4 --path RAW --tokenizer TOK --out DIR     (prepare(), below)
    data.source = "c4", data.path = DIR                            (PreparedTokens)

Format (llm.c / modded-nanogpt's): each `c4_{split}_{k:06d}.bin` is a header of 256 int32 (magic
20240520, version 1, token count) and then the tokens as uint16. Documents are joined with the
tokenizer's EOS, in corpus order, so the stream cut into `seq_len` blocks is token for token the
raw-text stream's (engine/data/c4.py). `meta.json` beside them names the tokenizer, its vocabulary
size, EOS and a fingerprint, and the token count of every shard; a config whose tokenizer differs is
refused.

Reading: block i of the split is tokens [i*L, (i+1)*L) of the concatenated shards. A read copies
from the memory map into pinned memory (on a CUDA run), from where the stream's `.to(device,
non_blocking=True)` overlaps with the running step; a DDP rank reads only its own slice.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from engine.errors import DataMissing

MAGIC, VERSION, HEADER_INTS = 20240520, 1, 256
FORMAT = "gpctl-tokens/1"


def shard_name(split: str, k: int) -> str:
    return f"c4_{split}_{k:06d}.bin"


def tokenizer_fingerprint(tok) -> str:
    """sha256 of the tokenizer's full definition (vocabulary, merges, special tokens)."""
    return hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def write_shard(path: Path, tokens: np.ndarray) -> None:
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = MAGIC, VERSION, len(tokens)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(np.uint16, copy=False).tobytes())
    os.replace(tmp, path)


def read_header(path: Path) -> int:
    """The shard's token count, after checking its header and size."""
    with open(path, "rb") as f:
        header = np.frombuffer(f.read(HEADER_INTS * 4), dtype=np.int32)
    if len(header) < 3 or header[0] != MAGIC or header[1] != VERSION:
        raise DataMissing(f"{path}: not a token shard (header magic {MAGIC}, version {VERSION} expected)")
    n = int(header[2])
    if path.stat().st_size != HEADER_INTS * 4 + 2 * n:
        raise DataMissing(f"{path}: header says {n} tokens but the file holds "
                          f"{(path.stat().st_size - HEADER_INTS * 4) // 2} (cut short?)")
    return n


def prepare(documents: Iterable[str], tok, out: Path, split: str, shard_tokens: int = 100_000_000,
            batch_docs: int = 1024, progress=None) -> dict:
    """Tokenize `documents` (batches through the fast tokenizer, which spreads a batch over all cores)
    into shards of at most `shard_tokens` tokens; returns this split's entry for meta.json."""
    if len(tok) > 65536:
        raise ValueError(f"a vocabulary of {len(tok)} tokens does not fit uint16 shards")
    out.mkdir(parents=True, exist_ok=True)
    eos = tok.eos_token_id
    buf, held, shards, docs, k = [], 0, [], 0, 0

    def emit(final: bool):
        nonlocal buf, held, k
        flat = np.concatenate(buf) if buf else np.zeros(0, np.uint16)
        while len(flat) >= shard_tokens or (final and len(flat)):
            write_shard(out / shard_name(split, k), flat[:shard_tokens])
            shards.append({"file": shard_name(split, k), "tokens": int(min(len(flat), shard_tokens))})
            flat, k = flat[shard_tokens:], k + 1
        buf, held = [flat] if len(flat) else [], len(flat)

    def batches(it: Iterator[str]):
        batch = []
        for text in it:
            batch.append(text)
            if len(batch) == batch_docs:
                yield batch
                batch = []
        if batch:
            yield batch

    for batch in batches(iter(documents)):
        for ids in tok(batch)["input_ids"]:
            ids.append(eos)
            buf.append(np.asarray(ids, dtype=np.uint16))
            held += len(ids)
        docs += len(batch)
        if held >= shard_tokens:
            emit(final=False)
        if progress:
            progress(split, docs, sum(s["tokens"] for s in shards) + held)
    emit(final=True)
    return {"documents": docs, "tokens": sum(s["tokens"] for s in shards), "shards": shards}


def write_meta(out: Path, tok, tokenizer_name: str, source: str, splits: dict) -> dict:
    meta = {"format": FORMAT, "source": source, "tokenizer": tokenizer_name, "vocab_size": len(tok),
            "eos": tok.eos_token_id, "tokenizer_sha": tokenizer_fingerprint(tok), "splits": splits}
    tmp = out / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(tmp, out / "meta.json")
    return meta


def is_prepared(folder: Path) -> bool:
    return (folder / "meta.json").is_file()


def read_meta(folder: Path) -> dict:
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise DataMissing(f"{folder / 'meta.json'}: unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("splits"), dict):
        raise DataMissing(f"{folder / 'meta.json'}: not prepared token shards (format {FORMAT!r} expected; "
                          f"make them with `gpctl data prepare c4`)")
    for split, entry in meta["splits"].items():   # shard files are plain names inside the folder
        shards = entry.get("shards") if isinstance(entry, dict) else None
        if not isinstance(shards, list) or not all(
                isinstance(x, dict) and isinstance(x.get("file"), str) and x["file"] == Path(x["file"]).name
                and x["file"] not in ("", ".", "..") for x in shards):
            raise DataMissing(f"{folder / 'meta.json'}: split {split!r} does not list its shards as plain file "
                              f"names in this folder")
    return meta


class _Split:
    """One split's shards as one token sequence, read through memory maps."""

    def __init__(self, folder: Path, entry: dict):
        self.maps, self.starts = [], [0]
        for s in entry["shards"]:
            path = folder / s["file"]
            if not path.is_file():
                raise DataMissing(f"{path}: missing (meta.json lists it)")
            n = read_header(path)
            if n == 0:
                continue
            self.maps.append(np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_INTS * 4, shape=(n,)))
            self.starts.append(self.starts[-1] + n)
        self.tokens = self.starts[-1]

    def copy_into(self, out: np.ndarray, lo: int) -> None:
        """Tokens [lo, lo + len(out)) into `out` (any integer dtype), across shard boundaries."""
        at, hi = 0, lo + len(out)
        k = int(np.searchsorted(self.starts, lo, side="right")) - 1
        while at < len(out):
            s0 = self.starts[k]
            a, b = lo + at - s0, min(hi - s0, self.starts[k + 1] - s0)
            out[at:at + b - a] = self.maps[k][a:b]
            at += b - a
            k += 1


class PreparedTokens:
    """A sequential token source over prepared shards (the fast path for C4)."""
    kind = "tokens"

    def __init__(self, folder: Path, seq_len: int, eval_samples: int, tok=None, pin: bool = False):
        self.folder, self.seq_len, self.pin = folder, seq_len, pin
        meta = self.meta = read_meta(folder)
        if tok is not None and tokenizer_fingerprint(tok) != meta.get("tokenizer_sha"):
            raise DataMissing(f"{folder}: prepared with tokenizer {meta.get('tokenizer')!r} "
                              f"(fingerprint {meta.get('tokenizer_sha')}), but data.tokenizer loads another "
                              f"(fingerprint {tokenizer_fingerprint(tok)}); prepare again or name that tokenizer")
        splits = meta["splits"]
        if "train" not in splits:
            raise DataMissing(f"{folder}: no train split in meta.json")
        self.train = _Split(folder, splits["train"])
        self.blocks = self.train.tokens // seq_len
        ev = _Split(folder, splits["validation"]) if splits.get("validation", {}).get("tokens") else self.train
        if ev.tokens // seq_len < eval_samples:
            raise DataMissing(f"{folder}: fewer than data.eval_samples = {eval_samples} blocks of {seq_len} "
                              f"tokens in the validation data")
        from engine.data.stream import InMemory

        x = np.empty(eval_samples * seq_len, dtype=np.int32)
        ev.copy_into(x, 0)
        self.eval_set = InMemory(torch.from_numpy(x).view(eval_samples, seq_len), None)

    def read(self, start: int, n: int):
        if start + n > self.blocks:
            raise DataMissing(f"{self.folder}: the training tokens ran out after {self.blocks} blocks of "
                              f"{self.seq_len}")
        out = torch.empty(n * self.seq_len, dtype=torch.int32, pin_memory=self.pin)
        self.train.copy_into(out.numpy(), start * self.seq_len)
        return out.view(n, self.seq_len), None
