"""A model folder's tokenizer, encoding exactly as the model was trained.

- A folder with ``tokenizer.json`` gets the fast tokenizer that file describes (transformers).
- A folder with only a sentencepiece ``tokenizer.model`` (the Llama-1/2-era layout: ``tokenizer_config.json``
  naming ``LlamaTokenizer``, ``special_tokens_map.json``, maybe ``added_tokens.json``) gets
  :class:`SentencePieceTokenizer`. Converting such a model into a fast tokenizer, as transformers does, loses
  two things the seed models' cards show: the text after an added token (``<|end_of_turn|>``) is encoded
  with sentencepiece's dummy prefix ("GPT4" after it is ``▁G PT 4``, not ``G PT 4``), and a Mistral
  vocabulary converts wrongly ("The" comes out as ``T h e``). Here each stretch of text between added tokens
  is encoded by sentencepiece itself, as the original (slow, legacy) LlamaTokenizer did.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

from backends.weights import WeightsError


class SentencePieceTokenizer(SentencePieceBackend):
    """sentencepiece's encoding between the added tokens, BOS/EOS as ``tokenizer_config.json`` says, and
    decoding by sentencepiece (byte-fallback pieces joined into their characters)."""

    def __init__(self, vocab_file: str, add_bos_token: bool = True, add_eos_token: bool = False, **kwargs):
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        kwargs["legacy"] = True  # the dummy prefix on every stretch of text, as the models were trained
        super().__init__(vocab_file=vocab_file, **kwargs)

    def build_inputs_with_special_tokens(self, token_ids_0: list[int], token_ids_1: list[int] | None = None
                                         ) -> list[int]:
        bos = [self.bos_token_id] if self.add_bos_token and self.bos_token_id is not None else []
        eos = [self.eos_token_id] if self.add_eos_token and self.eos_token_id is not None else []
        out = bos + token_ids_0 + eos
        return out if token_ids_1 is None else out + bos + token_ids_1 + eos

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return len(self.build_inputs_with_special_tokens([], [] if pair else None))

    def _decode(self, token_ids: int | list[int], skip_special_tokens: bool = False,
                clean_up_tokenization_spaces: bool | None = None, **kwargs) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        special = set(self.all_special_ids)
        added = self.added_tokens_decoder
        pieces, run = [], []
        for i in ids:
            if i in added or i in special:
                pieces.append(self.sp_model.decode(run))
                run = []
                if not (skip_special_tokens and (i in special or added[i].special)):
                    pieces.append(added[i].content if i in added else self.sp_model.id_to_piece(i))
            else:
                run.append(i)
        pieces.append(self.sp_model.decode(run))
        text = "".join(pieces)
        if clean_up_tokenization_spaces:
            text = self.clean_up_tokenization(text)
        return text


def load_tokenizer(model_dir: Path):
    model_dir = Path(model_dir)
    try:
        if not (model_dir / "tokenizer.json").is_file() and (model_dir / "tokenizer.model").is_file():
            return _sentencepiece(model_dir)
        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    except Exception as exc:
        raise WeightsError(f"{model_dir.name}: the tokenizer could not be loaded ({exc})") from exc


def _sentencepiece(model_dir: Path) -> SentencePieceTokenizer:
    config_file = model_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    return SentencePieceTokenizer.from_pretrained(
        str(model_dir), add_bos_token=bool(config.get("add_bos_token", True)),
        add_eos_token=bool(config.get("add_eos_token", False)))
