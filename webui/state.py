"""The app's one piece of mutable state: the models folder, the loaded model, running work."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from backends.constraints import Grammar
from backends.engine import EngineStats, kv_cache_bytes
from backends.generation import Generation
from backends.loader import (LoadedModel, LoadOptions, LoadProgress, default_context, kv_cache_dtype, load_model,
                             resolve_device, resolve_dtype)
from backends.memory import MemoryNeed, available_bytes, gigabytes, memory_need
from backends.model_config import load_model_args
from backends.quant_config import QuantConfig, load_quant_config
from backends.registry import all_backends, resolve_backend, suggested_backend
from backends.sampling import SamplingParams
from backends.weights import find_weight_files
from webui import templates
from webui.characters import CharacterLibrary
from webui.chats import ChatStore
from webui.settings import ModelSettings, SettingsStore

SHIPPED_CHARACTERS = Path(__file__).resolve().parent.parent / "characters"


class ModelNotLoaded(RuntimeError):
    def __init__(self) -> None:
        super().__init__("no model is loaded: load one in the Model tab")


@dataclass
class LoadReport:
    name: str
    settings: ModelSettings  # what was used, template resolved
    seconds: float
    loaded: LoadedModel

    def describe(self) -> str:
        m = self.loaded
        quant = describe_quant(m.qconfig)
        kv = f"KV cache {m.engine.stats().kv_tokens:,} tokens{' in fp8' if self.settings.kv_cache == 'fp8' else ''}"
        return (
            f"Loaded **{m.name}** ({quant}) with the **{m.backend}** backend"
            f"{f' ({m.backend_note})' if m.backend_note else ''} on {m.device}, "
            f"{str(m.dtype).removeprefix('torch.')}, context {m.context_length} tokens, "
            f"{kv}, "
            f"{m.memory_bytes() / 2**20:.0f} MB of weights and cache{gpu_memory(m.device)}, in {self.seconds:.1f} s."
        )


def describe_quant(q: QuantConfig | None) -> str:
    if q is None:
        return "not quantized"
    group = "no groups" if q.group_size == -1 else f"group size {q.group_size}"
    return f"{q.bits}-bit GPTQ, {group}, act-order {'on' if q.desc_act else 'off'}, {'sym' if q.sym else 'asym'}"


def describe_engine(stats: EngineStats) -> str:
    """The engine's load: generations running and waiting, the KV cache in use, prompt tokens it spared."""
    share = stats.kv_tokens_held / stats.kv_tokens if stats.kv_tokens else 0.0
    waiting = f", {stats.waiting} waiting for room in the cache" if stats.waiting else ""
    return (f"**Engine:** {stats.running} generating{waiting} · KV cache {stats.kv_tokens_held:,} of "
            f"{stats.kv_tokens:,} tokens in use ({share:.0%}) · {stats.reused_tokens:,} prompt tokens reused "
            "from the cache since the load")


def gpu_memory(device: torch.device) -> str:
    if device.type != "cuda":
        return ""
    return f" ({torch.cuda.memory_allocated(device) / 2**30:.2f} GiB allocated on the GPU)"


