"""A GPTQ layer's packed weight, as the Triton kernels take it."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # the kernels emulated on the CPU (tests)


@dataclass(frozen=True)
class PackedWeight:
    """``W`` ``[K, N]`` in the GPTQ layout (see kernels.gptq_format): ``bits``-bit values packed along K in
    ``qweight`` ``[K * bits / 32, N]``, fp16 ``scales`` and packed zero points ``qzeros`` per group.

    ``group_size`` > 0: groups are contiguous runs of that many rows (``g_idx`` unused); 0: row k is in group
    ``g_idx[k]`` (act-order checkpoints that could not be regrouped)."""

    qweight: torch.Tensor
    scales: torch.Tensor
    qzeros: torch.Tensor
    bits: int
    zero_offset: int
    group_size: int
    g_idx: torch.Tensor | None = None

    def __post_init__(self):
        if self.group_size == 0 and self.g_idx is None:
            raise ValueError("g_idx is needed when groups are not contiguous")

    @property
    def k(self) -> int:
        return self.qweight.shape[0] * (32 // self.bits)

    @property
    def n(self) -> int:
        return self.qweight.shape[1]

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What a call reads (the tuner times calls on copies of them)."""
        return self.qweight, self.scales, self.qzeros

    def on(self, tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> "PackedWeight":
        """The same layout over other tensors (a copy of :attr:`tensors`)."""
        qweight, scales, qzeros = tensors
        return PackedWeight(qweight, scales, qzeros, self.bits, self.zero_offset, self.group_size, self.g_idx)
