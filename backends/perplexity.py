"""Perplexity of a loaded model on a text: the quick check that a quantization kept its quality."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def perplexity(loaded, text: str, window: int | None = None) -> float:
    """exp(mean next-token negative log-likelihood), over windows of up to ``window`` tokens."""
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    window = min(window or loaded.context_length, loaded.context_length)
    if len(ids) < 2:
        raise ValueError("the text needs at least two tokens")
    total_nll, count = 0.0, 0
    # Between the engine's steps (kernels share workspaces), on no cache: generations resume after.
    with loaded.engine.model_lock, torch.inference_mode():
        for start in range(0, len(ids) - 1, window):
            chunk = ids[start : start + window]
            if len(chunk) < 2:
                break
            tokens = torch.tensor([chunk], device=loaded.device)
            logits = loaded.model(tokens, torch.arange(len(chunk), device=loaded.device), cached=False)[0]
            nll = F.cross_entropy(logits[:-1].float(), tokens[0, 1:], reduction="sum")
            total_nll += float(nll)
            count += len(chunk) - 1
    return math.exp(total_nll / count)
