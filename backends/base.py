"""What every backend provides: quantized linear layers for the model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from backends.quant_config import QuantConfig


@dataclass(frozen=True)
class GPTQTensors:
    """The stored tensors of one GPTQ-quantized linear layer."""

    name: str
    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor | None
    bias: torch.Tensor | None
    in_features: int
    out_features: int

    def group_index(self, qconfig: QuantConfig) -> torch.Tensor:
        """``g_idx`` as stored, or the plain contiguous one when the checkpoint has none."""
        if self.g_idx is not None:
            return self.g_idx.to(torch.int32)
        size = qconfig.effective_group_size(self.in_features)
        return (torch.arange(self.in_features, dtype=torch.int32) // size).to(self.qweight.device)


class Backend(Protocol):
    name: str
    description: str

    def unavailable_reason(self, device: torch.device, qconfig: QuantConfig | None) -> str | None:
        """Why this backend cannot run here, or None when it can."""

    def make_linear(
        self, tensors: GPTQTensors, qconfig: QuantConfig, dtype: torch.dtype, device: torch.device
    ) -> nn.Module: ...
