"""The tensor names of a Hugging Face Llama / Mistral checkpoint, spelled out once."""

from __future__ import annotations

EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head"
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
LAYER_NORMS = ("input_layernorm", "post_attention_layernorm")
GPTQ_PARTS = ("qweight", "qzeros", "scales", "g_idx")  # what a GPTQ layer stores (and maybe "bias")


def layer(index: int) -> str:
    return f"model.layers.{index}"


def projection(index: int, name: str) -> str:
    """A decoder layer's projection, e.g. ``model.layers.3.self_attn.q_proj`` (its tensors add ``.qweight``...)."""
    return f"{layer(index)}.{'self_attn' if name in ATTENTION else 'mlp'}.{name}"


def layer_norm(index: int, norm: str) -> str:
    return f"{layer(index)}.{norm}.weight"

