"""The cpu backend next to llama.cpp on this machine: a Llama-2-shaped model, 4-bit, random weights.

    pip install -r requirements-bench.txt   # llama-cpp-python 0.3.36, built from its sdist for this CPU
    python -m benchmarks.cpu_decode [--size 7B] [--new-tokens 32] [--rounds 3]

Ours: random 4-bit g128 GPTQ checkpoints (without and with act-order), loaded as the app loads them on a
CPU-only machine (backend "cpu") and run by backends.generation.Generation. llama.cpp: a random Q4_0 GGUF of
the same shape with Llama-2's vocabulary, through llama-cpp-python. Each row is measured in its own process:
load time, resident memory after load (over the process before it), time to the first token of a fresh
512-token prompt, and greedy decode tokens/s after it.

This machine's memory bandwidth drifts by a quarter from minute to minute (it is shared), and every figure here
follows it. So the engines run in rounds, one after the other in each round, each round led by the next
engine: the table gives each engine's median and range over the rounds, and each ratio to llama.cpp is the
median of the rounds' own ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.llama2 import SIZES, VOCAB, config, write_plain_tokenizer
from tests.gptq_testing import write_random_checkpoint

PROMPT = 512
CONTEXT = 1024


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def write_q4_0_gguf(path: Path, size: str, vocab_gguf: Path, seed: int = 0) -> Path:
    """A Llama GGUF of ``size`` with random weights, typed as llama.cpp's Q4_0 quantizer types them, and Llama-2's
    vocabulary."""
    import gguf

    shape = config(size)
    h, f, layers, heads = (shape[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                              "num_attention_heads"))
    vocab = gguf.GGUFReader(str(vocab_gguf))

    def field(name: str) -> list:
        entry = vocab.fields[name]
        return [entry.parts[i] for i in entry.data]

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(h)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(f)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_rope_dimension_count(h // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([bytes(t).decode("utf-8") for t in field("tokenizer.ggml.tokens")])
    writer.add_token_scores([float(s[0]) for s in field("tokenizer.ggml.scores")])
    writer.add_token_types([int(t[0]) for t in field("tokenizer.ggml.token_type")])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    rng = np.random.default_rng(seed)
    q4_0, q6_k = gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q6_K
    # llama.cpp's own Q4_0 quantizer (llama-quant.cpp) keeps output.weight in Q6_K: so does this file.
    tensors: list[tuple[str, tuple[int, int] | int, object]] = [("token_embd.weight", (VOCAB, h), q4_0)]
    for i in range(layers):
        b = f"blk.{i}"
        tensors += [(f"{b}.attn_norm.weight", h, None), (f"{b}.attn_q.weight", (h, h), q4_0),
                    (f"{b}.attn_k.weight", (h, h), q4_0), (f"{b}.attn_v.weight", (h, h), q4_0),
                    (f"{b}.attn_output.weight", (h, h), q4_0), (f"{b}.ffn_norm.weight", h, None),
                    (f"{b}.ffn_gate.weight", (f, h), q4_0), (f"{b}.ffn_up.weight", (f, h), q4_0),
                    (f"{b}.ffn_down.weight", (h, f), q4_0)]
    tensors += [("output_norm.weight", h, None), ("output.weight", (VOCAB, h), q6_k)]

    def data(shape, kind) -> np.ndarray:
        if kind is None:
            return np.ones(shape, dtype=np.float32)
        rows, cols = shape
        if kind == q4_0:  # block of 32: fp16 scale, 16 bytes of nibbles; weights 0.002 * (q - 8)
            blocks = rng.integers(0, 256, (rows, cols // 32, 18), dtype=np.uint8)
            blocks[:, :, :2] = np.frombuffer(np.float16(0.002).tobytes(), dtype=np.uint8)
        else:  # Q6_K, block of 256: ql[128], qh[64], int8 scales[16], fp16 d; weights d * scale * (q - 32)
            blocks = rng.integers(0, 256, (rows, cols // 256, 210), dtype=np.uint8)
            blocks[:, :, 192:208] = 4
            blocks[:, :, 208:] = np.frombuffer(np.float16(1.25e-4).tobytes(), dtype=np.uint8)
        return blocks.reshape(rows, -1)

    for name, shape, kind in tensors:
        if kind is None:
            writer.add_tensor_info(name, (shape,), np.dtype(np.float32), shape * 4)
            continue
        rows, cols = shape
        row_bytes = cols // 32 * 18 if kind == q4_0 else cols // 256 * 210
        writer.add_tensor_info(name, (rows, row_bytes), np.dtype(np.uint8), rows * row_bytes, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, shape, kind in tensors:
        writer.write_tensor_data(data(shape, kind))
    writer.close()
    return path


def run_ours(path: str, new_tokens: int) -> dict:
    from backends.loader import LoadOptions, load_model
    from benchmarks.decode import generate

    before = rss()
    started = time.perf_counter()
    loaded = load_model(path, LoadOptions(device="cpu", backend="cpu", context_length=CONTEXT))
    load_s = time.perf_counter() - started
    resident = rss() - before
    prompt = np.random.default_rng(1).integers(3, VOCAB, PROMPT).tolist()
    ttft = generate(loaded, prompt, 1, fresh=True).prefill_seconds
    decode = generate(loaded, prompt, new_tokens + 1).tokens_per_second
    return {"load_s": load_s, "resident": resident, "ttft_s": ttft, "decode_tok_s": decode}


def run_llama_cpp(path: str, new_tokens: int) -> dict:
    from llama_cpp import Llama

    before = rss()
    started = time.perf_counter()
    llm = Llama(model_path=path, n_ctx=CONTEXT, n_batch=PROMPT, n_threads=os.cpu_count(), verbose=False)
    load_s = time.perf_counter() - started
    resident = rss() - before
    prompt = np.random.default_rng(1).integers(3, VOCAB, PROMPT).tolist()

    def last_token() -> int:  # the last position's logits, in llama.cpp's own buffer (no copy)
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))

    started = time.perf_counter()
    llm.eval(prompt)
    token = last_token()
    ttft = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(new_tokens):
        llm.eval([token])
        token = last_token()
    return {"load_s": load_s, "resident": resident, "ttft_s": ttft,
            "decode_tok_s": new_tokens / (time.perf_counter() - started)}


def measure(kind: str, path: Path, new_tokens: int) -> dict:
    """One row, in a process of its own (resident memory and page cache as a fresh start sees them)."""
    out = subprocess.run([sys.executable, "-m", "benchmarks.cpu_decode", "--one", kind, str(path),
                          "--new-tokens", str(new_tokens)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="7B", choices=list(SIZES))
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="each engine once a round, in turn")
    parser.add_argument("--one", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.one:
        kind, path = opts.one
        row = run_ours(path, opts.new_tokens) if kind == "ours" else run_llama_cpp(path, opts.new_tokens)
        print(json.dumps(row))
        return
    from tests.seed_tokenizers import llama_vocab_gguf

    print(f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}; Llama-2-{opts.size} shapes, random weights", flush=True)
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        engines: list[tuple[str, str, Path]] = []
        for act_order in (False, True):
            folder = Path(tmp) / f"gptq-{act_order}"
            started = time.time()
            write_random_checkpoint(folder, config(opts.size), bits=4, group_size=128, act_order=act_order,
                                    sym=True, shared_g_idx=True, device="cpu")
            write_plain_tokenizer(folder, VOCAB)
            print(f"  wrote the GPTQ checkpoint (act-order {act_order}) in {time.time() - started:.0f} s", flush=True)
            engines.append((f"cpu backend, 4-bit g128{' act-order' if act_order else ''}", "ours", folder))
        gguf_path = write_q4_0_gguf(Path(tmp) / "model-q4_0.gguf", opts.size, llama_vocab_gguf())
        engines.append(("llama.cpp Q4_0", "llama.cpp", gguf_path))
        rounds: list[dict[str, dict]] = []
        for r in range(opts.rounds):
            rounds.append({})
            for name, kind, path in engines[r % len(engines):] + engines[:r % len(engines)]:  # each goes first in turn
                rounds[-1][name] = measure(kind, path, opts.new_tokens)
                print(f"  round {r + 1}, {name}: {rounds[-1][name]}", flush=True)
        sizes = {name: sum(p.stat().st_size for p in ([path] if path.is_file() else path.glob("*.safetensors")))
                 for name, _, path in engines}
    print(f"\n{opts.rounds} rounds; median (min–max)\n")
    print(f"| engine | file GB | load s | resident GB | TTFT {PROMPT} tok (s) | decode tok/s |")
    print("|---|---|---|---|---|---|")

    def cell(name: str, key: str, scale: float = 1.0) -> str:
        values = [row[name][key] / scale for row in rounds]
        return f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})"

    for name, _, _ in engines:
        print(f"| {name} | {sizes[name] / 1e9:.2f} | {cell(name, 'load_s')} | {cell(name, 'resident', 1e9)} | "
              f"{cell(name, 'ttft_s')} | {cell(name, 'decode_tok_s')} |")
    llama = engines[-1][0]
    for name, _, _ in engines[:-1]:
        decode = [row[name]["decode_tok_s"] / row[llama]["decode_tok_s"] for row in rounds]
        prefill = [row[name]["ttft_s"] / row[llama]["ttft_s"] for row in rounds]
        print(f"{name}: decode {statistics.median(decode):.2f}x llama.cpp's speed "
              f"(rounds: {', '.join(f'{v:.2f}' for v in decode)}), prefill {statistics.median(prefill):.2f}x its "
              f"time (rounds: {', '.join(f'{v:.2f}' for v in prefill)})")

if __name__ == "__main__":
    main()
