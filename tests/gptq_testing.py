"""Independent GPTQ helpers for tests: numpy packing and dequantization written
from the format's description, not from the project's code, and tiny random
checkpoints with their Hugging Face transformers twin as the oracle.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in fp32."""
    return float((a.float() - b.float()).norm() / b.float().norm())


def np_pack(values: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Pack unsigned ``values`` along ``axis``, value j of a word at bit j*bits."""
    per = 32 // bits
    v = np.moveaxis(values.astype(np.uint64), axis, 0)
    words = np.zeros((v.shape[0] // per,) + v.shape[1:], dtype=np.uint64)
    for j in range(per):
        words |= v[j::per] << np.uint64(j * bits)
    return np.ascontiguousarray(np.moveaxis(words.astype(np.uint32).view(np.int32), 0, axis))


def np_unpack(words: np.ndarray, bits: int, axis: int) -> np.ndarray:
    per = 32 // bits
    w = np.moveaxis(words.view(np.uint32).astype(np.int64), axis, 0)
    out = np.zeros((w.shape[0] * per,) + w.shape[1:], dtype=np.int64)
    for j in range(per):
        out[j::per] = (w >> (j * bits)) & ((1 << bits) - 1)
    return np.moveaxis(out, 0, axis)


def np_dequantize(t: dict[str, torch.Tensor], bits: int, zero_offset: int) -> np.ndarray:
    """The dense ``[out, in]`` fp64 weight of one GPTQ layer."""
    q = np_unpack(t["qweight"].numpy(), bits, axis=0)
    zeros = np_unpack(t["qzeros"].numpy(), bits, axis=1) + zero_offset
    scales = t["scales"].numpy().astype(np.float64)
    g = t["g_idx"].numpy().astype(np.int64)
    w = (q - zeros[g]) * scales[g]
    return w.T


def random_gptq_layer(
    in_features: int, out_features: int, bits: int, group_size: int, act_order: bool, sym: bool,
    rng: np.random.Generator, scale: float = 0.02,
) -> dict[str, torch.Tensor]:
    """Random GPTQ tensors stored in the v1 format (zero points minus one)."""
    maxq = 2**bits - 1
    gs = in_features if group_size == -1 else group_size
    groups = -(-in_features // gs)
    q = rng.integers(0, maxq + 1, size=(in_features, out_features))
    if sym:
        zeros = np.full((groups, out_features), (maxq + 1) // 2)
    else:
        zeros = rng.integers(1, maxq + 1, size=(groups, out_features))
    scales = (rng.uniform(0.5, 1.5, size=(groups, out_features)) * scale * 16 / (maxq + 1)).astype(np.float16)
    g_idx = np.arange(in_features) // gs
    if act_order:
        g_idx = rng.permutation(g_idx)
    return {
        "qweight": torch.from_numpy(np_pack(q, bits, axis=0)),
        "qzeros": torch.from_numpy(np_pack(zeros - 1, bits, axis=1)),
        "scales": torch.from_numpy(scales),
        "g_idx": torch.from_numpy(g_idx.astype(np.int32)),
    }


def tiny_config(model_type: str = "llama", **overrides) -> dict:
    config = {
        "model_type": model_type,
        "architectures": ["MistralForCausalLM" if model_type == "mistral" else "LlamaForCausalLM"],
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    config.update(overrides)
    return config


def torch_random_layer(in_features: int, out_features: int, bits: int, group_size: int, g_idx: torch.Tensor,
                       generator: torch.Generator, scale: float) -> dict[str, torch.Tensor]:
    """Random symmetric GPTQ tensors drawn with torch on the generator's device (Llama-2-sized layers in
    seconds on a GPU): uniformly random words are uniformly random values. The weights' standard deviation
    is about ``scale``, so that a deep model's activations stay finite in fp16 (NaNs change kernel timings)."""
    device = generator.device
    maxq = 2**bits - 1
    groups = -(-in_features // (in_features if group_size == -1 else group_size))
    stored_zero = (maxq + 1) // 2 - 1  # v1: the zero point minus one
    zero_word = sum(stored_zero << (j * bits) for j in range(32 // bits))
    scales = torch.rand((groups, out_features), device=device, generator=generator) + 0.5
    return {
        "qweight": torch.randint(-2**31, 2**31, (in_features * bits // 32, out_features), dtype=torch.int32,
                                 device=device, generator=generator).cpu(),
        "qzeros": torch.full((groups, out_features * bits // 32), zero_word - (1 << 32 if zero_word >= 1 << 31 else 0),
                             dtype=torch.int32),
        "scales": (scales * (scale * 12**0.5 / (maxq + 1))).half().cpu(),  # q - z has std (maxq + 1) / 12**0.5
        "g_idx": g_idx.int().cpu(),
    }


def write_random_checkpoint(
    path: Path, config: dict, bits: int = 4, group_size: int = 32, act_order: bool = True,
    sym: bool = True, seed: int = 0, quantize_config: bool = True, shared_g_idx: bool = False,
    device: str | None = None,
) -> Path:
    """A random GPTQ checkpoint for ``config`` (no tokenizer), laid out as AutoGPTQ saves one.
    ``shared_g_idx``: with act-order, q/k/v and gate/up share their input's order, as in real checkpoints
    (GPTQ orders by the input's Hessian), so they fuse; by default each projection has its own. ``device``:
    draw the tensors with torch there (symmetric only; Llama-2-sized models for the benchmarks), else with
    numpy (the tests' small models)."""
    from backends import tensor_names as names

    if device is not None and not sym:
        raise ValueError("the torch draw is symmetric only")
    rng = np.random.default_rng(seed)
    generator = torch.Generator(device=device).manual_seed(seed) if device is not None else None
    path.mkdir(parents=True, exist_ok=True)
    h, i = config["hidden_size"], config["intermediate_size"]
    nh, nkv = config["num_attention_heads"], config["num_key_value_heads"]
    hd = config.get("head_dim", h // nh)
    vocab = config["vocab_size"]
    shapes = {
        "q_proj": (h, nh * hd), "k_proj": (h, nkv * hd), "v_proj": (h, nkv * hd), "o_proj": (nh * hd, h),
        "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
    }

    def dense(shape: tuple[int, ...], low_high: tuple[float, float] | None = None, std: float = 1.0) -> torch.Tensor:
        if generator is None:
            values = rng.uniform(*low_high, shape) if low_high else rng.normal(0, std, shape)
            return torch.from_numpy(values).half()
        if low_high:
            return (torch.rand(shape, device=device, generator=generator) * (low_high[1] - low_high[0])
                    + low_high[0]).half().cpu()
        return (torch.randn(shape, device=device, generator=generator) * std).half().cpu()

    tensors: dict[str, torch.Tensor] = {
        names.EMBED: dense((vocab, h)),
        names.FINAL_NORM: dense((h,), (0.8, 1.2)),
        f"{names.LM_HEAD}.weight": dense((vocab, h), std=0.05),
    }
    for layer in range(config["num_hidden_layers"]):
        for norm in names.LAYER_NORMS:
            tensors[names.layer_norm(layer, norm)] = dense((h,), (0.8, 1.2))
        for name in names.ATTENTION + names.MLP:
            fan_in, fan_out = shapes[name]
            first = "q_proj" if name in names.ATTENTION else "gate_proj"
            shared = shared_g_idx and act_order and name in ("k_proj", "v_proj", "up_proj")
            if generator is None:
                layer_tensors = random_gptq_layer(fan_in, fan_out, bits, group_size, act_order, sym, rng,
                                                  scale=fan_in**-0.5)
            else:
                gs = fan_in if group_size == -1 else group_size
                g_idx = torch.arange(fan_in, device=device) // gs
                if act_order and not shared:
                    g_idx = g_idx[torch.randperm(fan_in, device=device, generator=generator)]
                layer_tensors = torch_random_layer(fan_in, fan_out, bits, group_size, g_idx, generator, fan_in**-0.5)
            if shared:
                layer_tensors["g_idx"] = tensors[f"{names.projection(layer, first)}.g_idx"].clone()
            for key, value in layer_tensors.items():
                tensors[f"{names.projection(layer, name)}.{key}"] = value
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    qc = {"bits": bits, "group_size": group_size, "desc_act": act_order, "sym": sym, "quant_method": "gptq"}
    config = dict(config)
    if quantize_config:
        (path / "quantize_config.json").write_text(json.dumps(qc))
    else:
        config["quantization_config"] = qc
    (path / "config.json").write_text(json.dumps(config))
    return path


def hf_twin(path: Path, bits: int, zero_offset: int = 1) -> torch.nn.Module:
    """transformers' model for the checkpoint at ``path`` with its weights dequantized in fp32."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    config = json.loads((path / "config.json").read_text())
    config.pop("quantization_config", None)
    hf_config = AutoConfig.for_model(config.pop("model_type"), **config)
    hf_config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    state: dict[str, torch.Tensor] = {}
    weights = next(path.glob("*.safetensors"))
    with safe_open(str(weights), framework="pt") as f:
        raw = {k: f.get_tensor(k) for k in f.keys()}
    prefixes = {k.rsplit(".", 1)[0] for k in raw if k.endswith(".qweight")}
    for prefix in prefixes:
        parts = {key: raw[f"{prefix}.{key}"] for key in ("qweight", "qzeros", "scales", "g_idx")}
        state[f"{prefix}.weight"] = torch.from_numpy(np_dequantize(parts, bits, zero_offset)).float()
    for key, value in raw.items():
        if key.rsplit(".", 1)[0] not in prefixes:
            state[key] = value.float()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all("rotary" in m for m in missing) or (missing == ["lm_head.weight"] and config.get("tie_word_embeddings")), missing
    return model.eval()


def backend_logits(path: Path, backend: str, tokens: torch.Tensor, device: str) -> torch.Tensor:
    """Logits of ``tokens`` ``[1, T]`` from the checkpoint at ``path`` loaded with ``backend``, in fp32."""
    from backends.loader import LoadOptions, build_model

    model, _, _, name, *_ = build_model(path, LoadOptions(backend=backend, device=device, dtype="float32"))
    assert name == backend
    model.setup_cache(batch=1, max_seq_len=16)
    with torch.no_grad():
        return model(tokens.to(device), torch.arange(tokens.shape[1], device=device))
