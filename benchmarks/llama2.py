"""What the benchmarks measure: Llama-2 7B and 13B, as whole models and as the layers the backends run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from tests.gptq_testing import random_gptq_layer, torch_random_layer, write_random_checkpoint

VOCAB = 32000
CONTEXT = 4096
SIZES = {
    "7B": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32},
    "13B": {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40},
}
# (K, N) of Llama-2's layers, and of the fused q+k+v and gate+up layers that the backends run instead.
SHAPES = {
    "7B qkvo": (4096, 4096), "7B qkv fused": (4096, 12288), "7B gate/up": (4096, 11008),
    "7B gate+up fused": (4096, 22016), "7B down": (11008, 4096),
    "13B qkvo": (5120, 5120), "13B qkv fused": (5120, 15360), "13B gate/up": (5120, 13824),
    "13B gate+up fused": (5120, 27648), "13B down": (13824, 5120),
}


def config(size: str) -> dict:
    """Llama-2's config.json for ``size``."""
    shape = SIZES[size]
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB,
            "num_key_value_heads": shape["num_attention_heads"], "max_position_embeddings": CONTEXT,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "float16",
            **shape}


def write_checkpoint(folder: Path, size: str, act_order: bool, device: str = "cuda") -> Path:
    """A random 4-bit g128 GPTQ checkpoint of Llama-2 ``size`` (drawn on ``device``), with a tokenizer of VOCAB
    plain tokens so that the app's own loader and generation run it."""
    write_random_checkpoint(folder, config(size), bits=4, group_size=128, act_order=act_order, sym=True,
                            shared_g_idx=True, device=device)
    write_plain_tokenizer(folder, VOCAB)
    return folder


def write_plain_tokenizer(folder: Path, vocab: int) -> None:
    """A word-level tokenizer whose tokens are ``t0``..``t{vocab - 1}``, with no end token."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tokenizer.pre_tokenizer = WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t0").save_pretrained(str(folder))
    (folder / "generation_config.json").write_text(json.dumps({}))


def g128_bytes(k: int, n: int) -> int:
    """What a 4-bit g128 GEMV must read: qweight + scales + qzeros."""
    return k * n // 2 + (k // 128) * n * 2 + (k // 128) * n // 2


def layer(k: int, n: int, bits: int = 4, group_size: int = 128, act_order: bool = False, sym: bool = True,
          seed: int = 0) -> dict[str, torch.Tensor]:
    """A random GPTQ layer on the GPU. 4-bit g128 symmetric without act-order is drawn on the GPU (seconds at
    any Llama shape); the other formats with numpy, as the tests draw them."""
    if (bits, group_size, act_order, sym) == (4, 128, False, True):
        generator = torch.Generator(device="cuda").manual_seed(seed)
        t = torch_random_layer(k, n, 4, 128, torch.arange(k, device="cuda") // 128, generator, k**-0.5)
    else:
        t = random_gptq_layer(k, n, bits, group_size, act_order, sym, np.random.default_rng(seed), scale=k**-0.5)
    return {key: v.cuda() for key, v in t.items()}
