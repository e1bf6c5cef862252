"""The engine's load and counters in Prometheus' text format, for ``GET /metrics``. Counters start again
at zero when a model is (re)loaded, as Prometheus expects of a restarted process."""

from __future__ import annotations

from backends.engine import END_REASONS, EngineStats

PREFIX = "gptq_workbench_"


def _escaped(label: str) -> str:
    return label.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def metrics_text(model: str | None, stats: EngineStats | None) -> str:
    lines: list[str] = []

    def metric(name: str, kind: str, about: str, samples: list[tuple[str, int]]) -> None:
        lines.extend([f"# HELP {PREFIX}{name} {about}", f"# TYPE {PREFIX}{name} {kind}"])
        lines.extend(f"{PREFIX}{name}{labels} {value}" for labels, value in samples)

    loaded = [(f'{{model="{_escaped(model)}"}}', 1)] if model is not None else [("", 0)]
    metric("model_loaded", "gauge", "Whether a model is loaded (labelled with its name).", loaded)
    if stats is not None:
        metric("requests_running", "gauge", "Generations running now.", [("", stats.running)])
        metric("requests_waiting", "gauge", "Requests waiting for room in the KV cache.", [("", stats.waiting)])
        metric("kv_cache_tokens", "gauge", "Tokens the KV cache holds in all.", [("", stats.kv_tokens)])
        metric("kv_cache_tokens_in_use", "gauge", "KV cache slots in blocks that generations hold.",
               [("", stats.kv_tokens_held)])
        metric("prompt_tokens_total", "counter", "Prompt tokens of the requests admitted.",
               [("", stats.prompt_tokens)])
        metric("prompt_tokens_reused_total", "counter", "Prompt tokens found in the cache instead of computed.",
               [("", stats.reused_tokens)])
        metric("generated_tokens_total", "counter", "Tokens sampled, end tokens included.",
               [("", stats.generated_tokens)])
        metric("requests_finished_total", "counter", "Requests ended, by reason.",
               [(f'{{reason="{reason}"}}', stats.finished.get(reason, 0)) for reason in END_REASONS])
    return "\n".join(lines) + "\n"
