"""The batched generation engine: continuous batching over a paged KV cache.

One thread runs the model. Each step takes one new token of every decoding sequence and a chunk of the
prompts being prefilled, side by side, through one forward (so a long prompt is prefilled over several
steps while the others keep decoding), then samples each sequence's next token with its own parameters
and generator. A request joins at the next step once its worst case fits in the cache (backends/
paged_cache.py) and leaves when it ends; cancelling one leaves the others untouched.

The engine hands out token ids; backends/generation.py turns them into text, stop strings included.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Iterator

import torch

from backends.banned import BannedStrings
from backends.batch_graphs import BatchedDecoder
from backends.constraints import Constraint
from backends.cuda_graph import GraphedDecoder
from backends.memory import kv_bytes
from backends.model import Transformer
from backends.model_config import ModelArgs
from backends.paged_attention import PagedStep, Segment, kernel_takes, store
from backends.paged_cache import BLOCK_SIZE, BlockManager, CacheShape, CacheTooSmall, KVPool, block_hashes
from backends.sampling import SamplerState, SamplingParams, sample_token

log = logging.getLogger("gptq_workbench.engine")
END_REASONS = ("eos", "length", "cancelled", "error")
SWITCH_INTERVAL = 0.0002  # seconds


@dataclass(frozen=True)
class EngineConfig:
    cache_tokens: int  # KV cache slots shared by all sequences
    max_batch: int = 64  # sequences in one step
    step_tokens: int = 512  # tokens in one step: every decoding sequence's one, the rest for prompt chunks
    block_size: int = BLOCK_SIZE
    kv_dtype: torch.dtype | None = None  # the paged cache's keys and values; None: the model's dtype


@dataclass(frozen=True)
class EngineStats:
    running: int  # sequences generating now
    waiting: int  # requests waiting for room in the cache
    kv_tokens_held: int  # cache slots in blocks that sequences hold
    kv_tokens: int  # the whole cache
    reused_tokens: int  # prompt tokens found in the cache instead of computed, since the model was loaded
    prompt_tokens: int  # prompt tokens of the requests admitted, since the load
    generated_tokens: int  # tokens sampled (end tokens and tokens taken back over a banned string included)
    finished: dict[str, int]  # requests ended, by reason (END_REASONS)


class EngineClosed(RuntimeError):
    """The model was unloaded."""


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled token's log-probability under the model (its raw logits), and the most likely tokens."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


class LogprobRows:
    """Log-probabilities of the sampled tokens of the sequences that asked, computed on the device right
    after sampling (before a queued step can reuse the logits' buffer) and read after the tokens."""

    def __init__(self, seqs: list["Sequence"], logits: torch.Tensor, chosen: torch.Tensor):
        self.rows = [i for i, seq in enumerate(seqs) if seq.request.logprobs is not None]
        self.values = None
        if self.rows:
            widest = max(seqs[i].request.logprobs for i in self.rows)
            index = torch.tensor(self.rows, device=logits.device)
            lp = torch.log_softmax(logits[index].float(), dim=-1)
            top = lp.topk(max(widest, 1), dim=-1)
            self.values = (lp.gather(-1, chosen[index].view(-1, 1)).view(-1), top.values, top.indices)
            self.widths = [seqs[i].request.logprobs for i in self.rows]

    def read(self, tokens: list[int]) -> dict[int, TokenLogprob]:
        """By row: each asking sequence's :class:`TokenLogprob`."""
        if self.values is None:
            return {}
        chosen, values, indices = (t.tolist() for t in self.values)
        return {row: TokenLogprob(tokens[row], chosen[j], tuple(zip(indices[j][:width], values[j][:width])))
                for j, (row, width) in enumerate(zip(self.rows, self.widths))}


@dataclass
class Request:
    """One sequence's way in and out of the engine: iterate it for ``("token", (id, logprob))`` events
    (``logprob``: a :class:`TokenLogprob` when asked for, else None), then one ``("end", reason)``; reason is
    "eos", "length" or "cancelled". Set ``cancel`` to end it early."""

    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    max_new: int
    stop_ids: frozenset[int]
    cancel: threading.Event
    logprobs: int | None = None  # None: none; k: each token's log-probability and the k most likely
    constraint: Constraint | None = None  # structured output: the grammar its tokens must follow
    breakers: frozenset[int] = frozenset()  # DRY's sequence breakers as token ids
    banned: BannedStrings | None = None  # strings it may not write: their tokens are held back, then rewound
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)

    def __iter__(self) -> Iterator[tuple[str, object]]:
        while True:
            kind, value = self.events.get()
            if kind == "error":
                raise value  # type: ignore[misc]
            yield kind, value
            if kind == "end":
                return


