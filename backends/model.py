"""A lean Llama / Mistral decoder with a static KV cache, in plain torch.

This file is the reference: every step reads as the math it computes. Speed is plugged in from outside:
- the projections come from a ``LinearFactory`` that the backend supplies (backends/base.py ``Linear``: the
  reference's dequantized matmuls, the Triton kernels or the ExLlama kernels);
- the other steps (RMSNorm, rotary into the cache, one-token attention, the head) go through an ``ops``
  object, :class:`TorchOps` here; on a GPU the loader passes backends/cuda_ops.py's, whose kernels are
  tested against these forms.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from backends import tensor_names as names
from backends.base import DecodeChain, Linear
from backends.model_config import ModelArgs, RopeScaling


class LinearFactory(Protocol):
    def __call__(self, name: str, in_features: int, out_features: int, bias: bool) -> Linear: ...


class PagedAttention(Protocol):
    """Attention for a step of several sequences' tokens side by side, over a paged KV cache
    (backends/paged_attention.py)."""

    segment_bounds: list[tuple[int, int]]  # each sequence's rows in the step

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> torch.Tensor:
        """q ``[T, Hq * D]``, k and v ``[T, Hkv * D]`` (rotary not applied yet) -> ``[T, Hq * D]``."""


class TorchOps:
    """The model's non-linear-layer steps in plain torch. A subclass overrides what its kernels do faster;
    the one-token attention kernel is used only where :meth:`decode_workspace` gives a workspace."""

    def rmsnorm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return (weight.float() * xf).to(x.dtype)

    def rotary_into_cache(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                          sin: torch.Tensor, cache: "KVCache", positions: torch.Tensor) -> torch.Tensor:
        """q, k, v ``[B, T, H, D]``: k rotated and v written to the cache at ``positions``; returns q rotated,
        ``[B, H, T, D]``."""
        cache.update(positions, apply_rotary(k.transpose(1, 2), cos, sin), v.transpose(1, 2))
        return apply_rotary(q.transpose(1, 2), cos, sin)

    def decode_workspace(self, args: ModelArgs, device: torch.device) -> object | None:
        """The one-token attention kernel's workspace for this model (batch 1), or None: no such kernel."""
        return None

    def decode_attention_pays(self, kv_len: int, args: ModelArgs) -> bool:
        """Whether the one-token attention kernel beats the plain path at this length."""
        return False

    def decode_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor, positions: torch.Tensor, cache: "KVCache", kv_len: int,
                         window: int | None, workspace: object) -> torch.Tensor:
        """One token's attention ``[Hq * D]`` with rotary and the cache write folded in."""
        raise NotImplementedError("no one-token attention kernel here (decode_workspace gives None)")

    def head(self, x: torch.Tensor, lm_head: Linear, norm: "RMSNorm") -> torch.Tensor:
        """fp32 logits of the last layer's output: the final norm and lm_head."""
        return lm_head(norm(x)).float()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, ops: TorchOps = TorchOps()):
        super().__init__()
        self.eps = eps
        self.ops = ops
        self.weight = nn.Parameter(torch.ones(dim, device="meta"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rmsnorm(x, self.weight, self.eps)


def base_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: RopeScaling, max_pos: int) -> torch.Tensor:
    old_len = scaling.original_max_position or max_pos
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


class Rotary(nn.Module):
    """Rotary position embedding, half-rotation layout, with linear/dynamic/llama3 scaling."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.head_dim = args.head_dim
        self.theta = args.rope_theta
        self.scaling = args.rope_scaling
        self.max_pos = args.max_position_embeddings
        inv_freq = base_inv_freq(args.head_dim, args.rope_theta)
        if self.scaling is not None and self.scaling.kind == "linear":
            inv_freq = inv_freq / self.scaling.factor
        if self.scaling is not None and self.scaling.kind == "llama3":
            inv_freq = llama3_inv_freq(inv_freq, self.scaling, self.max_pos)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def _dynamic_inv_freq(self, seq_len: torch.Tensor) -> torch.Tensor:
        # NTK-aware scaling of the base once the sequence outgrows the trained length.
        d = self.head_dim
        factor = self.scaling.factor  # type: ignore[union-attr]
        grow = (factor * seq_len.double() / self.max_pos - (factor - 1)).clamp(min=1.0)
        base = self.theta * grow ** (d / (d - 2))
        exponents = torch.arange(0, d, 2, dtype=torch.float64, device=seq_len.device) / d
        return (1.0 / base ** exponents).float()

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq
        if self.scaling is not None and self.scaling.kind == "dynamic":
            inv_freq = self._dynamic_inv_freq(positions.max() + 1)
        freqs = positions.float().unsqueeze(-1) * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def table(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """cos and sin ``[n, D]`` for positions 0..n-1 (row p is ``forward(p)``), or None where they depend on
        the sequence length (dynamic scaling)."""
        if self.scaling is not None and self.scaling.kind == "dynamic":
            return None
        return self(torch.arange(n, device=device))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D]; cos/sin: [T, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    xf = x.float()
    return (xf * cos + rotated.float() * sin).to(x.dtype)


class KVCache(nn.Module):
    def __init__(self, batch: int, n_kv_heads: int, max_seq: int, head_dim: int, dtype: torch.dtype, device):
        super().__init__()
        shape = (batch, n_kv_heads, max_seq, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.k.index_copy_(2, positions, k)
        self.v.index_copy_(2, positions, v)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, index: int, make_linear: LinearFactory, ops: TorchOps):
        super().__init__()
        self.index = index
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads
        self.head_dim = args.head_dim
        self.ops = ops
        q_out = args.n_heads * args.head_dim
        kv_out = args.n_kv_heads * args.head_dim
        b = args.attention_bias
        self.q_proj = make_linear(names.projection(index, "q_proj"), args.hidden_size, q_out, b)
        self.k_proj = make_linear(names.projection(index, "k_proj"), args.hidden_size, kv_out, b)
        self.v_proj = make_linear(names.projection(index, "v_proj"), args.hidden_size, kv_out, b)
        self.o_proj = make_linear(names.projection(index, "o_proj"), q_out, args.hidden_size, False)
        self.qkv_proj: Linear | None = None  # set by Transformer.fuse_projections
        self.split_sizes = [q_out, kv_out, kv_out]
        self.sliding_window = args.sliding_window
        self.kv_cache: KVCache | None = None
        self.decode_workspace: object | None = None  # the one-token attention's, shared by the layers (setup_cache)

    def forward(self, x, norm: RMSNorm, cos, sin, positions, mask, kv_len: int, residual: torch.Tensor,
                decode_kernel: bool = False, cached: bool = True) -> torch.Tensor:
        """``residual`` + attention of ``norm(x)``. ``decode_kernel``: one token of batch 1, attended to
        by the ops' one-token attention (rotary and the cache write included; ``mask`` is then unused)."""
        bsz, seqlen, _ = x.shape
        q, k, v = self._qkv(x, norm)
        if decode_kernel:
            out = self.ops.decode_attention(q.reshape(-1), k.reshape(-1), v.reshape(-1), cos, sin, positions,
                                            self.kv_cache, kv_len, self.sliding_window, self.decode_workspace)
            return self.o_proj.forward_add(out.view(bsz, seqlen, -1), residual)
        q = q.view(bsz, seqlen, self.n_heads, self.head_dim)
        k = k.view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        v = v.view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        if cached:
            q = self.ops.rotary_into_cache(q, k, v, cos, sin, self.kv_cache, positions)
            k, v = self.kv_cache.k[:, :, :kv_len], self.kv_cache.v[:, :, :kv_len]
        else:
            q = apply_rotary(q.transpose(1, 2), cos, sin)
            k = apply_rotary(k.transpose(1, 2), cos, sin)
            v = v.transpose(1, 2)
        # mask None: a prompt from position 0 with plain causal attention, which the fused kernels take.
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=self.n_heads != self.n_kv_heads
        )
        out = out.transpose(1, 2).reshape(bsz, seqlen, self.n_heads * self.head_dim)
        return self.o_proj.forward_add(out, residual)

    def forward_paged(self, x: torch.Tensor, norm: RMSNorm, cos: torch.Tensor, sin: torch.Tensor,
                      paged: PagedAttention, residual: torch.Tensor) -> torch.Tensor:
        """``residual`` + attention of ``norm(x)`` for a step of several sequences (``x``: ``[1, T, hidden]``)."""
        q, k, v = self._qkv(x, norm)
        out = paged.attend(self.index, q[0], k[0], v[0], cos, sin)
        return self.o_proj.forward_add(out.unsqueeze(0), residual)

    def _qkv(self, x: torch.Tensor, norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.qkv_proj is not None:
            return self.qkv_proj(x, norm).split(self.split_sizes, dim=-1)
        x = norm(x)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs, index: int, make_linear: LinearFactory):
        super().__init__()
        h, i, b = args.hidden_size, args.intermediate_size, args.mlp_bias
        self.gate_proj = make_linear(names.projection(index, "gate_proj"), h, i, b)
        self.up_proj = make_linear(names.projection(index, "up_proj"), h, i, b)
        self.down_proj = make_linear(names.projection(index, "down_proj"), i, h, b)
        self.gate_up_proj: Linear | None = None  # set by Transformer.fuse_projections

    def forward(self, x: torch.Tensor, norm: RMSNorm, residual: torch.Tensor) -> torch.Tensor:
        """``residual`` + the MLP of ``norm(x)``."""
        if self.gate_up_proj is not None:
            hidden = self.gate_up_proj.silu_mul(x, norm)
        else:
            x = norm(x)
            hidden = F.silu(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj.forward_add(hidden, residual)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, index: int, make_linear: LinearFactory, ops: TorchOps):
        super().__init__()
        self.self_attn = Attention(args, index, make_linear, ops)
        self.mlp = FeedForward(args, index, make_linear)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, ops)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, ops)

    def forward(self, x, cos, sin, positions, mask, kv_len: int, decode_kernel: bool = False,
                cached: bool = True) -> torch.Tensor:
        h = self.self_attn(x, self.input_layernorm, cos, sin, positions, mask, kv_len, residual=x,
                           decode_kernel=decode_kernel, cached=cached)
        return self.mlp(h, self.post_attention_layernorm, residual=h)

    def forward_paged(self, x, cos, sin, paged: PagedAttention) -> torch.Tensor:
        h = self.self_attn.forward_paged(x, self.input_layernorm, cos, sin, paged, residual=x)
        return self.mlp(h, self.post_attention_layernorm, residual=h)


