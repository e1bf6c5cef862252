"""GPTQ Workbench entry point.

The Gradio UI (issue 4) is not built yet; until then this is a terminal chat
on a local model folder, streaming token by token:

    python app.py --model models/TheBloke_SmolLM2-GPTQ [--backend auto|reference|triton]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from backends.generation import ContextOverflowError, Generation
from backends.loader import LoadOptions, load_model
from backends.sampling import SamplingParams


def pick_model(models_dir: Path) -> Path | None:
    found = sorted(p for p in models_dir.glob("*") if (p / "config.json").is_file() and not p.name.startswith("."))
    if not found:
        return None
    for i, p in enumerate(found):
        print(f"  [{i}] {p.name}")
    choice = input("model number: ").strip()
    return found[int(choice)] if choice.isdigit() and int(choice) < len(found) else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Chat with a GPTQ model in the terminal.")
    parser.add_argument("--model", type=Path, help="model folder (default: choose from --models-dir)")
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--context", type=int, default=None, help="context length in tokens")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--allow-pickle", action="store_true", help="load pickled .pt/.bin weights (unsafe)")
    opts = parser.parse_args(argv)
    path = opts.model or pick_model(opts.models_dir)
    if path is None:
        print(f"no model found in {opts.models_dir}; download one with: python -m webui.download owner/repo[:branch]")
        return 1
    try:
        loaded = load_model(path, LoadOptions(backend=opts.backend, context_length=opts.context,
                                              allow_pickle=opts.allow_pickle))
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"loaded {loaded.name} ({loaded.backend} backend, {loaded.device}, "
          f"{loaded.memory_bytes() / 2**20:.0f} MB). Empty line or Ctrl-D quits.")
    history: list[dict[str, str]] = []
    params = SamplingParams(temperature=opts.temperature, max_new_tokens=opts.max_new_tokens)
    while True:
        try:
            text = input("\nyou> ").strip()
        except EOFError:
            return 0
        if not text:
            return 0
        history.append({"role": "user", "content": text})
        ids = loaded.tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=True,
                                                   return_dict=True)["input_ids"]
        try:
            gen = Generation(loaded, ids, params)
            print("bot> ", end="", flush=True)
            for piece in gen:
                print(piece, end="", flush=True)
        except ContextOverflowError as exc:
            print(f"\nerror: {exc}")
            history.pop()
            continue
        except KeyboardInterrupt:
            gen.cancel.set()
        print(f"\n[{gen.result.new_tokens} tokens, {gen.result.tokens_per_second:.1f} tok/s]")
        history.append({"role": "assistant", "content": gen.result.text})


if __name__ == "__main__":
    raise SystemExit(main())
