"""Batch-1 decoding on the GPU: exllama and triton backends next to Hugging Face transformers in fp16.

    python -m benchmarks.decode [--sizes 7B 13B] [--decode-tokens 128]

For each size it writes random-weight GPTQ checkpoints with Llama-2 shapes (4-bit g128, without and with
act-order) to a temporary folder, loads them as the app does (backends.loader.load_model) and generates
greedily as the app does (backends.generation.Generation). It prints decode tokens/s after a 16-token
prompt, time to first token for a 2048-token prompt, peak GPU memory, and the memory-bandwidth roofline:
the bytes of the model's weights divided by the measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from backends.generation import Generation, GenerationResult
from backends.loader import LoadedModel, LoadOptions, load_model
from backends.sampling import SamplingParams
from benchmarks.llama2 import CONTEXT, SIZES, VOCAB, config, write_checkpoint
from kernels.timing import copy_bandwidth

PROMPT = 2048
SHORT_PROMPT = 16


def weight_bytes(model: torch.nn.Module) -> int:
    kv = {id(b) for layer in model.layers for b in layer.self_attn.kv_cache.buffers()}
    tensors = [t for t in list(model.parameters()) + list(model.buffers()) if id(t) not in kv]
    return sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in tensors}.values())


def generate(loaded: LoadedModel, prompt: list[int], new_tokens: int, fresh: bool = False) -> GenerationResult:
    """Greedy generation of ``new_tokens`` after ``prompt``; ``fresh``: no cached prefix is reused."""
    if fresh:
        loaded.engine.forget_prefixes()
    generation = Generation(loaded, prompt, SamplingParams(temperature=0, max_new_tokens=new_tokens))
    for _ in generation:
        pass
    return generation.result


def bench_own(path: Path, backend: str, decode_tokens: int) -> dict:
    torch.cuda.reset_peak_memory_stats()
    loaded = load_model(path, LoadOptions(backend=backend, context_length=CONTEXT))
    prompt = torch.randint(0, VOCAB, (PROMPT,), generator=torch.Generator().manual_seed(1)).tolist()
    generate(loaded, prompt, 1, fresh=True)  # compile and autotune
    ttft = min(generate(loaded, prompt, 1, fresh=True).prefill_seconds for _ in range(3))
    generate(loaded, prompt[:SHORT_PROMPT], decode_tokens + 1)  # captures the graphs of the buckets it crosses
    result = generate(loaded, prompt[:SHORT_PROMPT], decode_tokens + 1)
    assert result.decode_steps == decode_tokens, result
    row = {"backend": loaded.backend, "decode_tok_s": result.tokens_per_second, "ttft_ms": ttft * 1e3,
           "peak_gb": torch.cuda.max_memory_allocated() / 1e9, "weight_bytes": weight_bytes(loaded.model)}
    loaded.engine.close()  # its thread holds the model: without this the next backend's peak counts both
    del loaded
    gc.collect()
    torch.cuda.empty_cache()
    return row


def timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_transformers(model_config: dict, decode_tokens: int) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.cuda.reset_peak_memory_stats()
    torch.set_default_dtype(torch.float16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**model_config)).eval()
    torch.set_default_dtype(torch.float32)
    gen = torch.Generator(device="cuda").manual_seed(1)
    prompt = torch.randint(0, VOCAB, (1, PROMPT), device="cuda", generator=gen)
    with torch.inference_mode():
        model(prompt[:, :SHORT_PROMPT])
        ttft = min(timed(lambda: int(model(prompt).logits[0, -1].argmax())) for _ in range(3))

        def decode(steps: int) -> None:
            out = model(prompt[:, :SHORT_PROMPT], use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            for _ in range(steps):
                out = model(token, past_key_values=cache, use_cache=True)
                cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
                int(token)

        decode(4)
        prefill_s = timed(lambda: decode(0))
        seconds = timed(lambda: decode(decode_tokens)) - prefill_s
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    result = {"backend": "transformers fp16", "decode_tok_s": decode_tokens / seconds, "ttft_ms": ttft * 1e3,
              "peak_gb": torch.cuda.max_memory_allocated() / 1e9, "weight_bytes": weights}
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--backends", nargs="+", default=["exllama", "triton"], choices=["exllama", "triton"])
    parser.add_argument("--no-act-order", action="store_true", help="only the checkpoints without act-order")
    opts = parser.parse_args()
    props = torch.cuda.get_device_properties(0)
    bw = copy_bandwidth()
    print(f"{props.name}; copy bandwidth (read+write) {bw / 1e9:.0f} GB/s; {time.strftime('%Y-%m-%d')}", flush=True)
    rows = []
    for size in opts.sizes:
        for act_order in (False,) if opts.no_act_order else (False, True):
            with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
                started = time.time()
                path = write_checkpoint(Path(tmp) / "m", size, act_order)
                print(f"  wrote {size} act-order={act_order} in {time.time() - started:.0f} s", flush=True)
                for backend in opts.backends:
                    r = bench_own(path, backend, opts.decode_tokens)
                    rows.append({"size": size, "act_order": act_order, **r})
                    print(f"  {size} act={act_order} {backend}: {r['decode_tok_s']:.0f} tok/s", flush=True)
        if not opts.no_transformers:
            rows.append({"size": size, "act_order": None, **bench_transformers(config(size), opts.decode_tokens)})
            print(f"  {size} transformers: {rows[-1]['decode_tok_s']:.0f} tok/s", flush=True)

    print("\n| model | act-order | backend | decode tok/s | roofline tok/s | of roofline | vs transformers | "
          "TTFT 2048 tok (ms) | peak GPU GB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        roofline = bw / r["weight_bytes"]
        hf = next((x["decode_tok_s"] for x in rows if x["size"] == r["size"] and x["act_order"] is None), None)
        speedup = f"{r['decode_tok_s'] / hf:.1f}x" if hf else "-"
        act = "-" if r["act_order"] is None else ("yes" if r["act_order"] else "no")
        print(f"| Llama-2-{r['size']} | {act} | {r['backend']} | {r['decode_tok_s']:.0f} | {roofline:.0f} | "
              f"{r['decode_tok_s'] / roofline:.1%} | {speedup} | {r['ttft_ms']:.0f} | {r['peak_gb']:.1f} |")
    out = os.environ.get("OUT")
    if out:
        Path(out, f"decode_{'_'.join(opts.sizes)}.json").write_text(json.dumps(
            {"device": props.name, "copy_bw": bw, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
