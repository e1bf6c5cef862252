"""Batch-1 decoding on the GPU: exllama and triton backends next to Hugging Face transformers in fp16.

    python benchmarks/decode.py [--sizes 7B 13B] [--decode-tokens 128]

For each size it writes random-weight GPTQ checkpoints with Llama-2 shapes
(4-bit g128, without and with act-order) to a temporary folder, loads them
the way the app does, and prints decode tokens/s (after a 16-token prompt,
CUDA-graph replay + greedy pick per token, the next step queued before
the host reads the token, as the app decodes), time to first token for a
2048-token prompt, peak GPU memory, and the memory-bandwidth roofline: the
bytes of the model's weights divided by the measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backends.cuda_graph import GraphedDecoder  # noqa: E402
from backends.generation import PREFILL_CHUNK_GPU, TokenPipe  # noqa: E402
from backends.loader import LoadOptions, build_model  # noqa: E402

SIZES = {
    "7B": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32},
    "13B": {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40},
}
VOCAB = 32000
CONTEXT = 4096
PROMPT = 2048
GROUP = 128


def llama2_config(size: str) -> dict:
    shape = SIZES[size]
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB,
            "num_key_value_heads": shape["num_attention_heads"], "max_position_embeddings": CONTEXT,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "float16",
            **shape}


def write_random_gptq(folder: Path, config: dict, act_order: bool) -> Path:
    """A 4-bit g128 GPTQ checkpoint of random weights, in AutoGPTQ's format, built on the GPU."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "quantize_config.json").write_text(json.dumps(
        {"bits": 4, "group_size": GROUP, "desc_act": act_order, "sym": True, "model_file_base_name": "model"}))
    h, f = config["hidden_size"], config["intermediate_size"]
    gen = torch.Generator(device="cuda").manual_seed(0)
    tensors: dict[str, torch.Tensor] = {}

    perms: dict[str, torch.Tensor] = {}

    def linear(name: str, k: int, n: int, shared_input: str | None = None) -> None:
        tensors[f"{name}.qweight"] = torch.randint(-2**31, 2**31 - 1, (k // 8, n), dtype=torch.int32, device="cuda",
                                                   generator=gen).cpu()
        tensors[f"{name}.qzeros"] = torch.full((k // GROUP, n // 8), 0x77777777, dtype=torch.int32)  # zero 8 (v1: 7)
        tensors[f"{name}.scales"] = (torch.rand((k // GROUP, n), device="cuda", generator=gen) * 0.004 + 0.001).half().cpu()
        g = torch.arange(k, device="cuda") // GROUP
        if act_order:  # projections of one input share their order, as in real checkpoints (same Hessian)
            key = shared_input or name
            if key not in perms:
                perms[key] = torch.randperm(k, device="cuda", generator=gen)
            g = g[perms[key]]
        tensors[f"{name}.g_idx"] = g.int().cpu()

    def dense(name: str, *shape: int) -> None:
        tensors[name] = (torch.randn(shape, device="cuda", generator=gen) * 0.02).half().cpu()

    dense("model.embed_tokens.weight", VOCAB, h)
    dense("lm_head.weight", VOCAB, h)
    tensors["model.norm.weight"] = torch.ones(h, dtype=torch.float16)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj"):
            linear(f"{p}.self_attn.{proj}", h, h, shared_input=f"{p}.attn_in")
        linear(f"{p}.self_attn.o_proj", h, h)
        linear(f"{p}.mlp.gate_proj", h, f, shared_input=f"{p}.mlp_in")
        linear(f"{p}.mlp.up_proj", h, f, shared_input=f"{p}.mlp_in")
        linear(f"{p}.mlp.down_proj", f, h)
        tensors[f"{p}.input_layernorm.weight"] = torch.ones(h, dtype=torch.float16)
        tensors[f"{p}.post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.float16)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def copy_bandwidth() -> float:
    import triton

    src = torch.empty(2 * 1024**3 // 2, dtype=torch.float16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    del src, dst
    return 2 * 1024**3 * 2 / (ms * 1e-3)


def weight_bytes(model: torch.nn.Module) -> int:
    kv = {id(b) for layer in model.layers for b in layer.self_attn.kv_cache.buffers()}
    tensors = [t for t in list(model.parameters()) + list(model.buffers()) if id(t) not in kv]
    return sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in tensors}.values())


def timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_own(path: Path, backend: str, decode_tokens: int) -> dict:
    torch.cuda.reset_peak_memory_stats()
    model, args, _, name, device, _ = build_model(path, LoadOptions(backend=backend, context_length=CONTEXT))
    model.setup_cache(batch=1, max_seq_len=CONTEXT)
    decoder = GraphedDecoder(model)
    gen = torch.Generator(device="cuda").manual_seed(1)
    prompt = torch.randint(0, VOCAB, (1, PROMPT), device=device, generator=gen)

    def prefill(n: int) -> int:
        logits = None
        with torch.inference_mode():
            for start in range(0, n, PREFILL_CHUNK_GPU):  # as backends.generation prefills on a GPU
                chunk = prompt[:, start : min(start + PREFILL_CHUNK_GPU, n)]
                logits = model(chunk, torch.arange(start, start + chunk.shape[1], device=device))
        return int(logits[0, -1].argmax())

    prefill(PROMPT)  # compile and autotune
    ttft = min(timed(lambda: prefill(PROMPT)) for _ in range(3))

    def decode(first: int, start: int, steps: int) -> None:
        # As backends.generation runs it: the greedy pick stays on the GPU, the next step is queued
        # before the host reads the token.
        pipe = TokenPipe(device)
        with torch.inference_mode():
            logits = decoder.step(first, start)
            for i in range(steps):
                token = torch.argmax(logits).view(1)
                pipe.send(token)
                if i + 1 < steps:
                    logits = decoder.step(token, start + i + 1)
                pipe.receive()

    short = 16
    first = prefill(short)
    decode(first, short, decode_tokens)  # captures the graphs of the buckets it crosses
    seconds = timed(lambda: decode(first, short, decode_tokens))
    result = {"backend": name, "decode_tok_s": decode_tokens / seconds, "ttft_ms": ttft * 1e3,
              "peak_gb": torch.cuda.max_memory_allocated() / 1e9, "weight_bytes": weight_bytes(model)}
    del model, decoder
    gc.collect()
    torch.cuda.empty_cache()
    return result


def bench_transformers(config: dict, decode_tokens: int) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.cuda.reset_peak_memory_stats()
    torch.set_default_dtype(torch.float16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**config)).eval()
    torch.set_default_dtype(torch.float32)
    gen = torch.Generator(device="cuda").manual_seed(1)
    prompt = torch.randint(0, VOCAB, (1, PROMPT), device="cuda", generator=gen)
    with torch.inference_mode():
        model(prompt[:, :16])
        ttft = min(timed(lambda: int(model(prompt).logits[0, -1].argmax())) for _ in range(3))

        def decode(steps: int) -> None:
            out = model(prompt[:, :16], use_cache=True)
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
        config = llama2_config(size)
        for act_order in (False,) if opts.no_act_order else (False, True):
            with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
                started = time.time()
                path = write_random_gptq(Path(tmp) / "m", config, act_order)
                print(f"  wrote {size} act-order={act_order} in {time.time() - started:.0f} s", flush=True)
                for backend in opts.backends:
                    r = bench_own(path, backend, opts.decode_tokens)
                    rows.append({"size": size, "act_order": act_order, **r})
                    print(f"  {size} act={act_order} {backend}: {r['decode_tok_s']:.0f} tok/s", flush=True)
        if not opts.no_transformers:
            rows.append({"size": size, "act_order": None, **bench_transformers(config, opts.decode_tokens)})
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
