"""GPTQ Workbench: the Gradio app.

    python app.py [--model NAME] [--backend auto|cpu|reference|triton|exllama] [--listen] [--port 7860]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home: the app works offline

ROOT = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Browser-based chat and model workbench for GPTQ models.")
    parser.add_argument("--listen", action="store_true", help="serve on all network interfaces (default: 127.0.0.1 only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--presets-dir", type=Path, default=ROOT / "presets")
    parser.add_argument("--user-data", type=Path, default=ROOT / "user_data", help="saved chats live here")
    parser.add_argument("--model", help="model folder name in --models-dir to load at start")
    parser.add_argument("--backend", default=None, help="backend for --model (default: its saved settings, else auto)")
    parser.add_argument("--context", type=int, default=None, help="context length for --model")
    parser.add_argument("--cache-tokens", type=int, default=None,
                        help="KV cache for --model, in tokens, shared by all running generations "
                             "(default: one context on the CPU, two on a GPU)")
    parser.add_argument("--kv-cache", choices=["auto", "fp8"], default=None,
                        help="KV cache type for --model: auto (the model's dtype) or fp8 (half the memory per token; "
                             "a GPU of compute capability 8.9+)")
    parser.add_argument("--gradio-auth", metavar="USER:PASS", help="require this login for the web UI")
    parser.add_argument("--allow-pickle", action="store_true", help="allow pickled .pt/.bin weights (they can run code)")
    parser.add_argument("--api", action="store_true", help="also serve an OpenAI-compatible API")
    parser.add_argument("--api-port", type=int, default=5000)
    parser.add_argument("--admin-key", action="append", default=[], metavar="KEY",
                        help="key for the API's model loading and unloading (/v1/internal/model/load, /unload); "
                             "repeatable; without one those endpoints are off")
    parser.add_argument("--api-key", action="append", default=[], metavar="KEY",
                        help="require 'Authorization: Bearer KEY' on the API (repeat for several keys)")
    opts = parser.parse_args(argv)
    if opts.gradio_auth and ":" not in opts.gradio_auth:
        parser.error("--gradio-auth takes USER:PASS")
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    logger = logging.getLogger("gptq_workbench")
    logger.setLevel(logging.INFO)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    from dataclasses import replace

    from webui.state import AppState
    from webui.ui import CSS, WorkbenchUI, theme

    state = AppState(models_dir=opts.models_dir, presets_dir=opts.presets_dir, allow_pickle=opts.allow_pickle,
                     user_data=opts.user_data)
    if opts.model:
        try:
            settings = state.settings_for(opts.model)
            if opts.backend:
                settings = replace(settings, backend=opts.backend)
            if opts.context:
                settings = replace(settings, context_length=opts.context)
            if opts.cache_tokens:
                settings = replace(settings, cache_tokens=opts.cache_tokens)
            if opts.kv_cache:
                settings = replace(settings, kv_cache=None if opts.kv_cache == "auto" else opts.kv_cache)
            print(state.load(opts.model, settings).describe().replace("**", ""), flush=True)
        except Exception as exc:  # noqa: BLE001 - the UI still starts, so the user can pick another model
            print(f"could not load {opts.model}: {exc}", file=sys.stderr, flush=True)
    host = "0.0.0.0" if opts.listen else "127.0.0.1"
    if opts.api:
        from webui.api import build_api, serve_in_background

        serve_in_background(build_api(state, opts.api_key, opts.admin_key), host, opts.api_port)
        lock = "" if opts.api_key else " (no --api-key: anyone who can reach it may use it)"
        print(f"OpenAI-compatible API on http://{host}:{opts.api_port}/v1{lock}", flush=True)
    demo = WorkbenchUI(state).build()
    demo.queue(default_concurrency_limit=4)
    auth = tuple(opts.gradio_auth.split(":", 1)) if opts.gradio_auth else None
    print(f"GPTQ Workbench on http://{host}:{opts.port}", flush=True)
    demo.launch(server_name=host, server_port=opts.port, auth=auth, theme=theme(), css=CSS,
                show_error=True, footer_links=[], ssr_mode=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
