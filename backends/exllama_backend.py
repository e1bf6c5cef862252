"""The `exllama` backend: ExLlama's strategy for 4-bit GPTQ on the GPU.

At load, act-order checkpoints get ``q_perm`` (rows sorted by group) and
``q_invperm``; rows are repacked in that order so every group is a contiguous
run, and the activations are permuted to match at run time. Decode (a few
rows) runs the GEMV kernel once per row; longer inputs dequantize the layer
to fp16 and use cuBLAS, as ExLlama does above its row threshold. Both kernels
are Triton (kernels/triton_gptq.py), so there is nothing to build; on the CPU
they run under TRITON_INTERPRET=1, which is how the tests check them.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from backends.base import GPTQTensors, concat_bias, same_tensor
from backends.quant_config import QuantConfig
from kernels.gptq_format import pack_rows, unpack_rows

GEMV_MAX_ROWS = 4  # up to here, one GEMV per row; above, dequantize + cuBLAS


def act_order_permutation(g_idx: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(q_perm, q_invperm) that make groups contiguous, or None when they already are."""
    g = g_idx.long()
    if torch.equal(g, torch.arange(g.numel(), device=g.device) // group_size):
        return None
    q_perm = torch.argsort(g, stable=True)
    return q_perm, torch.argsort(q_perm)


class ExllamaLinear(nn.Module):
    def __init__(self, t: GPTQTensors, qconfig: QuantConfig, dtype: torch.dtype, device: torch.device):
        super().__init__()
        from kernels import triton_gptq

        self._kernels = triton_gptq
        self.in_features, self.out_features = t.in_features, t.out_features
        self.zero_offset = qconfig.zero_offset
        self.group_size = qconfig.effective_group_size(t.in_features)
        qweight = t.qweight.to(device)  # repacked where it will live: on a GPU that is much faster
        perms = act_order_permutation(t.group_index(qconfig).to(device), self.group_size)
        if perms is not None:
            qweight = pack_rows(unpack_rows(qweight, 4)[perms[0]], 4)
        self.register_buffer("qweight", qweight.to(device).contiguous())
        self.register_buffer("scales", t.scales.to(device=device, dtype=torch.float16).contiguous())
        self.register_buffer("qzeros", t.qzeros.to(device).contiguous())
        self.register_buffer("q_perm", perms[0].to(device) if perms else None)
        self.register_buffer("q_invperm", perms[1].to(device) if perms else None)
        bias = t.bias.to(device=device, dtype=dtype) if t.bias is not None else None
        self.register_buffer("bias", bias)

    @classmethod
    def fuse(cls, parts: list["ExllamaLinear"]) -> "ExllamaLinear | None":
        """One layer for projections of the same input (q/k/v, gate/up): one GEMV instead of several."""
        first = parts[0]
        bias = concat_bias(parts)
        if (bias is False or any(p.out_features % 8 for p in parts)
                or any((p.group_size, p.zero_offset) != (first.group_size, first.zero_offset) for p in parts)
                or not same_tensor([p.q_perm for p in parts])):
            return None
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused._kernels = first._kernels
        fused.in_features, fused.out_features = first.in_features, sum(p.out_features for p in parts)
        fused.zero_offset, fused.group_size = first.zero_offset, first.group_size
        for name in ("qweight", "scales", "qzeros"):
            fused.register_buffer(name, torch.cat([getattr(p, name) for p in parts], dim=1).contiguous())
        fused.register_buffer("q_perm", first.q_perm)
        fused.register_buffer("q_invperm", first.q_invperm)
        fused.register_buffer("bias", bias)
        return fused

    def dequantize(self) -> torch.Tensor:
        """The fp16 weight ``[in_features, out_features]`` in the checkpoint's row order."""
        w = self._kernels.gptq_dequantize(self.qweight, self.scales, self.qzeros, None, 4, self.zero_offset,
                                          self.group_size)
        return w[self.q_invperm] if self.q_invperm is not None else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(torch.float16)
        if self.q_perm is not None:
            x2 = x2[:, self.q_perm]
        x2 = x2.contiguous()
        k = self._kernels
        if x2.shape[0] <= GEMV_MAX_ROWS:
            rows = [k.gptq_gemv(x2[i : i + 1], self.qweight, self.scales, self.qzeros, 4, self.zero_offset,
                                self.group_size) for i in range(x2.shape[0])]
            y = rows[0] if len(rows) == 1 else torch.cat(rows)
        else:
            y = x2 @ k.gptq_dequantize(self.qweight, self.scales, self.qzeros, None, 4, self.zero_offset,
                                       self.group_size)
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y


class ExllamaBackend:
    name = "exllama"
    description = "ExLlama-style 4-bit: act-order permuted at load, GEMV decode, dequantize + cuBLAS prefill"

    def unavailable_reason(self, device: torch.device, qconfig: QuantConfig | None) -> str | None:
        if qconfig is None:
            return "the model is not GPTQ-quantized"
        if qconfig.bits != 4:
            return f"it runs 4-bit GPTQ only (this model is {qconfig.bits}-bit; use triton)"
        group = qconfig.group_size
        if group != -1 and group % 32:
            return f"group size {group} is not a multiple of 32 (use triton)"
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed"
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            return "it needs a CUDA GPU (or TRITON_INTERPRET=1 for slow CPU emulation)"
        return None

    def make_linear(self, tensors: GPTQTensors, qconfig: QuantConfig, dtype: torch.dtype, device: torch.device) -> nn.Module:
        return ExllamaLinear(tensors, qconfig, dtype, device)