@dataclass
class AppState:
    models_dir: Path
    presets_dir: Path
    allow_pickle: bool = False
    user_data: Path | None = None  # saved chats and the like; None: "user_data" beside the models folder
    loaded: LoadedModel | None = None
    template: str = templates.AUTO
    load_report: LoadReport | None = None
    _load_lock: threading.Lock = field(default_factory=threading.Lock)
    _generations: weakref.WeakSet = field(default_factory=weakref.WeakSet)  # every unfinished one

    @property
    def user_folder(self) -> Path:
        return self.user_data or self.models_dir.parent / "user_data"

    @property
    def chats(self) -> ChatStore:
        return ChatStore(self.user_folder / "chats")

    @property
    def characters(self) -> CharacterLibrary:
        return CharacterLibrary(SHIPPED_CHARACTERS, self.user_folder / "characters")

    @property
    def settings(self) -> SettingsStore:
        return SettingsStore(self.models_dir)

    def local_models(self) -> list[str]:
        if not self.models_dir.is_dir():
            return []
        return sorted(
            (p.name for p in self.models_dir.iterdir()
             if p.is_dir() and not p.name.startswith(".") and (p / "config.json").is_file()),
            key=str.lower,
        )

    def model_path(self, name: str) -> Path:
        if not name or name not in self.local_models():
            raise ValueError(f"no model named {name!r} in {self.models_dir}; press refresh")
        return self.models_dir / name

    def describe_folder(self, name: str) -> str:
        """The quantization and weights of a model folder, or what is wrong with it, before loading."""
        path = self.model_path(name)
        try:
            qconfig = load_quant_config(path)
            files = find_weight_files(path, qconfig, allow_pickle=True)
            args = load_model_args(path)
        except (ValueError, OSError) as exc:
            return f"**Error:** {exc}"
        pickled = " — pickled: loading them needs 'Allow pickled weights'" if files.pickled else ""
        return (f"{describe_quant(qconfig)}; {args.architecture}, {args.n_layers} layers, hidden size {args.hidden_size}, "
                f"up to {args.max_position_embeddings} tokens; weights: {', '.join(f.name for f in files.files)} "
                f"({files.total_bytes / 2**20:.0f} MB){pickled}")

    def settings_for(self, name: str) -> ModelSettings:
        """Saved settings if any, else what suits this model on this machine."""
        return self.settings.get(name) or self.suggested_settings(name)

    def suggested_settings(self, name: str) -> ModelSettings:
        """What suits this model on this machine: the backend it would get, its context capped."""
        path = self.model_path(name)
        try:
            qconfig = load_quant_config(path)
            backend = suggested_backend(resolve_device("auto"), qconfig)
            context = default_context(load_model_args(path))
        except (ValueError, OSError):
            return ModelSettings()
        return ModelSettings(backend=backend, context_length=context)

    def memory_need(self, name: str, settings: ModelSettings) -> MemoryNeed | None:
        """What loading ``name`` with ``settings`` will take on this machine, or None where it cannot be told
        before loading (pickled weights)."""
        path = self.model_path(name)
        qconfig = load_quant_config(path)
        files = find_weight_files(path, qconfig, allow_pickle=True)
        if files.pickled:
            return None
        args = load_model_args(path)
        device = resolve_device("auto")
        backend = resolve_backend(settings.backend or "auto", device, qconfig)
        context = settings.context_length or default_context(args)
        dtype = resolve_dtype("auto", device, backend)
        kv_dtype = kv_cache_dtype(settings.kv_cache or "auto", device)
        return memory_need(files.files, args, qconfig, backend.name, dtype, device,
                           kv_cache_bytes(args, context, device, dtype, settings.cache_tokens, kv_dtype))

    def memory_check(self, name: str, settings: ModelSettings) -> tuple[MemoryNeed | None, int | None]:
        """What the load would need, and what is free now (each None where it cannot be told)."""
        need = self.memory_need(name, settings)
        return need, (available_bytes(need.device) if need is not None else None)

    def check_fits(self, name: str, settings: ModelSettings) -> None:
        """Refuses a load that would not fit in free memory, with the figures, before it swaps the machine."""
        need, free = self.memory_check(name, settings)
        if need is not None and free is not None and need.total > free:
            raise MemoryError(f"{name} would need {need.describe()}, and {gigabytes(free)} is free: choose a "
                              "shorter context, another backend or a smaller model")

    def backends(self) -> list[str]:
        return ["auto", *all_backends()]

    def load(self, name: str, settings: ModelSettings, allow_pickle: bool = False,
             progress: LoadProgress | None = None) -> LoadReport:
        path = self.model_path(name)
        kv_cache_dtype(settings.kv_cache or "auto", resolve_device("auto"))  # refused before the loaded one goes
        with self._load_lock:
            self.unload()
            started = time.perf_counter()
            self.check_fits(name, settings)
            options = LoadOptions(backend=settings.backend or "auto", context_length=settings.context_length,
                                  cache_tokens=settings.cache_tokens, kv_cache=settings.kv_cache or "auto",
                                  allow_pickle=allow_pickle or self.allow_pickle)
            try:
                loaded = load_model(path, options, progress)
            except torch.OutOfMemoryError as exc:
                self._free_memory()
                raise MemoryError(f"out of memory while loading {name}: try a shorter context or a smaller model "
                                  f"({str(exc).splitlines()[0]})") from exc
            # "Auto" is what the Model tab shows before a choice: the model's own template, or else the guess.
            chosen = settings.template if settings.template in templates.NAMED else None
            template = chosen or templates.guess_template(name, loaded.tokenizer)
            self.loaded, self.template = loaded, template
            used = replace(settings, context_length=loaded.context_length, template=template)
            self.load_report = LoadReport(name, used, time.perf_counter() - started, loaded)
            return self.load_report

    def unload(self) -> str | None:
        loaded, self.loaded, self.load_report = self.loaded, None, None
        if loaded is None:
            return None
        for generation in list(self._generations):
            generation.cancel.set()
        loaded.engine.close()  # ends what still runs or waits, and its thread
        name = loaded.name
        del loaded
        self._free_memory()
        return name

    @staticmethod
    def _free_memory() -> None:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def require_model(self) -> LoadedModel:
        if self.loaded is None:
            raise ModelNotLoaded()
        return self.loaded

    def generation(self, prompt_ids: list[int], params: SamplingParams, template: str | None = None,
                   logprobs: int | None = None, grammar: Grammar | None = None,
                   cancel: threading.Event | None = None) -> Generation:
        loaded = self.require_model()
        if template is not None:
            params = replace(
                params,
                stop_strings=params.stop_strings + templates.stop_strings(template),
                stop_token_ids=params.stop_token_ids + templates.stop_token_ids(loaded.tokenizer, template),
            )
        generation = Generation(loaded, prompt_ids, params, cancel, logprobs=logprobs, grammar=grammar)
        self._generations.add(generation)
        return generation
