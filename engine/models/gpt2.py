"""GPT-2 as 🤗 transformers' GPT2LMHeadModel, so its checkpoints load in transformers as they are.

Sizes come from the config (124M: 12 layers, 12 heads, 768 wide); attention is PyTorch SDPA.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.config import ModelConfig


def gpt2_config(mc: ModelConfig):
    from transformers import GPT2Config

    return GPT2Config(vocab_size=mc.vocab_size, n_positions=mc.n_positions, n_embd=mc.n_embd,
                      n_layer=mc.n_layer, n_head=mc.n_head, resid_pdrop=mc.dropout,
                      embd_pdrop=mc.dropout, attn_pdrop=mc.dropout, use_cache=False,
                      tie_word_embeddings=True, bos_token_id=mc.vocab_size - 1,
                      eos_token_id=mc.vocab_size - 1)  # 50256 for GPT-2's vocabulary


class GPT2(nn.Module):
    """Wraps GPT2LMHeadModel so that forward(tokens) returns logits, like the vision models.

    forward runs GPT2LMHeadModel's own modules (embeddings, blocks, final norm, tied head) with no
    attention mask, so SDPA takes its causal kernel; it skips transformers' mask preparation, which
    looks for packed sequences with a `.all()` on the device (a host sync every step). The head's
    GEMM runs on the vocabulary padded to `model.pad_vocab` (zero rows, sliced off again). Equal to
    `self.hf(input_ids=tokens).logits` (tests/test_fastpath.py checks it, padded and not)."""

    def __init__(self, mc: ModelConfig):
        super().__init__()
        from transformers import GPT2LMHeadModel

        cfg = gpt2_config(mc)
        cfg._attn_implementation = "sdpa"
        self.hf = GPT2LMHeadModel(cfg)
        self.vocab = mc.vocab_size
        self.pad = -mc.vocab_size % mc.pad_vocab     # 50257 -> 50304: 47 zero rows, never parameters
        self.attention = mc.attention

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        body = self.hf.transformer
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        h = body.drop(body.wte(tokens) + body.wpe(pos))
        with attention_kernel(self.attention):
            for block in body.h:
                out = block(h)
                h = out[0] if isinstance(out, tuple) else out
        h = body.ln_f(h)
        if not self.pad:
            return self.hf.lm_head(h)
        # the head's GEMM on a vocabulary padded to an aligned size (zero rows: the weights and the
        # function stay GPT-2's), then the logits of the real tokens only; the loss's fp32 copy of
        # them was made before as well
        w = F.pad(self.hf.lm_head.weight, (0, 0, 0, self.pad))
        return F.linear(h, w)[..., :self.vocab]


def attention_kernel(name: str):
    """The SDPA kernel `model.attention` names, as a context (sdpa_kernel, which torch.compile
    traces); "auto" leaves PyTorch's own choice. A named kernel is the only one allowed: where it
    cannot run, SDPA raises ("No viable backend") rather than measure another one under its name."""
    if name == "auto":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([{"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                         "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]])


def gpt2(mc: ModelConfig) -> GPT2:
    return GPT2(mc)