def fuse_linears(parts: list[Linear], glu: bool = False) -> Linear | None:
    """The parts as one layer, if they are of one class that knows how to fuse them (``glu``: gate and up,
    for ``silu_mul``)."""
    kind = type(parts[0])
    if any(type(p) is not kind for p in parts):
        return None
    fused = kind.fuse_glu(*parts) if glu else None
    return fused if fused is not None else kind.fuse(parts)


class Transformer(nn.Module):
    """Parameter names follow the Hugging Face checkpoints (``model.layers.N...``)."""

    def __init__(self, args: ModelArgs, make_linear: LinearFactory, ops: TorchOps = TorchOps()):
        super().__init__()
        self.args = args
        self.ops = ops
        # Embedding and norms are placeholders until the loader assigns the stored tensors.
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size, device="meta")
        self.layers = nn.ModuleList(DecoderLayer(args, i, make_linear, ops) for i in range(args.n_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, ops)
        self.lm_head = make_linear(names.LM_HEAD, args.hidden_size, args.vocab_size, False)
        self.rotary = Rotary(args)
        self.rotary_table: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin [max_seq_len, D]
        self.max_seq_len = 0
        # The backend's own batch-1 decode of all layers (Backend.decode_chain), set by the loader.
        self.decode_chain: DecodeChain | None = None

    def stored_dense(self) -> dict[str, nn.Module]:
        """The modules whose ``weight`` a checkpoint stores as is, by tensor name (lm_head is a projection,
        built by the LinearFactory)."""
        modules: dict[str, nn.Module] = {names.EMBED: self.embed_tokens, names.FINAL_NORM: self.norm}
        for i, layer in enumerate(self.layers):
            for norm in names.LAYER_NORMS:
                modules[names.layer_norm(i, norm)] = getattr(layer, norm)
        return modules

    def fuse_projections(self) -> int:
        """Replace q/k/v and gate/up by one layer each where the backend's layers can fuse; returns how many."""
        fused = 0
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv = fuse_linears([attn.q_proj, attn.k_proj, attn.v_proj])
            if qkv is not None:
                attn.qkv_proj, attn.q_proj, attn.k_proj, attn.v_proj = qkv, None, None, None
                fused += 1
            gate_up = fuse_linears([mlp.gate_proj, mlp.up_proj], glu=True)
            if gate_up is not None:
                mlp.gate_up_proj, mlp.gate_proj, mlp.up_proj = gate_up, None, None
                fused += 1
        return fused

    def setup_cache(self, batch: int, max_seq_len: int) -> None:
        dtype = self.embed_tokens.weight.dtype
        device = self.embed_tokens.weight.device
        self.max_seq_len = max_seq_len
        a = self.args
        workspace = self.ops.decode_workspace(a, device) if batch == 1 else None
        for layer in self.layers:
            layer.self_attn.kv_cache = KVCache(batch, a.n_kv_heads, max_seq_len, a.head_dim, dtype, device)
            layer.self_attn.decode_workspace = workspace
        # The attention kernel reads its position's row itself: no rotary kernels in a decode step.
        self.rotary_table = self.rotary.table(max_seq_len, device) if workspace is not None else None

    def attention_mask(self, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        keys = torch.arange(kv_len, device=positions.device)
        mask = keys.view(1, -1) <= positions.view(-1, 1)
        window = self.args.sliding_window
        if window is not None:
            mask &= keys.view(1, -1) > positions.view(-1, 1) - window
        return mask

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int | None = None,
                cached: bool = True) -> torch.Tensor:
        """tokens ``[B, T]`` at ``positions`` ``[T]`` -> logits ``[B, T, vocab]`` in fp32.

        Attention reads the first ``kv_len`` cache slots (masked by position); by default up to the last
        position, which costs one device-to-host sync. A CUDA graph passes a fixed ``kv_len`` instead.
        """
        if not cached:
            return self._forward_uncached(tokens, positions)
        if self.max_seq_len == 0:
            raise RuntimeError("call setup_cache() before forward(), or pass cached=False")
        if kv_len is None:
            kv_len = int(positions[-1]) + 1
        if kv_len > self.max_seq_len:
            raise ValueError(f"position {kv_len - 1} is past the context length {self.max_seq_len}")
        x = self.embed_tokens(tokens)
        plain_causal = self.args.sliding_window is None and tokens.shape[1] == kv_len > 1
        decode_kernel = (tokens.shape == (1, 1) and x.dtype == torch.float16
                         and self.layers[0].self_attn.decode_workspace is not None
                         and self.ops.decode_attention_pays(kv_len, self.args))
        # For the decode kernel: the whole table (it reads its position's row), or this position's cos/sin.
        cos, sin = self.rotary_table if decode_kernel and self.rotary_table is not None else self.rotary(positions)
        mask = None
        if not plain_causal and not decode_kernel:
            # Additive, in the activations' dtype, once per step: a boolean mask is converted in every layer.
            allowed = self.attention_mask(positions, kv_len)
            mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill_(~allowed, float("-inf"))
        chain = self.decode_chain
        if decode_kernel and chain is not None and chain.takes(x):
            x = chain(x, cos, sin, positions, kv_len)
        else:
            for layer in self.layers:
                x = layer(x, cos, sin, positions, mask, kv_len, decode_kernel)
        return self.head(x)

    def _forward_uncached(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Whole sequences from position 0, with no cache read or written (scoring a text)."""
        kv_len = tokens.shape[1]
        x = self.embed_tokens(tokens)
        cos, sin = self.rotary(positions)
        mask = None
        if self.args.sliding_window is not None:
            allowed = self.attention_mask(positions, kv_len)
            mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill_(~allowed, float("-inf"))
        for layer in self.layers:
            x = layer(x, cos, sin, positions, mask, kv_len, cached=False)
        return self.head(x)

    def forward_paged(self, tokens: torch.Tensor, positions: torch.Tensor, paged: PagedAttention,
                      logit_rows: torch.Tensor) -> torch.Tensor:
        """Several sequences' new tokens ``[T]`` at ``positions`` ``[T]``, their keys and values in ``paged``'s
        cache -> fp32 logits ``[len(logit_rows), vocab]`` of the rows asked for."""
        x = self.embed_tokens(tokens).unsqueeze(0)
        if self.rotary.scaling is not None and self.rotary.scaling.kind == "dynamic":
            # The base follows each sequence's own length, as when it runs alone.
            parts = [self.rotary(positions[a:b]) for a, b in paged.segment_bounds]
            cos, sin = torch.cat([c for c, _ in parts]), torch.cat([s for _, s in parts])
        else:
            cos, sin = self.rotary(positions)
        for layer in self.layers:
            x = layer.forward_paged(x, cos, sin, paged)
        return self.head(x[:, logit_rows])[0]

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 logits of the last layer's output ``x``: the final norm and lm_head."""
        return self.ops.head(x, self.lm_head, self.norm)