def rows_index(seqs: list["Sequence"], picked: list["Sequence"], device: torch.device) -> torch.Tensor:
    """The rows of ``picked`` among ``seqs``, on the device, copied without waiting for the stream."""
    where = {id(seq): i for i, seq in enumerate(seqs)}
    index = torch.tensor([where[id(seq)] for seq in picked], dtype=torch.long, pin_memory=device.type == "cuda")
    return index.to(device, non_blocking=True)


@dataclass
class Ahead:
    """A batched decode step queued ahead: its sequences, in row order, and their logits."""

    seqs: list["Sequence"]
    logits: torch.Tensor

    def covers(self, seqs: list["Sequence"]) -> bool:
        """Whether every one of ``seqs`` has a row here."""
        rows = set(self.seqs)
        return all(seq in rows for seq in seqs)

    def logits_of(self, seqs: list["Sequence"], device: torch.device) -> torch.Tensor:
        if seqs == self.seqs:
            return self.logits
        return self.logits[rows_index(self.seqs, seqs, device)]


class Sequence:
    """A request inside the engine: its tokens, its blocks and how many of its tokens are in the cache."""

    def __init__(self, request: Request, blocks: list[int], reserved: int, names: list[bytes],
                 block_size: int, device: torch.device):
        self.request = request
        self.tokens = list(request.prompt_ids)
        self.blocks = blocks
        self.names = names[: len(blocks)]  # the names of the blocks held, in order
        self.computed = len(blocks) * block_size  # a matched prefix is in the cache already
        self.reserved = reserved
        self.solo = False  # its cache is the model's batch-1 cache (SoloLane), not blocks
        self.generated = 0
        self.bans: dict[int, set[int]] = {}  # by index among the generated tokens: tokens banned there
        self.generator = torch.Generator(device=device).manual_seed(request.seed)
        self.sampler = SamplerState(breakers=request.breakers)
        self.history = (torch.tensor(self.tokens, dtype=torch.long, device=device)
                        if request.params.needs_history else None)

    @property
    def prefilling(self) -> bool:
        return self.computed < len(self.tokens) - 1


