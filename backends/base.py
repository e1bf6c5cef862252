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

    # Optional: decode_chain(model) -> backends.model.DecodeChain | None, the backend's own batch-1 decode
    # step through all layers (the loader sets it as model.decode_chain).


def same_tensor(tensors: list[torch.Tensor | None]) -> bool:
    """All None, or all equal (for layouts that several projections must share to be fused)."""
    first = tensors[0]
    if first is None:
        return all(t is None for t in tensors)
    return all(t is not None and t.shape == first.shape and torch.equal(t, first) for t in tensors)


def concat_bias(parts: list) -> torch.Tensor | None | bool:
    """The fused bias, None if no part has one, False if only some have one (then they cannot fuse)."""
    biases = [p.bias for p in parts]
    if all(b is None for b in biases):
        return None
    if any(b is None for b in biases):
        return False
    return torch.cat(biases)
