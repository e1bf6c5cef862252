"""GPTQ layers that keep their weights packed for the Triton kernels (the triton and exllama backends).

Act-order checkpoints are reordered once at load (rows sorted by group into
``perm``, the activations permuted to match at run time), so the kernels read
one scale row per group. They run on a CUDA GPU, or on the CPU under
TRITON_INTERPRET=1 (slowly; that is how the tests run them).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from backends.base import GPTQTensors, Linear, concat_bias, same_tensor
from backends.quant_config import QuantConfig
from kernels import triton_gptq
from kernels.act_order import IrregularGroups, group_order
from kernels.gptq_format import pack_rows, unpack_rows

# The kernels' smallest K block: contiguous groups must be a multiple of it.
KERNEL_GROUP_MULTIPLE = 32
PACKED = ("qweight", "scales", "qzeros")  # concatenated along N when projections fuse


def contiguous_layout(
    qweight: torch.Tensor, g_idx: torch.Tensor, bits: int, group_size: int
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Rows reordered so that groups are contiguous runs of ``group_size``.

    Returns the new qweight, the input permutation (None when no reordering
    was needed) and the group size the kernel should use (0: use g_idx).
    """
    if group_size % KERNEL_GROUP_MULTIPLE:
        return qweight, None, 0  # the kernel's K blocks cannot tile these groups: read g_idx
    try:
        perm = group_order(g_idx, group_size)
    except IrregularGroups:
        return qweight, None, 0  # the kernel reads g_idx row by row
    if perm is None:
        return qweight, None, group_size
    q = unpack_rows(qweight, bits)[perm]
    return pack_rows(q, bits), perm, group_size


def kernel_unavailable_reason(device: torch.device, qconfig: QuantConfig | None) -> str | None:
    """Why the Triton kernels cannot run this model here, or None."""
    if qconfig is None:
        return "the model is not GPTQ-quantized"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "it needs a CUDA GPU (or TRITON_INTERPRET=1 for slow CPU emulation)"
    return None


class PackedGPTQLinear(Linear):
    """Packed GPTQ weights, regrouped at load; subclasses compute ``x @ W`` in :meth:`matmul`."""

    SHARED = ("g_idx", "perm")  # buffers that projections must have in common to fuse

    def __init__(self, t: GPTQTensors, qconfig: QuantConfig, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.in_features, self.out_features = t.in_features, t.out_features
        self.bits, self.zero_offset = qconfig.bits, qconfig.zero_offset
        group_size = qconfig.effective_group_size(t.in_features)
        g_idx = t.group_index(qconfig).to(device)  # regrouped where it will live: on a GPU that is much faster
        qweight, perm, self.group_size = contiguous_layout(t.qweight.to(device), g_idx, qconfig.bits, group_size)
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scales", t.scales.to(device=device, dtype=torch.float16).contiguous())
        self.register_buffer("qzeros", t.qzeros.to(device).contiguous())
        self.register_buffer("g_idx", g_idx.contiguous())
        self.register_buffer("perm", perm)
        bias = t.bias.to(device=device, dtype=dtype) if t.bias is not None else None
        self.register_buffer("bias", bias)

    @property
    def packed(self) -> triton_gptq.PackedWeight:
        """The weight as the Triton kernels take it (groups contiguous, or read through g_idx)."""
        return triton_gptq.PackedWeight(self.qweight, self.scales, self.qzeros, self.bits, self.zero_offset,
                                        self.group_size, self.g_idx)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """fp16 ``x`` ``[M, K]``, already permuted, contiguous -> ``[M, N]``."""
        return triton_gptq.gptq_matmul(x, self.packed)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(torch.float16)
        if self.perm is not None:
            x2 = x2[:, self.perm]
        y = self.matmul(x2.contiguous())
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y

    @classmethod
    def fuse(cls, parts: list["PackedGPTQLinear"]) -> "PackedGPTQLinear | None":
        """One layer for projections of the same input (q/k/v, gate/up): one kernel call instead of several."""
        first = parts[0]
        bias = concat_bias(parts)
        layout = (first.bits, first.zero_offset, first.group_size)
        if (bias is False or any(p.out_features % (32 // p.bits) for p in parts)
                or any((p.bits, p.zero_offset, p.group_size) != layout for p in parts)
                or not all(same_tensor([getattr(p, name) for p in parts]) for name in cls.SHARED)):
            return None
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.in_features, fused.out_features = first.in_features, sum(p.out_features for p in parts)
        fused.bits, fused.zero_offset, fused.group_size = layout
        for name in PACKED:
            fused.register_buffer(name, torch.cat([getattr(p, name) for p in parts], dim=1).contiguous())
        for name in cls.SHARED:
            fused.register_buffer(name, getattr(first, name))
        fused.register_buffer("bias", bias)
        return fused
