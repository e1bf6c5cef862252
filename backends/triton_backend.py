"""The `triton` backend: GPTQ layers computed by the fused Triton kernel.

Act-order checkpoints are reordered once at load (rows sorted by group, the
activations permuted to match at run time), so the kernel always reads one
scale row per group. Runs on a CUDA GPU, or on the CPU under TRITON_INTERPRET=1
(slowly; that is how the tests run it).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from backends.base import GPTQTensors, concat_bias, same_tensor
from backends.quant_config import QuantConfig
from kernels.gptq_format import pack_rows, unpack_rows

# The kernel's smallest K block: contiguous groups must be a multiple of it.
KERNEL_GROUP_MULTIPLE = 32


def contiguous_layout(
    qweight: torch.Tensor, g_idx: torch.Tensor, bits: int, group_size: int
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Rows reordered so that groups are contiguous runs of ``group_size``.

    Returns the new qweight, the input permutation (None when no reordering
    was needed) and the group size the kernel should use (0: use g_idx).
    """
    in_features = g_idx.numel()
    g = g_idx.long()
    if group_size % KERNEL_GROUP_MULTIPLE:
        return qweight, None, 0  # the kernel's K blocks cannot tile these groups: read g_idx
    if torch.equal(g, torch.arange(in_features, device=g.device) // group_size):
        return qweight, None, group_size
    counts = torch.bincount(g)
    if not bool((counts[:-1] == group_size).all()):
        return qweight, None, 0  # irregular groups: the kernel reads g_idx row by row
    perm = torch.argsort(g, stable=True)
    q = unpack_rows(qweight, bits)[perm]
    return pack_rows(q, bits), perm, group_size


class TritonLinear(nn.Module):
    def __init__(self, t: GPTQTensors, qconfig: QuantConfig, dtype: torch.dtype, device: torch.device):
        super().__init__()
        from kernels.triton_gptq import gptq_matmul

        self._matmul = gptq_matmul
        self.in_features, self.out_features = t.in_features, t.out_features
        self.bits, self.zero_offset = qconfig.bits, qconfig.zero_offset
        group_size = qconfig.effective_group_size(t.in_features)
        g_idx = t.group_index(qconfig).to(device)  # regrouped where it will live: on a GPU that is much faster
        qweight, perm, self.group_size = contiguous_layout(t.qweight.to(device), g_idx, qconfig.bits, group_size)
        self.register_buffer("qweight", qweight.to(device).contiguous())
        self.register_buffer("scales", t.scales.to(device=device, dtype=torch.float16).contiguous())
        self.register_buffer("qzeros", t.qzeros.to(device).contiguous())
        self.register_buffer("g_idx", g_idx.to(device).contiguous())
        self.register_buffer("perm", perm.to(device) if perm is not None else None)
        bias = t.bias.to(device=device, dtype=dtype) if t.bias is not None else None
        self.register_buffer("bias", bias)

    @classmethod
    def fuse(cls, parts: list["TritonLinear"]) -> "TritonLinear | None":
        """One layer for projections of the same input (q/k/v, gate/up): one kernel call instead of several."""
        first = parts[0]
        bias = concat_bias(parts)
        layout = (first.bits, first.zero_offset, first.group_size)
        if (bias is False or any(p.out_features % (32 // p.bits) for p in parts)
                or any((p.bits, p.zero_offset, p.group_size) != layout for p in parts)
                or not same_tensor([p.perm for p in parts])
                or (first.group_size == 0 and not same_tensor([p.g_idx for p in parts]))):
            return None
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused._matmul = first._matmul
        fused.in_features, fused.out_features = first.in_features, sum(p.out_features for p in parts)
        fused.bits, fused.zero_offset, fused.group_size = layout
        for name in ("qweight", "scales", "qzeros"):
            fused.register_buffer(name, torch.cat([getattr(p, name) for p in parts], dim=1).contiguous())
        fused.register_buffer("g_idx", first.g_idx)
        fused.register_buffer("perm", first.perm)
        fused.register_buffer("bias", bias)
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(torch.float16)
        if self.perm is not None:
            x2 = x2[:, self.perm]
        y = self._matmul(x2.contiguous(), self.qweight, self.scales, self.qzeros, self.g_idx,
                         self.bits, self.zero_offset, self.group_size)
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y


class TritonBackend:
    name = "triton"
    description = "fused GPTQ dequant+matmul Triton kernel (CUDA GPU)"

    def unavailable_reason(self, device: torch.device, qconfig: QuantConfig | None) -> str | None:
        if qconfig is None:
            return "the model is not GPTQ-quantized"
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed"
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            return "it needs a CUDA GPU (or TRITON_INTERPRET=1 for slow CPU emulation)"
        return None

    def make_linear(self, tensors: GPTQTensors, qconfig: QuantConfig, dtype: torch.dtype, device: torch.device) -> nn.Module:
        return TritonLinear(tensors, qconfig, dtype, device)
