"""The backends by name, and the choice of one for a model and a machine."""

from __future__ import annotations

import torch

from backends.base import Backend
from backends.quant_config import QuantConfig
from backends.cpu_backend import CpuBackend
from backends.reference import ReferenceBackend


class BackendError(ValueError):
    """A backend that is unknown or cannot run the model on this machine."""


def all_backends() -> dict[str, Backend]:
    found: dict[str, Backend] = {"reference": ReferenceBackend(), "cpu": CpuBackend()}
    try:
        from backends.triton_backend import TritonBackend
        found["triton"] = TritonBackend()
    except ImportError:
        pass
    try:
        from backends.exllama_backend import ExllamaBackend
        found["exllama"] = ExllamaBackend()
    except ImportError:
        pass
    return found


# Fastest first: "auto" takes the first that can run the model here. On the CPU the Triton kernels only
# emulate (far slower), so there it is the packed cpu backend, else the reference.
PREFERENCE = ("exllama", "triton", "reference")
CPU_PREFERENCE = ("cpu", "reference")


def resolve_backend(name: str, device: torch.device, qconfig: QuantConfig | None) -> Backend:
    backends = all_backends()
    if name == "auto":
        for candidate in PREFERENCE if device.type == "cuda" else CPU_PREFERENCE:
            backend = backends.get(candidate)
            if backend is not None and backend.unavailable_reason(device, qconfig) is None:
                return backend
        raise BackendError("no backend can run this model here")
    backend = backends.get(name)
    if backend is None:
        raise BackendError(f"unknown backend {name!r}; available: {', '.join(backends)}")
    reason = backend.unavailable_reason(device, qconfig)
    if reason is not None:
        raise BackendError(f"backend {name!r} cannot run this model: {reason}")
    return backend


def suggested_backend(device: torch.device, qconfig: QuantConfig | None) -> str:
    return resolve_backend("auto", device, qconfig).name
