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

from backends.base import GPTQTensors
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
