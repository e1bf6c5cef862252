"""What a backend provides, and what its linear layers can do, declared in one place.

The model (backends/model.py) calls only what is declared here:
- a :class:`Backend` builds the model's projections (:meth:`Backend.make_linear`) and may offer its own
  batch-1 decode step through all layers (:meth:`Backend.decode_chain`);
- every projection is a :class:`Linear`. The base class computes each operation from ``forward``; a
  backend's layer overrides what its kernels do in one launch (the norm folded into the GEMV, the residual
  add or SiLU(gate) * up in its epilogue) and says how projections of one input fuse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
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


class Linear(nn.Module):
    """One projection of the model: ``forward(x, norm)`` is ``W(norm(x)) + b``."""

    in_features: int
    out_features: int

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W^T + b``."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        """The projection of ``norm(x)`` (of ``x`` without a norm); a layer may fold the norm into its kernel."""
        return self.project(norm(x) if norm is not None else x)

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``residual + self(x)``."""
        return residual + self(x)

    def silu_mul(self, x: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        """For gate and up fused into one layer (:meth:`fuse_glu`): ``silu(gate) * up`` of ``norm(x)``."""
        gate, up = self(x, norm).chunk(2, dim=-1)
        return F.silu(gate) * up

    @classmethod
    def fuse(cls, parts: list["Linear"]) -> "Linear | None":
        """One layer computing the parts' outputs side by side (they share their input), or None where
        this kind of layer does not fuse, or these parts cannot."""
        return None

    @classmethod
    def fuse_glu(cls, gate: "Linear", up: "Linear") -> "Linear | None":
        """gate and up as one layer for :meth:`silu_mul`, where the layer has a faster form than
        :meth:`fuse`'s; None to use :meth:`fuse`."""
        return None


class DenseLinear(Linear):
    """A dense weight ``[out, in]`` (layers a checkpoint stores unquantized, such as lm_head)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class DecodeChain(Protocol):
    """A backend's own way through all layers for one decoded token (attention by kernels.decode_attention)."""

    def takes(self, x: torch.Tensor) -> bool:
        """Whether it can run this step (``x``: the token's embedding)."""

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                 kv_len: int) -> torch.Tensor:
        """The last layer's output for ``x``, as the layers would compute it."""


class Backend:
    """A way to run GPTQ layers. Subclasses set ``name`` and ``description`` and build the layers."""

    name: str
    description: str

    def unavailable_reason(self, device: torch.device, qconfig: QuantConfig | None) -> str | None:
        """Why this backend cannot run here, or None when it can."""
        return None

    def make_linear(self, tensors: GPTQTensors, qconfig: QuantConfig, dtype: torch.dtype,
                    device: torch.device) -> Linear:
        raise NotImplementedError

    def preferred_dtype(self, device: torch.device) -> torch.dtype | None:
        """The activations' dtype the layers want on ``device`` when the user asks for none, or None."""
        return None

    def decode_chain(self, model: nn.Module) -> DecodeChain | None:
        """The backend's own batch-1 decode step through all of ``model``'s layers (a backends.model
        Transformer), or None."""
        return None

    def model_ops(self, device: torch.device) -> "TorchOps | None":
        """The model's non-linear steps (a backends.model TorchOps) this backend brings, or None: the
        device's."""
        return None

    def note(self, device: torch.device) -> str:
        """What the user should know about how it runs here (the load report), or ""."""
        return ""


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
