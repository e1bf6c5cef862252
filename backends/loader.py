"""Loading a checkpoint folder into a ready-to-generate model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from backends import tensor_names as names
from backends.base import Backend, DenseLinear, GPTQTensors, Linear
from backends.cuda_graph import GraphedDecoder
from backends.engine import Engine, engine_config
from backends.memory import release_freed_memory
from backends.model import TorchOps, Transformer
from backends.model_config import ModelArgs, load_model_args
from backends.quant_config import QuantConfig, load_quant_config
from backends.registry import all_backends, resolve_backend
from backends.tokenizer import load_tokenizer
from backends.weights import WeightsError, WeightStore, find_weight_files

LINEARS_PER_LAYER = 7  # q, k, v, o, gate, up, down
LoadProgress = Callable[[float, str], None]
DEFAULT_CONTEXT = 8192  # the most a model is loaded with unless asked: its KV cache takes memory


@dataclass(frozen=True)
class LoadOptions:
    backend: str = "auto"
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    dtype: str = "auto"  # "auto" | "float32" | "float16" | "bfloat16"
    context_length: int | None = None
    allow_pickle: bool = False
    cuda_graphs: bool = True  # decode by CUDA graph replay on a GPU (backends.cuda_graph)
    cache_tokens: int | None = None  # the engine's paged KV cache; None: engine.default_cache_tokens
    kv_cache: str = "auto"  # its keys and values: "auto" the model's dtype, "fp8" float8 e4m3 (see kv_cache_dtype)


@dataclass
class LoadedModel:
    path: Path
    model: Transformer
    tokenizer: object
    args: ModelArgs
    qconfig: QuantConfig | None
    backend: str
    device: torch.device
    dtype: torch.dtype
    context_length: int
    engine: Engine  # runs every generation, side by side
    backend_note: str = ""  # what the backend wants the user to know, e.g. which kernel it fell back to

    @property
    def name(self) -> str:
        return self.path.name

    def memory_bytes(self) -> int:
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        seen: set[int] = set()
        total = 0
        for t in tensors:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total


def default_context(args: ModelArgs) -> int:
    """The context a model is loaded with unless asked: its own, up to DEFAULT_CONTEXT."""
    return min(args.max_position_embeddings, DEFAULT_CONTEXT)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("CUDA was asked for but no CUDA GPU is available")
    return device


KV_CACHE_CHOICES = ("auto", "fp8")


def kv_cache_dtype(choice: str, device: torch.device) -> torch.dtype | None:
    """The engine's cache type for a ``LoadOptions.kv_cache`` choice (None: the model's). fp8 halves the cache
    (twice the tokens in the same memory, half the bytes each batched step reads) at a small cost in accuracy;
    it needs a GPU that converts fp8 (compute capability 8.9 and up: Ada, Hopper, Blackwell)."""
    if choice not in KV_CACHE_CHOICES:
        raise ValueError(f"KV cache {choice!r}: choose one of {', '.join(KV_CACHE_CHOICES)}")
    if choice == "auto":
        return None
    if device.type != "cuda":
        raise ValueError("an fp8 KV cache needs a GPU (compute capability 8.9 and up); on the CPU choose auto")
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        raise ValueError(f"an fp8 KV cache needs compute capability 8.9 and up (Ada, Hopper); "
                         f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}: choose auto")
    return torch.float8_e4m3fn


def resolve_dtype(name: str, device: torch.device, backend: Backend | None = None) -> torch.dtype:
    if name == "auto":
        preferred = backend.preferred_dtype(device) if backend is not None else None
        return preferred or (torch.float16 if device.type == "cuda" else torch.float32)
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in dtypes:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(dtypes)}")
    return dtypes[name]


class _LinearBuilder:
    """The model's LinearFactory: each projection built from the stored tensors."""

    def __init__(self, store: WeightStore, qconfig, backend: Backend, args: ModelArgs, dtype, device,
                 progress: LoadProgress | None = None):
        self.store, self.qconfig, self.backend = store, qconfig, backend
        self.args, self.dtype, self.device = args, dtype, device
        self.progress = progress
        self.built, self.total = 0, args.n_layers * LINEARS_PER_LAYER + 1  # and lm_head

    def __call__(self, name: str, in_features: int, out_features: int, bias: bool) -> Linear:
        linear = self._build(name, in_features, out_features)
        self.built += 1
        if self.progress is not None:
            self.progress(min(self.built / self.total, 1.0), f"{self.built} of {self.total} layers ({name})")
        return linear

    def _build(self, name: str, in_features: int, out_features: int) -> Linear:
        if f"{name}.qweight" in self.store:
            return self._quantized(name, in_features, out_features)
        weight_name = f"{name}.weight"
        if weight_name not in self.store and name == names.LM_HEAD and self.args.tie_word_embeddings:
            weight_name = names.EMBED
        weight = self._checked(weight_name, (out_features, in_features)).to(self.device, self.dtype)
        bias_name = f"{name}.bias"
        stored_bias = self.store.get(bias_name).to(self.device, self.dtype) if bias_name in self.store else None
        return DenseLinear(weight, stored_bias)

    def _checked(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in self.store:
            raise WeightsError(f"tensor '{name}' is missing from the weight files")
        tensor = self.store.get(name)
        if tuple(tensor.shape) != shape:
            raise WeightsError(f"tensor '{name}' has shape {tuple(tensor.shape)}, expected {shape}")
        return tensor

    def _quantized(self, name: str, in_features: int, out_features: int) -> Linear:
        q = self.qconfig
        if q is None:
            raise WeightsError(f"'{name}' is GPTQ-quantized but the model has no quantize_config.json")
        groups = q.group_count(in_features)
        hint = f" (does quantize_config.json's bits={q.bits}, group_size={q.group_size} match the weights?)"
        try:
            tensors = GPTQTensors(
                name=name,
                qweight=self._checked(f"{name}.qweight", (in_features * q.bits // 32, out_features)),
                qzeros=self._checked(f"{name}.qzeros", (groups, out_features * q.bits // 32)),
                scales=self._checked(f"{name}.scales", (groups, out_features)),
                g_idx=self._checked(f"{name}.g_idx", (in_features,)) if f"{name}.g_idx" in self.store else None,
                bias=self._checked(f"{name}.bias", (out_features,)) if f"{name}.bias" in self.store else None,
                in_features=in_features,
                out_features=out_features,
            )
        except WeightsError as exc:
            raise WeightsError(f"{exc}{hint}") from exc
        if tensors.g_idx is not None and int(tensors.g_idx.max()) >= groups:
            raise WeightsError(f"tensor '{name}.g_idx' names group {int(tensors.g_idx.max())} of {groups}{hint}")
        linear = self.backend.make_linear(tensors, q, self.dtype, self.device)
        if self.device.type == "cpu":
            release_freed_memory()  # the layer's transient buffers, before the next layer makes its own
        return linear


def _load_plain(model: Transformer, store: WeightStore, dtype, device) -> None:
    """The embedding and the norms (lm_head is a projection: the LinearFactory builds it)."""
    for stored, module in model.stored_dense().items():
        expected = tuple(module.weight.shape)
        if stored not in store:
            raise WeightsError(f"tensor '{stored}' is missing from the weight files")
        tensor = store.get(stored)
        if tuple(tensor.shape) != expected:
            raise WeightsError(f"tensor '{stored}' has shape {tuple(tensor.shape)}, expected {expected}")
        module.weight = torch.nn.Parameter(tensor.to(device, dtype), requires_grad=False)


def model_ops(device: torch.device) -> TorchOps:
    """The model's non-linear steps: kernels on a GPU where they import, else plain torch."""
    if device.type != "cuda":
        return TorchOps()
    try:
        from backends.cuda_ops import CudaOps
    except ImportError:  # no triton: the torch forms
        return TorchOps()
    return CudaOps(device)


def build_model(model_dir: Path, options: LoadOptions, progress: LoadProgress | None = None
                ) -> tuple[Transformer, ModelArgs, QuantConfig | None, str, torch.device, torch.dtype]:
    args = load_model_args(model_dir)
    qconfig = load_quant_config(model_dir)
    device = resolve_device(options.device)
    backend = resolve_backend(options.backend, device, qconfig)
    dtype = resolve_dtype(options.dtype, device, backend)
    store = WeightStore(find_weight_files(model_dir, qconfig, options.allow_pickle))
    model = Transformer(args, _LinearBuilder(store, qconfig, backend, args, dtype, device, progress),
                        backend.model_ops(device) or model_ops(device))
    _load_plain(model, store, dtype, device)
    model.fuse_projections()
    model.decode_chain = backend.decode_chain(model)
    if device.type == "cpu":
        release_freed_memory()
    model.rotary.to(device)
    model.eval()
    return model, args, qconfig, backend.name, device, dtype


def load_model(model_dir: str | Path, options: LoadOptions = LoadOptions(),
               progress: LoadProgress | None = None) -> LoadedModel:
    """``progress(fraction, text)`` hears of each layer built (the weights' reading and conversion)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise WeightsError(f"model folder {model_dir} does not exist")
    kv_dtype = kv_cache_dtype(options.kv_cache, resolve_device(options.device))  # refused before the weights load
    model, args, qconfig, backend, device, dtype = build_model(model_dir, options, progress)
    context = options.context_length or default_context(args)
    config = engine_config(context, device, options.cache_tokens, kv_dtype)
    decoder = None
    if device.type == "cuda":  # a lone sequence decodes on the batch-1 path: CUDA graphs, the decode chain
        model.setup_cache(batch=1, max_seq_len=context)
        decoder = GraphedDecoder(model) if options.cuda_graphs else None
    return LoadedModel(
        path=model_dir,
        model=model,
        tokenizer=load_tokenizer(model_dir),
        args=args,
        qconfig=qconfig,
        backend=backend,
        device=device,
        dtype=dtype,
        context_length=context,
        engine=Engine(model, context, config, decoder, graphs=options.cuda_graphs),
        backend_note=all_backends()[backend].note(device),
    )
