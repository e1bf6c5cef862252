"""Scoring a text with a loaded model: perplexity, and each token's log-probability (the API's echo)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from backends.engine import TokenLogprob
from backends.paged_attention import PagedStep, Segment
from backends.paged_cache import BLOCK_SIZE, CacheShape, KVPool


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


def paged_logits(loaded, ids: list[int]) -> torch.Tensor:
    """Every position's logits ``[len(ids), vocab]`` through the engine's attention (on a scratch cache of the
    engine's type), so a prompt scores as the engine would generate after it (the CPU's attention kernel is
    not torch's SDPA; an fp8 cache rounds keys and values)."""
    args, bs = loaded.args, BLOCK_SIZE
    blocks = -(-len(ids) // bs)
    pool = KVPool(CacheShape(args.n_layers, args.n_kv_heads, args.head_dim, blocks, bs), loaded.engine.pool.k.dtype,
                  loaded.device)
    step = PagedStep(pool, [Segment(0, len(ids), 0, tuple(range(blocks)))], args.sliding_window, loaded.dtype,
                     args.n_heads)
    tokens = torch.tensor(ids, device=loaded.device)
    return loaded.model.forward_paged(tokens, step.positions, step, torch.arange(len(ids), device=loaded.device))


def prompt_logprobs(loaded, ids: list[int], top: int) -> list[TokenLogprob | None]:
    """Each token's log-probability given the tokens before it (None for the first), with the ``top`` most
    likely tokens at its position: what an evaluation harness asks for with ``echo``."""
    if len(ids) > loaded.context_length:
        raise ValueError(f"the text has {len(ids)} tokens but the context length is {loaded.context_length}")
    with loaded.engine.model_lock, torch.inference_mode():
        tokens = torch.tensor([ids], device=loaded.device)
        logits = paged_logits(loaded, ids)[:-1]
        lp = torch.log_softmax(logits.float(), dim=-1)
        chosen = lp.gather(-1, tokens[0, 1:].view(-1, 1)).view(-1).tolist()
        best = lp.topk(max(top, 1), dim=-1)
        values, indices = best.values.tolist(), best.indices.tolist()
    out: list[TokenLogprob | None] = [None]
    for i, token in enumerate(ids[1:]):
        out.append(TokenLogprob(token, chosen[i], tuple(zip(indices[i][:top], values[i][:top]))))
    return out
