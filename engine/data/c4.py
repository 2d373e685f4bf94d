"""C4 through 🤗 datasets, tokenized with a GPT-2 tokenizer and packed into `seq_len` blocks.

The fast path is a folder prepared once with `gpctl data prepare c4` (engine/data/tokens.py): read
through a memory map, no tokenizer on the training thread. Raw text (below) is the fallback; it
tokenizes on the training thread as it streams, one document at a time, and is much slower.

`data.path` empty: the hub dataset `data.hf_name` / `data.hf_config`, streamed. Otherwise a local
folder of shards in the real format (`c4-train.*.json.gz`, `c4-validation.*.json.gz`: one JSON
object per line with "text", "timestamp", "url"). Documents are joined with the tokenizer's EOS.
The position is (documents fully consumed, tokens of the next one already used), so a resumed run
skips exactly what it had read.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from engine.config import DataConfig
from engine.data.stream import DataMissing, InMemory


def load_tokenizer(name: str):
    """A GPT-2 BPE tokenizer from a hub id or a folder with vocab.json + merges.txt."""
    from transformers import GPT2TokenizerFast

    try:
        return GPT2TokenizerFast.from_pretrained(os.path.expanduser(name))
    except (OSError, ValueError) as e:
        raise DataMissing(f"tokenizer '{name}' could not be loaded (data.tokenizer names a hub id or a "
                          f"local folder with vocab.json/merges.txt): {str(e).splitlines()[0]}") from None


def prepared_c4(dc: DataConfig, device: torch.device):
    """PreparedTokens when data.path holds prepared shards (meta.json), else None (raw text)."""
    from engine.data.tokens import PreparedTokens, is_prepared

    if not dc.path or not is_prepared(Path(os.path.expanduser(dc.path))):
        return None
    return PreparedTokens(Path(os.path.expanduser(dc.path)), dc.seq_len, dc.eval_samples,
                          tok=load_tokenizer(dc.tokenizer), pin=device.type == "cuda")


def documents(dc: DataConfig, split: str, skip: int = 0):
    """The texts of a split, in order: local c4-{split}.*.json(.gz) shards when data.path names them,
    else the hub dataset (streamed)."""
    from datasets import load_dataset

    if dc.path:
        files = _split_files(Path(os.path.expanduser(dc.path)), split)
        if not files:
            return
        ds = load_dataset("json", data_files={split: files}, split=split, streaming=True)
    else:
        ds = load_dataset(dc.hf_name, dc.hf_config, split=split, streaming=True)
    if skip:
        ds = ds.skip(skip)
    for ex in ds:
        yield ex["text"]


def _split_files(root: Path, split: str) -> list[str]:
    return sorted(str(p) for p in root.glob(f"c4-{split}*.json.gz")) or \
        sorted(str(p) for p in root.glob(f"c4-{split}*.json"))


class C4:
    kind = "tokens"

    def __init__(self, dc: DataConfig):
        self.dc, self.seq_len = dc, dc.seq_len
        self.tok = load_tokenizer(dc.tokenizer)
        self.eos = self.tok.eos_token_id
        if dc.path:
            root = Path(os.path.expanduser(dc.path))
            self.files = {s: _split_files(root, s) for s in ("train", "validation")}
            if not self.files["train"]:
                raise DataMissing(f"C4 not found: no c4-train.*.json.gz shards in {root} "
                                  f"(point data.path at them, or leave it empty for the hub's {dc.hf_name})")
        else:
            self.files = None
        blocks = self._blocks("validation" if (self.files is None or self.files["validation"]) else "train")
        ev = [b for b, _ in (next(blocks, (None, None)) for _ in range(dc.eval_samples)) if b is not None]
        if len(ev) < dc.eval_samples:
            raise DataMissing(f"C4: fewer than data.eval_samples = {dc.eval_samples} blocks of "
                              f"{self.seq_len} tokens in the validation data")
        self.eval_set = InMemory(torch.stack(ev), None)
        self._it, self._pos, self.where = None, -1, (0, 0)

    def _documents(self, split: str, skip: int = 0):
        return documents(self.dc, split, skip)

    def _blocks(self, split: str, doc: int = 0, used: int = 0):
        """Blocks of seq_len tokens; tracks (doc, used) = where the next block starts."""
        buf: list[int] = []
        first_doc, first_used = doc, used  # buf[0] is token `first_used` of document `first_doc`
        docs_in_buf: list[int] = []        # token count of each document in buf, from first_doc on
        for text in self._documents(split, skip=doc):
            ids = self.tok(text)["input_ids"] + [self.eos]
            if not docs_in_buf and used:
                ids = ids[used:]
            buf += ids
            docs_in_buf.append(len(ids))
            while len(buf) >= self.seq_len:
                block, buf = buf[:self.seq_len], buf[self.seq_len:]
                taken = self.seq_len  # advance (first_doc, first_used) past the block
                while docs_in_buf and taken >= docs_in_buf[0]:
                    taken -= docs_in_buf.pop(0)
                    first_doc, first_used = first_doc + 1, 0
                if docs_in_buf:
                    docs_in_buf[0] -= taken
                    first_used += taken
                yield torch.tensor(block, dtype=torch.int32), (first_doc, first_used)

    def read(self, start: int, n: int):
        if self._it is None or start != self._pos:
            if start != 0 and not hasattr(self, "_resume_at"):
                raise RuntimeError("C4 stream: reads must be sequential (resume sets the position)")
            doc, used = getattr(self, "_resume_at", (0, 0))
            self._it, self._pos = self._blocks("train", doc, used), start
        out = []
        for _ in range(n):
            b, where = next(self._it, (None, None))
            if b is None:
                raise DataMissing(f"C4 training data ran out after {self._pos + len(out)} blocks")
            out.append(b)
            self.where = where
        self._pos += n
        return torch.stack(out), None

    def state_dict(self) -> dict:
        return {"doc": self.where[0], "used": self.where[1]}

    def load_state_dict(self, d: dict) -> None:
        if d:
            self._resume_at = (d["doc"], d["used"])