class Engine:
    """Runs every generation of one loaded model. ``submit`` returns at once; the work happens on the
    engine's thread."""

    def __init__(self, model: Transformer, context_length: int, config: EngineConfig,
                 decoder: GraphedDecoder | None = None, graphs: bool = True):
        self.model, self.context_length, self.config = model, context_length, config
        args = model.args
        device = model.embed_tokens.weight.device
        self.device, self.dtype = device, model.embed_tokens.weight.dtype
        blocks = -(-config.cache_tokens // config.block_size)
        # One block more than the manager hands out: the scratch block of padded graph rows.
        shape = CacheShape(args.n_layers, args.n_kv_heads, args.head_dim, blocks + 1, config.block_size)
        self.pool = KVPool(shape, config.kv_dtype or self.dtype, device)
        self.blocks = BlockManager(blocks, config.block_size)
        self.batched: BatchedDecoder | None = None
        if kernel_takes(self.pool, args.n_heads):
            max_blocks = -(-context_length // config.block_size)
            self.batched = BatchedDecoder(model, self.pool, config.max_batch, max_blocks, blocks, graphs)
        self._cond = threading.Condition()
        self.model_lock = threading.Lock()  # held by each step; hold it to run the model outside the engine
        self._waiting: deque[Request] = deque()
        self._running: list[Sequence] = []
        self._closed = False
        self.solo = SoloLane(model, decoder) if model.max_seq_len else None
        self.batch_pipe = TokenPipe(device, config.max_batch)
        self._ahead: Ahead | None = None  # the batched decode step queued before the last tokens were read
        self.steps = 0  # forwards run, for tests and benchmarks
        self.reused_tokens = 0  # prompt tokens found in the cache instead of computed
        self.prompt_tokens = 0  # of the requests admitted
        self.generated_tokens = 0  # tokens sampled
        # Requests ended, by reason; every key there from the start, so another thread may copy it at any time.
        self.finished: Counter[str] = Counter(dict.fromkeys(END_REASONS, 0))
        self.most_running = 0  # the largest batch so far
        self.rewinds = 0  # sequences taken back over a banned string
        if device.type == "cuda":
            # After each GPU wait the engine thread needs the GIL back at once; with a consumer thread per
            # stream, Python's default 5 ms switch interval stalled whole steps (a 7B step is 2-10 ms).
            sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    # ---- the outside: any thread ---------------------------------------------------------------------------

    def check_fits(self, tokens: int) -> None:
        """Refuses a request whose worst case (prompt plus new tokens) is more than the whole cache."""
        need = self.blocks.blocks_for(tokens)
        if need > self.blocks.num_blocks:
            raise CacheTooSmall(
                f"this request needs up to {tokens} tokens of KV cache, but the cache holds "
                f"{self.blocks.num_blocks * self.config.block_size}: ask for fewer new tokens, shorten the "
                "prompt, or load the model with a larger cache")

    def submit(self, request: Request) -> Request:
        self.check_fits(len(request.prompt_ids) + request.max_new)
        with self._cond:
            if self._closed:
                raise EngineClosed("the model was unloaded")
            self._waiting.append(request)
            self._cond.notify_all()
        return request

    def waiting(self) -> int:
        with self._cond:
            return len(self._waiting)

    def running(self) -> int:
        return len(self._running)

    def close(self) -> None:
        """Ends every request (as cancelled) and stops the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def forget_prefixes(self) -> None:
        """Drops every cached prefix (benchmarks time prefills from nothing)."""
        with self.model_lock:
            if self.solo is not None:
                self.solo.cached, self.solo.pending = [], None
            self.blocks.forget_names()

    def stats(self) -> EngineStats:
        return EngineStats(self.running(), self.waiting(), self.kv_tokens_held(),
                           self.blocks.num_blocks * self.config.block_size, self.reused_tokens, self.prompt_tokens,
                           self.generated_tokens, dict(self.finished))

    def kv_tokens_held(self) -> int:
        """Cache slots in blocks that sequences hold now (memory follows the tokens)."""
        return self.blocks.held * self.config.block_size

    # ---- the engine's thread -------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._waiting and not self._running:
                    self._cond.wait()
                if self._closed:
                    break
            try:
                with self.model_lock:
                    self._step()
            except Exception as exc:  # noqa: BLE001 - every request hears of it; the engine keeps serving
                log.exception("engine step failed")
                for seq in list(self._running):
                    self._fail(seq, exc)
        for seq in list(self._running):
            self._finish(seq, "cancelled")
        with self._cond:
            while self._waiting:
                self._waiting.popleft().events.put(("end", "cancelled"))

    def _step(self) -> None:
        for seq in [s for s in self._running if s.request.cancel.is_set()]:
            self._finish(seq, "cancelled")
        self._admit()
        if not self._running:
            return
        lone = self._running[0]
        if lone.solo and len(self._running) == 1:
            self._ahead = None
            self._solo_step(lone)
            return
        for seq in self._running:
            if seq.solo:
                self._migrate(seq)
        if self.batched is not None and not any(s.prefilling for s in self._running):
            self._decode_step()
            return
        self._ahead = None  # this step moves every sequence on; a queued step's logits no longer apply
        placed: list[Sequence] = []
        segments, tokens, sampled = [], [], []
        budget = self.config.step_tokens - sum(1 for s in self._running if not s.prefilling)
        for seq in self._running:
            if seq.prefilling:
                if budget <= 0:
                    continue
                count = min(len(seq.tokens) - seq.computed, budget)
                budget -= count
            else:
                count = 1
            self._cover(seq, seq.computed + count)
            placed.append(seq)
            segments.append(Segment(len(tokens), count, seq.computed, tuple(seq.blocks)))
            tokens.extend(seq.tokens[seq.computed : seq.computed + count])
            if seq.computed + count == len(seq.tokens):
                sampled.append((seq, len(tokens) - 1))
        step = PagedStep(self.pool, segments, self.model.args.sliding_window, self.dtype, self.model.args.n_heads)
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device)
        rows = torch.tensor([row for _, row in sampled], dtype=torch.long, device=self.device)
        with torch.inference_mode():
            logits = self.model.forward_paged(ids, step.positions, step, rows)
            seqs = [seq for seq, _ in sampled]
            chosen_device = self._sample(seqs, logits)
            logprobs = LogprobRows(seqs, logits, chosen_device)
            chosen = chosen_device.tolist()
        self.steps += 1
        for segment, seq in zip(segments, placed):
            seq.computed += segment.length
            self._name_blocks(seq)
        infos = logprobs.read(chosen)
        for i, (seq, token) in enumerate(zip(seqs, chosen)):
            self._accept(seq, token, infos.get(i))

    def _decode_step(self) -> None:
        """Every running sequence decodes one token, by the batched decoder's graph for this many. Before the
        host reads the sampled tokens, the next step is already queued from them on the GPU (the host's part
        of a step, and the streams' detokenizing, then overlap the GPU's); a sequence that ends on its token
        leaves a wasted row, written to its own last block."""
        seqs = list(self._running)
        ahead, self._ahead = self._ahead, None
        with torch.inference_mode():
            if ahead is not None and ahead.covers(seqs):
                logits = ahead.logits_of(seqs, self.device)
                for seq in seqs:
                    seq.computed = len(seq.tokens)
            else:
                for seq in seqs:
                    self._cover(seq, len(seq.tokens))
                logits = self.batched.step([(seq.tokens[-1], len(seq.tokens) - 1, tuple(seq.blocks)) for seq in seqs])
                for seq in seqs:
                    seq.computed = len(seq.tokens)
            chosen = self._sample(seqs, logits)
            logprobs = LogprobRows(seqs, logits, chosen)
            self.batch_pipe.send(chosen)
            self.steps += 1
            going = [seq for seq in seqs if seq.generated + 1 < seq.request.max_new]
            if going and not self._waiting and logprobs.values is None:  # logprobs are read after: no overlap
                for seq in going:
                    self._cover(seq, len(seq.tokens) + 1)
                picked = chosen if len(going) == len(seqs) else chosen[rows_index(seqs, going, self.device)]
                rows = [(0, len(seq.tokens), tuple(seq.blocks)) for seq in going]
                self._ahead = Ahead(going, self.batched.step(rows, picked))
        tokens = self.batch_pipe.receive_all()
        infos = logprobs.read(tokens)
        for i, (seq, token) in enumerate(zip(seqs, tokens)):
            self._name_blocks(seq)
            self._accept(seq, token, infos.get(i))

    def _admit(self) -> None:
        with self._cond:
            while self._waiting and len(self._running) < self.config.max_batch:
                request = self._waiting[0]
                if request.cancel.is_set():
                    self._waiting.popleft().events.put(("end", "cancelled"))
                    self.finished["cancelled"] += 1
                    continue
                alone = self.solo is not None and not self._running and len(self._waiting) == 1
                seq = self._place_solo(request) if alone else self._place(request)
                if seq is None:
                    return  # first come, first served: the next ones wait behind it
                self._waiting.popleft()
                self._running.append(seq)
                self.prompt_tokens += len(request.prompt_ids)
                self.most_running = max(self.most_running, len(self._running))

    def _place(self, request: Request) -> Sequence | None:
        prompt = request.prompt_ids
        bs = self.config.block_size
        names = block_hashes(prompt[: len(prompt) - 1], bs)  # the last prompt token is always computed
        matched = self.blocks.lookup(names)
        total = min(len(prompt) + request.max_new, self.context_length)
        need = self.blocks.blocks_for(total) - len(matched)
        if not self.blocks.reserve(need):
            self.blocks.release(matched)
            return None
        self.reused_tokens += len(matched) * bs
        return Sequence(request, matched, need, names, bs, self.device)

    def _place_solo(self, request: Request) -> Sequence | None:
        total = min(len(request.prompt_ids) + request.max_new, self.context_length)
        need = self.blocks.blocks_for(total)  # the blocks it takes if others join
        if not self.blocks.reserve(need):
            return None
        seq = Sequence(request, [], need, [], self.config.block_size, self.device)
        seq.solo = True
        seq.computed = self.solo.reuse(request.prompt_ids)
        self.reused_tokens += seq.computed
        return seq

    def _solo_step(self, seq: Sequence) -> None:
        """One forward of the lone sequence on the batch-1 path; the next decode is queued before the host
        reads the token, so the GPU computes while the host accepts it."""
        lane = self.solo
        with torch.inference_mode():
            logits = lane.pending
            if logits is None:
                count = min(len(seq.tokens) - seq.computed, self.config.step_tokens)
                logits = lane.forward(seq.tokens[seq.computed : seq.computed + count], seq.computed)
                seq.computed += count
                lane.cached = seq.tokens[: seq.computed]
                self.steps += 1
                if seq.computed < len(seq.tokens):
                    return
            lane.pending = None
            chosen = self._sample([seq], logits.view(1, -1))
            logprobs = LogprobRows([seq], logits.view(1, -1), chosen)
            lane.pipe.send(chosen)
            if seq.generated + 1 < seq.request.max_new:  # wasted if the token ends the sequence
                lane.pending = lane.decode(chosen, len(seq.tokens))
                self.steps += 1
            token = lane.pipe.receive()
            info = logprobs.read([token]).get(0)
        self._accept(seq, token, info)
        if seq in self._running and lane.pending is not None:
            seq.computed = len(seq.tokens)
            lane.cached = seq.tokens  # the same list from here on: every token of it is in the cache
        else:
            lane.pending = None

    def _migrate(self, seq: Sequence) -> None:
        """Moves the lone sequence's keys and values into blocks, as others join it."""
        lane = self.solo
        lane.pending = None  # recomputed in the next step, from the blocks
        seq.computed = min(seq.computed, len(seq.tokens) - 1)
        lane.cached = seq.tokens[: seq.computed]  # no longer the sequence's own list, which grows on
        self._cover(seq, seq.computed)
        lane.copy_to_pool(self.pool, seq.blocks, seq.computed)
        seq.solo = False
        self._name_blocks(seq)

    def _cover(self, seq: Sequence, tokens: int) -> None:
        while len(seq.blocks) * self.config.block_size < tokens:
            seq.blocks.append(self.blocks.take())
            seq.reserved -= 1

    def _name_blocks(self, seq: Sequence) -> None:
        bs = self.config.block_size
        full = seq.computed // bs
        if full > len(seq.names):
            names = block_hashes(seq.tokens[: full * bs], bs, seq.names)
            for i in range(len(seq.names), full):
                self.blocks.name(seq.blocks[i], names[i])
            seq.names = names

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> torch.Tensor:
        """The next token of each sequence ``[len(seqs)]``, on the device (nothing waits for it)."""
        chosen = logits.argmax(dim=-1)
        for i, seq in enumerate(seqs):
            params, constraint = seq.request.params, seq.request.constraint
            bans = seq.bans.get(seq.generated)
            if bans or not params.plain_greedy or constraint is not None:
                row = constraint.mask(logits[i]) if constraint is not None else logits[i]
                if bans:
                    row = row.clone()
                    row[list(bans)] = float("-inf")
                previous = seq.history if seq.history is not None else logits.new_empty(0, dtype=torch.long)
                chosen[i] = sample_token(row, previous, params, seq.generator, len(seq.request.prompt_ids),
                                         seq.sampler)[0]
        return chosen

    def _accept(self, seq: Sequence, token: int, logprob: TokenLogprob | None = None) -> None:
        request = seq.request
        seq.generated += 1
        self.generated_tokens += 1
        if request.banned is not None and token not in request.stop_ids:
            verdict = request.banned.push(token, logprob)
            if verdict.rewind is not None:
                try:
                    self._rewind(seq, verdict.rewind, verdict.banned)
                except CacheTooSmall as exc:  # that request alone hears of it
                    self._fail(seq, exc)
                return
            for item in verdict.release:
                request.events.put(("token", item))
        else:
            self._release_held(seq)
            request.events.put(("token", (token, logprob)))
        if token in request.stop_ids:
            self._finish(seq, "eos")
        elif request.constraint is not None and self._constrained_end(seq, token):
            self._finish(seq, "eos")
        elif seq not in self._running:
            return  # dropped: its matcher failed
        elif seq.generated >= request.max_new:
            self._finish(seq, "length")
        else:
            seq.tokens.append(token)
            if seq.history is not None:
                seq.history = torch.cat([seq.history, torch.tensor([token], device=self.device)])

    def _constrained_end(self, seq: Sequence, token: int) -> bool:
        """Consumes the token; True once the grammar is complete (only the end token could follow), or once
        the matcher failed (that request alone hears of it)."""
        constraint = seq.request.constraint
        try:
            constraint.consume(token)
        except ValueError as exc:
            log.exception("structured output failed")
            self._fail(seq, exc)
            return False
        return constraint.finished

    def _rewind(self, seq: Sequence, keep: int, banned: int) -> None:
        """Back to the first ``keep`` generated tokens, with ``banned`` never again the next one there. Nothing
        after them was streamed (the request held it back); the cache keeps what is before."""
        request = seq.request
        self.rewinds += 1
        consumed = seq.generated - 1  # the grammar has consumed every token before the one just sampled
        if request.constraint is not None and consumed > keep:
            request.constraint.rollback(consumed - keep)
        length = len(request.prompt_ids) + keep
        seq.tokens = seq.tokens[:length]
        seq.generated = keep
        if seq.history is not None:
            seq.history = seq.history[:length]
        seq.bans = {at: tokens for at, tokens in seq.bans.items() if at <= keep}
        seq.bans.setdefault(keep, set()).add(banned)
        seq.computed = min(seq.computed, length - 1)
        if seq.solo:
            self.solo.pending = None
            self.solo.cached = seq.tokens[: seq.computed]
        else:
            self._ahead = None  # a step queued from the rewound token
            self._unname_blocks(seq)

    def _unname_blocks(self, seq: Sequence) -> None:
        """Blocks past the computed tokens are to be rewritten: they lose their names, and one that another
        sequence holds too is swapped for a copy of its own."""
        bs = self.config.block_size
        full = seq.computed // bs
        for i in range(full, len(seq.names)):
            block = seq.blocks[i]
            if self.blocks.holders(block) > 1:
                if not self.blocks.reserve(1):
                    raise CacheTooSmall("no free block to rewind a sequence into")
                seq.blocks[i] = self.blocks.take()
                self.pool.copy_block(block, seq.blocks[i])
                self.blocks.release([block])
            else:
                self.blocks.unname(block)
        seq.names = seq.names[:full]

    def _release_held(self, seq: Sequence) -> None:
        if seq.request.banned is not None:
            for item in seq.request.banned.flush():
                seq.request.events.put(("token", item))

    def _finish(self, seq: Sequence, reason: str) -> None:
        self._drop(seq)
        self._release_held(seq)
        seq.request.events.put(("end", reason))
        self.finished[reason] += 1

    def _fail(self, seq: Sequence, exc: Exception) -> None:
        """Ends the sequence with an error that its request alone hears of."""
        seq.request.events.put(("error", exc))
        self._drop(seq)
        self.finished["error"] += 1

    def _drop(self, seq: Sequence) -> None:
        self._running.remove(seq)
        self.blocks.release(seq.blocks)
        self.blocks.unreserve(seq.reserved)
        seq.blocks, seq.reserved = [], 0


class TokenPipe:
    """Hands sampled tokens to the host without waiting for work queued after them: ``send`` queues their
    copy into pinned memory and records an event, the caller queues the next step, then ``receive`` waits
    for the event alone (``int(tensor)`` would wait for the whole stream, the next step included)."""

    def __init__(self, device: torch.device, size: int = 1):
        self.cuda = device.type == "cuda"
        self.host = torch.zeros(size, dtype=torch.long, pin_memory=self.cuda)
        self.ready = torch.cuda.Event() if self.cuda else None
        self.count = 0

    def send(self, tokens: torch.Tensor) -> None:
        self.count = tokens.numel()
        self.host[: self.count].copy_(tokens.view(-1), non_blocking=self.cuda)
        if self.ready is not None:
            self.ready.record()

    def receive(self) -> int:
        return self.receive_all()[0]

    def receive_all(self) -> list[int]:
        if self.ready is not None:
            self.ready.synchronize()
        return self.host[: self.count].tolist()


class SoloLane:
    """The batch-1 path for a sequence that runs alone: the model's static cache from position 0, decoded
    by CUDA graph replay (and the backend's decode chain) where the loader made a decoder. It keeps the
    tokens its cache holds, so the next lone request (a chat's next turn) prefills only what is new."""

    def __init__(self, model: Transformer, decoder: GraphedDecoder | None):
        self.model, self.decoder = model, decoder
        self.device = model.embed_tokens.weight.device
        self.cached: list[int] = []
        self.pending: torch.Tensor | None = None  # logits of a decode queued ahead
        self.pipe = TokenPipe(self.device)

    def reuse(self, prompt: list[int]) -> int:
        """How many of ``prompt``'s first tokens are in the cache already (never the last one)."""
        reuse, limit = 0, min(len(self.cached), len(prompt) - 1)
        while reuse < limit and self.cached[reuse] == prompt[reuse]:
            reuse += 1
        self.cached = self.cached[:reuse]
        self.pending = None
        return reuse

    def forward(self, tokens: list[int], start: int) -> torch.Tensor:
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device).view(1, -1)
        return self.model(ids, torch.arange(start, start + len(tokens), device=self.device))[0, -1]

    def decode(self, token: torch.Tensor, position: int) -> torch.Tensor:
        if self.decoder is not None:
            return self.decoder.step(token, position)
        positions = torch.tensor([position], device=self.device)
        return self.model(token.view(1, 1), positions)[0, -1]

    def copy_to_pool(self, pool: KVPool, blocks: list[int], count: int) -> None:
        bs = pool.shape.block_size
        slots = torch.tensor([blocks[p // bs] * bs + p % bs for p in range(count)], dtype=torch.long,
                             device=self.device)
        for i, layer in enumerate(self.model.layers):
            cache = layer.self_attn.kv_cache
            store(pool.k[i], slots, cache.k[0, :, :count])
            store(pool.v[i], slots, cache.v[0, :, :count])


def default_cache_tokens(context_length: int, device: torch.device) -> int:
    """The cache a model gets unless asked: on the CPU one full context, as a single-sequence cache took;
    on a GPU two, so several conversations run side by side."""
    return context_length * (2 if device.type == "cuda" else 1)


def kv_cache_bytes(args: ModelArgs, context_length: int, device: torch.device, dtype: torch.dtype,
                   cache_tokens: int | None = None, kv_dtype: torch.dtype | None = None) -> int:
    """The KV caches a loaded model holds: the engine's blocks (``kv_dtype``, else ``dtype``), and on a GPU the
    batch-1 cache of the lone sequence's path (``dtype``)."""
    pool = kv_bytes(args, cache_tokens or default_cache_tokens(context_length, device), kv_dtype or dtype)
    return pool + (kv_bytes(args, context_length, dtype) if device.type == "cuda" else 0)


def engine_config(context_length: int, device: torch.device, cache_tokens: int | None = None,
                  kv_dtype: torch.dtype | None = None) -> EngineConfig:
    return EngineConfig(cache_tokens=cache_tokens or default_cache_tokens(context_length, device),
                        step_tokens=2048 if device.type == "cuda" else 512, kv_dtype=kv_dtype)

