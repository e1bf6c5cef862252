"""Token-by-token generation as an iterator of text pieces.

    gen = Generation(loaded, prompt_ids, SamplingParams(temperature=0))
    for piece in gen:
        print(piece, end="")
    gen.result.finish_reason  # "eos" | "stop" | "length" | "cancelled"

Text is streamed without ever splitting a multi-byte character, stop strings
are held back until they can no longer match, and the KV cache keeps the
longest shared prefix between calls, so a chat turn only prefills what is new.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from backends.sampling import SamplingParams, sample_token

PREFILL_CHUNK = 512  # prompt tokens per forward on the CPU; on a GPU, PREFILL_CHUNK_GPU
PREFILL_CHUNK_GPU = 2048


class ContextOverflowError(ValueError):
    """The prompt does not fit in the model's context."""


@dataclass
class GenerationResult:
    text: str = ""
    prompt_tokens: int = 0
    new_tokens: int = 0
    finish_reason: str = ""
    seed: int | None = None
    prefill_seconds: float = 0.0  # until the first new token reached the host (prefill + first sample)
    decode_seconds: float = 0.0  # from the first new token to the last
    decode_steps: int = 0  # tokens that reached the host after the first (an end token included)
    token_ids: list[int] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_seconds > 0 else 0.0


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas (the TGI/vLLM scheme)."""

    def __init__(self, tokenizer, context: list[int] = ()):
        # The last prompt tokens, so the first new token decodes as it reads in context
        # (a SentencePiece "▁word" keeps its space after an open reply).
        self.tokenizer = tokenizer
        self.ids: list[int] = list(context)
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return full[len(prefix) :]
        return ""


class StopStringFilter:
    """Holds back text that could still turn into a stop string."""

    def __init__(self, stop_strings: tuple[str, ...]):
        self.stops = tuple(s for s in stop_strings if s)
        self.pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        self.pending += text
        for stop in self.stops:
            at = self.pending.find(stop)
            if at != -1:
                self.stopped = True
                out, self.pending = self.pending[:at], ""
                return out
        hold = self._partial_match_length()
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out) :]
        return out

    def _partial_match_length(self) -> int:
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.pending)), best, -1):
                if self.pending.endswith(stop[:n]):
                    best = n
                    break
        return best

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class TokenPipe:
    """Hands sampled tokens to the host without stalling the GPU.

    ``send`` queues a copy of the token into pinned host memory; the caller then
    queues the next decode step and only then ``receive``s the token, so the
    GPU computes the next token while the host detokenizes and streams this one.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.host = torch.zeros(1, dtype=torch.long, pin_memory=self.cuda)
        self.ready = torch.cuda.Event() if self.cuda else None

    def send(self, token: torch.Tensor) -> None:
        self.host.copy_(token.view(1), non_blocking=self.cuda)
        if self.ready is not None:
            self.ready.record()

    def receive(self) -> int:
        if self.ready is not None:
            self.ready.synchronize()
        return int(self.host[0])


def stop_token_ids(loaded, params: SamplingParams) -> set[int]:
    ids = set(loaded.args.eos_token_ids) | set(params.stop_token_ids)
    eos = getattr(loaded.tokenizer, "eos_token_id", None)
    if eos is not None:
        ids.add(int(eos))
    return ids


class Generation:
    """One generation on a loaded model; iterate it for text pieces."""

    def __init__(self, loaded, prompt_ids: list[int], params: SamplingParams, cancel: threading.Event | None = None):
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        context = loaded.context_length
        if len(prompt_ids) >= context:
            raise ContextOverflowError(
                f"the prompt has {len(prompt_ids)} tokens but the context length is {context}; "
                "shorten it or load the model with a longer context"
            )
        self.loaded = loaded
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.cancel = cancel or threading.Event()
        self.max_new = min(params.max_new_tokens, context - len(prompt_ids))
        seed = params.seed if params.seed is not None else random.randrange(2**31)
        self.result = GenerationResult(prompt_tokens=len(prompt_ids), seed=seed)

    def __iter__(self) -> Iterator[str]:
        lock = self.loaded.generation_lock
        if not lock.acquire(self.cancel):
            self.result.finish_reason = "cancelled"  # given up while waiting for its turn
            return
        try:
            yield from self._run()
        finally:
            lock.release()

    def _forward(self, tokens: list[int] | torch.Tensor, start: int) -> torch.Tensor:
        device = self.loaded.device
        with torch.inference_mode():
            ids = torch.as_tensor(tokens, dtype=torch.long, device=device).view(1, -1)
            positions = torch.arange(start, start + ids.shape[1], device=device)
            return self.loaded.model(ids, positions)[0, -1]

    def _decode(self, token: torch.Tensor, position: int) -> torch.Tensor:
        decoder = self.loaded.decoder
        if decoder is None:
            return self._forward(token, position)
        with torch.inference_mode():
            return decoder.step(token, position)

    def _prefill(self) -> torch.Tensor:
        cached = self.loaded.cached_tokens
        reuse = 0
        limit = min(len(cached), len(self.prompt_ids) - 1)
        while reuse < limit and cached[reuse] == self.prompt_ids[reuse]:
            reuse += 1
        self.loaded.cached_tokens = self.prompt_ids[:reuse]
        logits = None
        step = PREFILL_CHUNK_GPU if self.loaded.device.type == "cuda" else PREFILL_CHUNK
        for start in range(reuse, len(self.prompt_ids), step):
            chunk = self.prompt_ids[start : start + step]
            logits = self._forward(chunk, start)
            self.loaded.cached_tokens = self.prompt_ids[: start + len(chunk)]
        assert logits is not None
        return logits

    def _run(self) -> Iterator[str]:
        result, params = self.result, self.params
        device = self.loaded.device
        generator = torch.Generator(device=device).manual_seed(result.seed)
        stops = stop_token_ids(self.loaded, params)
        decoder = IncrementalDecoder(self.loaded.tokenizer, self.prompt_ids[-4:])
        stop_filter = StopStringFilter(params.stop_strings)
        history = torch.tensor(self.prompt_ids, dtype=torch.long, device=device)

        started = time.perf_counter()
        first_token_at: float | None = None
        logits = self._prefill()
        result.finish_reason = "length"
        pieces: list[str] = []
        pipe = TokenPipe(device)
        for step in range(self.max_new):
            if self.cancel.is_set():
                result.finish_reason = "cancelled"
                break
            sampled = sample_token(logits, history, params, generator)
            pipe.send(sampled)
            history = torch.cat([history, sampled])
            decoded = step + 1 < self.max_new
            if decoded:  # queued before the host looks at the token; wasted if it ends the generation
                logits = self._decode(sampled, len(self.prompt_ids) + step)
            token = pipe.receive()
            if first_token_at is None:
                first_token_at = time.perf_counter()
                result.prefill_seconds = first_token_at - started
            else:
                result.decode_steps += 1
            if token in stops:
                result.finish_reason = "eos"
                break
            result.token_ids.append(token)
            result.new_tokens += 1
            if decoded:
                self.loaded.cached_tokens = self.loaded.cached_tokens + [token]
            piece = stop_filter.push(decoder.push(token))
            if piece:
                pieces.append(piece)
                yield piece
            if stop_filter.stopped:
                result.finish_reason = "stop"
                break
        tail = "" if stop_filter.stopped else stop_filter.flush()
        if tail:
            pieces.append(tail)
            yield tail
        ended = time.perf_counter()
        if first_token_at is None:
            result.prefill_seconds = ended - started
        else:
            result.decode_seconds = ended - first_token_at
        result.text = "".join(pieces)
