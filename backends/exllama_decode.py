"""Batch-1 decode through the exllama layers, each GEMV's split-K sums handed to the next kernel.

On the per-layer path (model.DecoderLayer) every GEMV finishes its own split-K
sums: a fence, an arrival counter and the last block's re-read of the sums,
which sit on the critical path of each of the four GEMVs of a layer (about
0.33 ms of a 2.2 ms 7B step on an H100). Here a GEMV leaves its
fp32 sums in its workspace (``q4_gemv(sums=True)``) and the kernel after it,
which waits for it to complete anyway, takes them as input:

- attention reads q, k and v from the qkv sums;
- the gate/up GEMV adds o_proj's sums to the residual stream, RMS-normalizes
  the result and stores it as the new residual stream (``x_sums``, ``x_out``);
- down_proj takes SiLU(gate) * up from the gate/up sums (``glu_sums``);
- the next layer's qkv GEMV adds down_proj's sums to the residual stream.

The values are rounded to fp16 where the per-layer path stores them, so both
paths compute the same numbers (up to the order of the fp32 atomic adds). The
residual stream alternates between two buffers: a kernel never overwrites rows
that another block of the same kernel still reads.

A workspace is zeroed by a kernel that starts after its reader has finished:
qkv(l) zeroes gate/up(l - 1), o_proj(l) zeroes qkv(l) and down(l - 1),
down(l) zeroes o_proj(l). The last layer's gate/up and down finish their sums
themselves (as on the per-layer path), so a step ends with every workspace zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from backends.exllama_linear import ExllamaLinear, cuda_gemv_unavailable
from backends.model import Attention, RMSNorm, Transformer
from kernels import decode_attention, q4_gemv


@dataclass
class _Layer:
    attn: Attention
    qkv: ExllamaLinear
    o: ExllamaLinear
    gate_up: ExllamaLinear
    down: ExllamaLinear
    input_norm: RMSNorm
    post_norm: RMSNorm


class SumsDecoder:
    """The model's layers for one token of batch 1 (``model.decode_chain``): ``x`` (the token's embedding,
    ``[1, 1, hidden]`` fp16) -> the last layer's output, before the final norm."""

    def __init__(self, layers: list[_Layer], hidden: int):
        self.layers = layers
        self.hidden = hidden
        self.residual: tuple[torch.Tensor, torch.Tensor] | None = None  # the stream's two buffers

    @classmethod
    def build(cls, model: Transformer) -> "SumsDecoder | None":
        """The chain for ``model``, or None where a layer is not made of fusable exllama GEMVs."""
        layers = []
        for layer in model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            parts = _Layer(attn, attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj,
                           layer.input_layernorm, layer.post_attention_layernorm)
            linears = (parts.qkv, parts.o, parts.gate_up, parts.down)
            if not all(type(m) is ExllamaLinear and m.bias is None for m in linears) or not parts.gate_up.glu:
                return None
            if not all(q4_gemv.supports(m.out_features, m.in_features, m.group_size) for m in linears):
                return None
            layers.append(parts)
        return cls(layers, model.args.hidden_size) if layers else None

    def takes(self, x: torch.Tensor) -> bool:
        """Whether this step can run here: one fp16 token on a GPU where the CUDA kernels run, the attention
        kernel set up (model.setup_cache)."""
        return (x.is_cuda and x.dtype == torch.float16 and x.shape == (1, 1, self.hidden)
                and cuda_gemv_unavailable(x.device) is None
                and all(p.attn.decode_workspace is not None for p in self.layers))

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                 kv_len: int) -> torch.Tensor:
        try:
            return self._step(x, cos, sin, positions, kv_len)
        except BaseException:
            self.reset()  # a step cut short (out of memory, a launch error) would leave sums for the next one
            raise

    def reset(self) -> None:
        """Every GEMV workspace zeroed, as a completed step leaves them."""
        for p in self.layers:
            for linear in (p.qkv, p.o, p.gate_up, p.down):
                if linear.workspace is not None:
                    linear.workspace.sums.zero_()
                    linear.workspace.counters.zero_()

    def _step(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
              kv_len: int) -> torch.Tensor:
        if self.residual is None or self.residual[0].device != x.device:
            self.residual = tuple(torch.zeros((1, self.hidden), dtype=torch.float16, device=x.device)
                                  for _ in range(2))
        after_attn, after_mlp = self.residual
        h = x.reshape(1, self.hidden)
        down_sums = None  # the previous layer's down_proj sums, still to be added to h
        previous: _Layer | None = None
        for i, p in enumerate(self.layers):
            last = i == len(self.layers) - 1
            qkv = p.qkv.cuda_gemv(h, p.input_norm, sums=True, x_sums=down_sums,
                                  x_out=after_attn if down_sums is not None else None,
                                  zero=_rows(previous.gate_up) if previous else ())
            if down_sums is not None:
                h = after_attn
            attn = p.attn

            def attention() -> torch.Tensor:  # (again, it writes the same cache slot: o_proj is tuned after it)
                return decode_attention.decode_attention(None, None, None, cos, sin, positions,
                                               attn.kv_cache.k, attn.kv_cache.v, kv_len, attn.sliding_window,
                                               attn.decode_workspace, qkv_sums=qkv.view(-1))

            o_sums = p.o.cuda_gemv(attention().view(1, -1), sums=True, follows=attention,
                                   zero=_rows(p.qkv) + (_rows(previous.down) if previous else ()))
            if last:  # finished in the kernels, as on the per-layer path: the step leaves no sums behind
                hidden = p.gate_up.cuda_gemv(h, p.post_norm, silu_mul=True, x_sums=o_sums, x_out=after_mlp)
                return p.down.cuda_gemv(hidden, residual=after_mlp, zero=_rows(p.o)).view(1, 1, self.hidden)
            gate_up = p.gate_up.cuda_gemv(h, p.post_norm, sums=True, x_sums=o_sums, x_out=after_mlp)
            h = after_mlp
            down_sums = p.down.cuda_gemv(None, glu_sums=gate_up, sums=True, zero=_rows(p.o))
            previous = p
        raise AssertionError("unreachable: the loop returns at its last layer")


def _rows(linear: ExllamaLinear) -> tuple[torch.Tensor]:
    """The part of a linear's workspace that a one-row call with ``sums=True`` writes."""
    return (linear.workspace.sums[0],)
