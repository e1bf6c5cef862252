"""The pure-PyTorch backend: GPTQ weights dequantized once, then plain matmuls.

Runs anywhere torch runs (CPU or any GPU) and is the oracle for the kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from backends.base import GPTQTensors, concat_bias
from backends.quant_config import QuantConfig
from kernels.gptq_format import dequantize


class DequantizedLinear(nn.Module):
    def __init__(self, tensors: GPTQTensors, qconfig: QuantConfig, dtype: torch.dtype, device: torch.device):
        super().__init__()
        w = dequantize(
            tensors.qweight.to(device),
            tensors.qzeros.to(device),
            tensors.scales.to(device),
            tensors.group_index(qconfig).to(device),
            qconfig.bits,
            qconfig.zero_offset,
            torch.float32,
        )
        self.in_features = tensors.in_features
        self.out_features = tensors.out_features
        self.weight = nn.Parameter(w.t().contiguous().to(dtype), requires_grad=False)
        bias = tensors.bias.to(device=device, dtype=dtype) if tensors.bias is not None else None
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    @classmethod
    def fuse(cls, parts: list["DequantizedLinear"]) -> "DequantizedLinear | None":
        """One layer computing the parts' outputs side by side (they share their input)."""
        bias = concat_bias(parts)
        if bias is False:
            return None
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.in_features = parts[0].in_features
        fused.out_features = sum(p.out_features for p in parts)
        fused.weight = nn.Parameter(torch.cat([p.weight for p in parts]), requires_grad=False)
        fused.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        return fused


class ReferenceBackend:
    name = "reference"
    description = "pure PyTorch, dequantized weights (CPU or any GPU)"

    def unavailable_reason(self, device: torch.device, qconfig: QuantConfig | None) -> str | None:
        return None

    def make_linear(
        self, tensors: GPTQTensors, qconfig: QuantConfig, dtype: torch.dtype, device: torch.device
    ) -> nn.Module:
        return DequantizedLinear(tensors, qconfig, dtype, device)
