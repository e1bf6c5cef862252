"""Chat and notebook turns as streams of UI updates, independent of Gradio."""

from __future__ import annotations

import math
import threading

from dataclasses import dataclass
from typing import Iterator

from backends.constraints import Grammar
from backends.engine import TokenLogprob
from backends.generation import GenerationResult
from backends.sampling import SamplingParams
from webui import templates
from webui.state import AppState

Message = dict  # {"role": ..., "content": str}


def message_text(content) -> str:
    """Gradio may hand back content as a string or as a list of typed parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", content.get("value", "")))
    if isinstance(content, (list, tuple)):
        return "".join(message_text(part) for part in content)
    return "" if content is None else str(content)


def clean_history(history: list | None) -> list[Message]:
    return [{"role": m["role"], "content": message_text(m["content"])} for m in history or []]


def with_system(history: list[Message], system: str) -> list[Message]:
    return ([{"role": "system", "content": system}] if system.strip() else []) + history


def describe_result(r: GenerationResult, context: int | None = None) -> str:
    used = ""
    if context:
        total = r.prompt_tokens + r.new_tokens
        used = f"; context used: {total} of {context} tokens ({total / context:.0%})"
    return (f"{r.new_tokens} tokens in {r.decode_seconds:.1f} s ({r.tokens_per_second:.1f} tokens/s); "
            f"prompt {r.prompt_tokens} tokens, first token after {r.prefill_seconds:.2f} s; "
            f"stopped: {r.finish_reason}{used}")


@dataclass
class Turn:
    history: list[Message]
    stats: str
    done: bool = False  # the reply is complete (the last Turn of a generation)


def chat_turn(state: AppState, history: list[Message], system: str, template: str, params: SamplingParams,
              continue_last: bool = False, cancel: threading.Event | None = None,
              grammar: Grammar | None = None) -> Iterator[Turn]:
    """Streams the assistant's reply to `history` (which ends with the user's message, or with
    the assistant's reply to extend when `continue_last`)."""
    loaded = state.require_model()
    messages = with_system(history, system)
    ids = templates.prompt_ids(loaded.tokenizer, template, messages, continue_last=continue_last)
    generation = state.generation(ids, params, template, cancel=cancel, grammar=grammar)
    if continue_last:
        reply = history[-1]
        head = reply["content"]
    else:
        reply = {"role": "assistant", "content": ""}
        history = history + [reply]
        head = ""
    text = ""
    for piece in generation:
        text += piece
        reply["content"] = head + (text if continue_last else text.lstrip())
        yield Turn(history, "generating…")
    reply["content"] = head + (text if continue_last else text.strip())
    yield Turn(history, describe_result(generation.result, loaded.context_length), done=True)


def context_used(state: AppState, history: list[Message], system: str, template: str) -> tuple[int, int] | None:
    """(tokens the chat takes in the prompt, the context length), or None with no model loaded."""
    loaded = state.loaded
    if loaded is None:
        return None
    if not history:
        return 0, loaded.context_length
    ids = templates.prompt_ids(loaded.tokenizer, template, with_system(history, system),
                               continue_last=history[-1]["role"] == "assistant")
    return len(ids), loaded.context_length


def context_bar_html(used: tuple[int, int] | None) -> str:
    """The bar under the chat: how much of the context the conversation fills (amber past 75%, red past 90%)."""
    if used is None:
        return '<div class="context-bar" data-used="0"><span>No model loaded.</span></div>'
    tokens, context = used
    share = tokens / context if context else 0.0
    level = "full" if share > 0.9 else "high" if share > 0.75 else "ok"
    return (f'<div class="context-bar {level}" data-used="{tokens}" data-context="{context}">'
            f'<div class="context-track"><div class="context-fill" style="width:{min(share, 1):.1%}"></div></div>'
            f'<span>Context: {tokens:,} of {context:,} tokens ({share:.0%})</span></div>')


def prompt_tokens(state: AppState, history: list[Message], system: str, template: str) -> str:
    """The token ids the model receives for this chat (for its last reply, the prompt that reply answered),
    with each id's piece, as Markdown."""
    loaded = state.require_model()
    if history and history[-1]["role"] == "assistant":
        history = history[:-1]
    if not history:
        return "The chat is empty: send a message first."
    messages = with_system(history, system)
    ids = templates.prompt_ids(loaded.tokenizer, template, messages)
    pieces = loaded.tokenizer.convert_ids_to_tokens(ids)
    rows = "\n".join(f"{i:>5}  {token_id:>7}  {piece!r}" for i, (token_id, piece) in enumerate(zip(ids, pieces)))
    return (f"**{len(ids)} prompt tokens** (template: {template})\n\n```\n{ids}\n```\n\n"
            f"```\n  pos       id  piece\n{rows}\n```")


NOTEBOOK_ALTERNATIVES = 5  # top tokens shown beside each generated one


def notebook_turn(state: AppState, prompt: str, params: SamplingParams, cancel: threading.Event | None = None,
                  grammar: Grammar | None = None) -> Iterator[tuple[str, str, str]]:
    """Streams the raw prompt followed by its continuation, the stats, and (once done) the token view."""
    loaded = state.require_model()
    if not prompt:
        raise ValueError("the prompt is empty")
    ids = loaded.tokenizer.encode(prompt, add_special_tokens=True)
    generation = state.generation(ids, params, cancel=cancel, logprobs=NOTEBOOK_ALTERNATIVES, grammar=grammar)
    text = prompt
    for piece in generation:
        text += piece
        yield text, "generating…", ""
    yield text, describe_result(generation.result), token_view(loaded.tokenizer, ids, generation.result.logprobs)


def token_view(tokenizer, context: list[int], entries: list[TokenLogprob]) -> str:
    """Each generated token with its probability and the most likely alternatives, as a Markdown table."""
    if not entries:
        return ""
    rows = []
    for entry in entries:
        piece = token_text(tokenizer, context, entry.token).replace("|", "\\|")
        others = ", ".join(f"`{token_text(tokenizer, context, t)!r}` {math.exp(lp):.1%}".replace("|", "\\|")
                           for t, lp in entry.top if t != entry.token)
        rows.append(f"| `{piece!r}` | {math.exp(entry.logprob):.1%} | {others} |")
        context = context + [entry.token]
    return "| token | probability | alternatives |\n|---|---|---|\n" + "\n".join(rows)


def token_text(tokenizer, context: list[int], token: int) -> str:
    """A token's text as it reads after ``context`` (a SentencePiece word keeps its leading space)."""
    before = context[-4:]
    head = tokenizer.decode(before, skip_special_tokens=False) if before else ""
    return tokenizer.decode(before + [token], skip_special_tokens=False)[len(head):]
