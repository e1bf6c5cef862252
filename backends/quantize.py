"""Quantize an fp16/fp32 Llama or Mistral checkpoint into a GPTQ checkpoint.

The result is laid out exactly as AutoGPTQ saves it: ``quantize_config.json``,
``model.safetensors`` with ``qweight``/``qzeros``/``scales``/``g_idx`` per
linear layer (fp16 for everything else), config.json and the tokenizer files.

    python -m backends.quantize SRC_DIR OUT_DIR --bits 4 --group-size 128 --act-order
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file
from torch import nn

from backends import tensor_names as names
from backends.gptq_quantizer import QuantizedWeight, gptq_quantize
from backends.loader import LoadOptions, build_model
from backends.model import Transformer
from backends.quant_config import QuantConfig
from kernels.gptq_format import pack_cols, pack_rows

# AutoGPTQ's "true sequential" order: each group sees the outputs of the quantized groups before it.
SEQUENTIAL_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "generation_config.json",
    "chat_template.jinja",
)


class HessianHook:
    """Accumulates 2/n * X^T X over the inputs a linear layer sees."""

    def __init__(self, in_features: int):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.n = 0

    def __call__(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output) -> None:
        x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
        count = x.shape[0]
        self.H *= self.n / (self.n + count)
        self.n += count
        x = x * (2.0 / self.n) ** 0.5
        self.H += x.t() @ x


def pack_layer(qw: QuantizedWeight, qconfig: QuantConfig, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
    stored_zeros = qw.zeros - qconfig.zero_offset
    if int(stored_zeros.min()) < 0:
        raise ValueError("a zero point of 0 cannot be stored in the v1 GPTQ format")
    tensors = {
        "qweight": pack_rows(qw.q.t().contiguous(), qconfig.bits),
        "qzeros": pack_cols(stored_zeros, qconfig.bits),
        "scales": qw.scales.contiguous(),
        "g_idx": qw.g_idx.contiguous(),
    }
    if bias is not None:
        tensors["bias"] = bias.detach().half()
    return tensors


def quantize_model(
    model: Transformer,
    calibration: torch.Tensor,
    qconfig: QuantConfig,
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, torch.Tensor]:
    """Quantize every decoder linear layer in place; returns the packed tensors by name."""
    packed: dict[str, torch.Tensor] = {}
    seq_len = calibration.shape[1]
    positions = torch.arange(seq_len)
    cos, sin = model.rotary(positions)
    mask = model.attention_mask(positions, seq_len)
    with torch.no_grad():
        x = model.embed_tokens(calibration)
        for index, layer in enumerate(model.layers):
            for group in SEQUENTIAL_GROUPS:
                linears = {name: layer.get_submodule(name) for name in group}
                hooks = {name: HessianHook(lin.in_features) for name, lin in linears.items()}
                handles = [linears[n].register_forward_hook(hooks[n]) for n in group]
                layer(x, cos, sin, positions, mask, seq_len, cached=False)
                for handle in handles:
                    handle.remove()
                for name, linear in linears.items():
                    qw = gptq_quantize(
                        linear.weight.float(),
                        hooks[name].H,
                        qconfig.bits,
                        qconfig.group_size,
                        qconfig.sym,
                        qconfig.desc_act,
                        qconfig.damp_percent,
                        min_zero=qconfig.zero_offset,
                    )
                    linear.weight.data = qw.dequantize().to(linear.weight.dtype)
                    for key, tensor in pack_layer(qw, qconfig, linear.bias).items():
                        packed[f"{names.layer(index)}.{name}.{key}"] = tensor
            x = layer(x, cos, sin, positions, mask, seq_len, cached=False)
            progress(f"layer {index + 1}/{len(model.layers)} quantized")
    return packed


def calibration_batches(tokenizer, text: str, seq_len: int, count: int) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    if ids.numel() < seq_len:
        raise ValueError(f"calibration text has {ids.numel()} tokens, fewer than one {seq_len}-token sample")
    starts = torch.linspace(0, ids.numel() - seq_len, count).long()
    return torch.stack([ids[s : s + seq_len] for s in starts])


def save_gptq_checkpoint(
    src_dir: Path,
    out_dir: Path,
    model: Transformer,
    packed: dict[str, torch.Tensor],
    qconfig: QuantConfig,
    config_block: bool = False,
) -> None:
    """Write the checkpoint to a temporary folder and rename it into place when complete."""
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = dict(packed)
    for name, module in model.stored_dense().items():
        tensors[name] = module.weight.detach().half()
    if not model.args.tie_word_embeddings:
        tensors[f"{names.LM_HEAD}.weight"] = model.lm_head.weight.detach().half()
    base = qconfig.model_file_base_name or "model"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / f"{base}.safetensors"), metadata={"format": "pt"})
    config = json.loads((src_dir / "config.json").read_text())
    config.pop("quantization_config", None)
    if config_block:
        config["quantization_config"] = qconfig.to_json()
    else:
        (tmp / "quantize_config.json").write_text(json.dumps(qconfig.to_json(), indent=2))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    for name in TOKENIZER_FILES:
        if (src_dir / name).is_file():
            shutil.copy2(src_dir / name, tmp / name)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)


def quantize_checkpoint(src_dir: Path, out_dir: Path, qconfig: QuantConfig, calibration_text: str, seq_len: int = 256,
                        samples: int = 16, config_block: bool = False,
                        progress: Callable[[str], None] = lambda _: None) -> None:
    from backends.loader import load_tokenizer

    model, *_ = build_model(src_dir, LoadOptions(backend="reference", device="cpu", dtype="float32"))
    tokenizer = load_tokenizer(src_dir)
    batches = calibration_batches(tokenizer, calibration_text, seq_len, samples)
    packed = quantize_model(model, batches, qconfig, progress)
    save_gptq_checkpoint(src_dir, out_dir, model, packed, qconfig, config_block)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="unquantized checkpoint folder (safetensors)")
    parser.add_argument("out", type=Path)
    parser.add_argument("--bits", type=int, default=4, choices=(4, 8))
    parser.add_argument("--group-size", type=int, default=128, choices=(32, 64, 128, -1))
    parser.add_argument("--act-order", action="store_true")
    parser.add_argument("--asym", action="store_true")
    parser.add_argument("--calibration", type=Path, required=True, help="a text file")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    opts = parser.parse_args()
    qconfig = QuantConfig(
        bits=opts.bits, group_size=opts.group_size, desc_act=opts.act_order, sym=not opts.asym
    )
    quantize_checkpoint(
        opts.src, opts.out, qconfig, opts.calibration.read_text(), opts.seq_len, opts.samples, progress=print
    )


if __name__ == "__main__":
    main()
