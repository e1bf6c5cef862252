"""The seed models' authentic sentencepiece tokenizers, fetched from PyPI once and cached.

- Llama (Llama-2's vocabulary, shared by Llama 1, Vicuna, OpenChat v3.2 and the OpenAssistant Llama2 models):
  llama.cpp's `ggml-vocab-llama-spm.gguf`, shipped in the llama-cpp-python sdist, rebuilt into a
  `tokenizer.model` with sentencepiece's own protobuf, as Meta's file is made: BPE with byte fallback,
  the identity normalizer, a dummy prefix, whitespace kept as it is.
- Mistral 7B (OpenChat 3.5 and 3.5 1210): `tokenizer.model.v1` from the mistral-common wheel.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from tests.fixture_models import cache_root

LLAMA_CPP_SDIST = ("llama-cpp-python==0.3.36", "llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf")
MISTRAL_WHEEL = ("mistral-common==1.13.1", "mistral_common/data/tokenizer.model.v1")


def _download(requirement: str, folder: Path, sdist: bool) -> Path:
    kind = ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", *kind,
                    "-d", str(folder), requirement], check=True)
    return next(folder.iterdir())


def _cached(name: str, build) -> Path:
    target = cache_root() / "tokenizers" / name
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        data = build()
        partial = target.with_suffix(".partial")
        partial.write_bytes(data)
        partial.rename(target)
    return target


def llama_vocab_gguf() -> Path:
    """llama.cpp's Llama vocabulary file (a GGUF with no weights)."""
    def build() -> bytes:
        with tempfile.TemporaryDirectory() as tmp:
            sdist = _download(LLAMA_CPP_SDIST[0], Path(tmp), sdist=True)
            with tarfile.open(sdist) as tar:
                return tar.extractfile(LLAMA_CPP_SDIST[1]).read()

    return _cached("ggml-vocab-llama-spm.gguf", build)


def llama_tokenizer_model() -> Path:
    return _cached("llama-2.tokenizer.model", lambda: gguf_vocab_to_sentencepiece(llama_vocab_gguf()))


def mistral_tokenizer_model() -> Path:
    def build() -> bytes:
        with tempfile.TemporaryDirectory() as tmp:
            wheel = _download(MISTRAL_WHEEL[0], Path(tmp), sdist=False)
            with zipfile.ZipFile(wheel) as whl:
                return whl.read(MISTRAL_WHEEL[1])

    return _cached("mistral-7b.tokenizer.model", build)


def gguf_vocab_to_sentencepiece(path: Path) -> bytes:
    """A llama.cpp "llama" (sentencepiece) vocabulary as a serialized sentencepiece ModelProto."""
    import gguf
    from sentencepiece import sentencepiece_model_pb2 as pb

    reader = gguf.GGUFReader(str(path))

    def array(key: str) -> list:
        field = reader.fields[key]
        return [field.parts[i] for i in field.data]

    def scalar(key: str) -> int:
        field = reader.fields[key]
        return int(field.parts[field.data[0]][0])

    kind = reader.fields["tokenizer.ggml.model"]
    if bytes(kind.parts[kind.data[0]]).decode() != "llama":
        raise ValueError(f"{path} is not a sentencepiece vocabulary")
    model = pb.ModelProto()
    # gguf's token types are sentencepiece's piece types (1 normal, 2 unknown, 3 control, 6 byte).
    for text, score, kind in zip(array("tokenizer.ggml.tokens"), array("tokenizer.ggml.scores"),
                                 array("tokenizer.ggml.token_type")):
        model.pieces.add(piece=bytes(text).decode("utf-8"), score=float(score[0]), type=int(kind[0]))
    trainer = model.trainer_spec
    trainer.model_type = pb.TrainerSpec.BPE
    trainer.vocab_size = len(model.pieces)
    trainer.byte_fallback = True
    trainer.split_digits = True
    trainer.unk_id = scalar("tokenizer.ggml.unknown_token_id")
    trainer.bos_id = scalar("tokenizer.ggml.bos_token_id")
    trainer.eos_id = scalar("tokenizer.ggml.eos_token_id")
    trainer.pad_id = -1
    normalizer = model.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = True
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    return model.SerializeToString()
