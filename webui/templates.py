"""Chat templates: the tokenizer's own (Jinja) or one of the named formats.

A conversation is a list of {"role": "system"|"user"|"assistant", "content": str}.
`prompt_ids` turns it into the token ids the model continues from, either
with a new assistant turn opened (`continue_last=False`) or with the last
assistant message left open so the model extends it (`continue_last=True`).
"""

from __future__ import annotations

from dataclasses import dataclass

AUTO = "Auto (tokenizer)"


class TemplateError(ValueError):
    """A template that cannot render this conversation; the message is for the user."""


@dataclass(frozen=True)
class ChatTemplate:
    """A turn-by-turn format. Each `*_turn` holds "{content}" once."""

    name: str
    user_turn: str
    assistant_turn: str
    system_turn: str | None  # None: the system message is merged into the first user message
    merge_system: str = "{system}\n\n{user}"
    default_system: str = ""
    stop_strings: tuple[str, ...] = ()

    def render(self, messages: list[dict], continue_last: bool = False) -> str:
        messages = _with_system(messages, self.default_system)
        system = ""
        if messages and messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
        out = []
        if system and self.system_turn is not None:
            out.append(self.system_turn.format(content=system))
        for i, message in enumerate(messages):
            role, content = message["role"], message["content"]
            if role == "user":
                if system and self.system_turn is None:
                    content, system = self.merge_system.format(system=system, user=content), ""
                if continue_last and i == len(messages) - 1:  # the user's own line, left open (Impersonate)
                    out.append(self.user_turn.split("{content}")[0] + content)
                    return "".join(out)
                out.append(self.user_turn.format(content=content))
            elif role == "assistant":
                if continue_last and i == len(messages) - 1:
                    out.append(self.assistant_turn.split("{content}")[0] + content)
                    return "".join(out)
                out.append(self.assistant_turn.format(content=content))
            else:
                raise TemplateError(f"template {self.name}: a {role!r} message can only come first")
        if continue_last:
            raise TemplateError("there is no message to continue")
        out.append(self.assistant_turn.split("{content}")[0].rstrip(" "))
        return "".join(out)


def _with_system(messages: list[dict], default: str) -> list[dict]:
    if messages and messages[0]["role"] == "system":
        if messages[0]["content"].strip():
            return messages
        messages = messages[1:]
    return [{"role": "system", "content": default}, *messages] if default else messages


VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
ALPACA_SYSTEM = "Below is an instruction that describes a task. Write a response that appropriately completes the request."

NAMED: dict[str, ChatTemplate] = {
    t.name: t
    for t in (
        ChatTemplate("OpenChat", "GPT4 User: {content}<|end_of_turn|>", "GPT4 Assistant: {content}<|end_of_turn|>",
                     "{content}<|end_of_turn|>", stop_strings=("<|end_of_turn|>",)),
        ChatTemplate("OpenChat V3.1", "User: {content}<|end_of_turn|>", "Assistant: {content}<|end_of_turn|>",
                     "{content}<|end_of_turn|>", default_system="Assistant is GPT4",
                     stop_strings=("<|end_of_turn|>",)),
        ChatTemplate("OpenChat-Correct", "GPT4 Correct User: {content}<|end_of_turn|>",
                     "GPT4 Correct Assistant: {content}<|end_of_turn|>", "{content}<|end_of_turn|>",
                     stop_strings=("<|end_of_turn|>",)),
        ChatTemplate("Math Correct", "Math Correct User: {content}<|end_of_turn|>",
                     "Math Correct Assistant: {content}<|end_of_turn|>", "{content}<|end_of_turn|>",
                     stop_strings=("<|end_of_turn|>",)),
        ChatTemplate("Vicuna v1.1", "USER: {content} ", "ASSISTANT: {content}</s>", "{content} ",
                     default_system=VICUNA_SYSTEM, stop_strings=("</s>", "USER:")),
        ChatTemplate("OpenAssistant", "<|prompter|>{content}<|endoftext|>", "<|assistant|>{content}<|endoftext|>",
                     "<|system|>{content}<|endoftext|>", stop_strings=("<|endoftext|>", "<|prompter|>")),
        ChatTemplate("ChatML", "<|im_start|>user\n{content}<|im_end|>\n", "<|im_start|>assistant\n{content}<|im_end|>\n",
                     "<|im_start|>system\n{content}<|im_end|>\n", stop_strings=("<|im_end|>", "<|im_start|>")),
        ChatTemplate("Llama-2", "[INST] {content} [/INST]", " {content} </s><s>", None,
                     merge_system="<<SYS>>\n{system}\n<</SYS>>\n\n{user}", stop_strings=("</s>", "[INST]")),
        ChatTemplate("Mistral", "[INST] {content} [/INST]", "{content}</s>", None, stop_strings=("</s>", "[INST]")),
        ChatTemplate("Alpaca", "### Instruction:\n{content}\n\n", "### Response:\n{content}\n\n", "{content}\n\n",
                     default_system=ALPACA_SYSTEM, stop_strings=("### Instruction:", "\n### ")),
    )
}

# OpenChat's API "condition" field names the template by its role prefix.
CONDITIONS = {"GPT4": "OpenChat", "GPT4 Correct": "OpenChat-Correct", "Math Correct": "Math Correct"}


def template_names() -> list[str]:
    return [AUTO, *NAMED]


def has_own_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


# Model-name needles, most specific first: OpenChat 3.5 1210 and later were trained on "GPT4 Correct" (their
# tokenizers carry that template), v3.2 and 3.5 on "GPT4 User"; an OpenAssistant Llama-2 model speaks
# OpenAssistant's format, not Llama-2's.
NAME_GUESSES = (("1210", "OpenChat-Correct"), ("0106", "OpenChat-Correct"), ("openchat", "OpenChat"),
                ("openassistant", "OpenAssistant"), ("oasst", "OpenAssistant"), ("vicuna", "Vicuna v1.1"),
                ("llama-2", "Llama-2"), ("llama2", "Llama-2"), ("mistral", "Mistral"), ("mixtral", "Mistral"),
                ("alpaca", "Alpaca"))


def guess_template(model_name: str, tokenizer) -> str:
    """What "auto" means for a model: its tokenizer's template, else a guess from its name."""
    if has_own_template(tokenizer):
        return AUTO
    name = model_name.lower()
    return next((template for needle, template in NAME_GUESSES if needle in name), "ChatML")


def stop_strings(name: str) -> tuple[str, ...]:
    return NAMED[name].stop_strings if name in NAMED else ()


def render(tokenizer, name: str, messages: list[dict], continue_last: bool = False,
           tools: list[dict] | None = None) -> str:
    """The prompt text; named templates leave BOS to the tokenizer, the tokenizer's own template writes it.
    ``tools``: function specs for a tokenizer template that renders them (webui/tools.py)."""
    if name in NAMED:
        return NAMED[name].render(messages, continue_last)
    if name != AUTO:
        raise TemplateError(f"unknown chat template {name!r}; choose one of {', '.join(template_names())}")
    if not has_own_template(tokenizer):
        raise TemplateError("this model's tokenizer has no chat template; choose a named template")
    messages = [m for m in messages if not (m["role"] == "system" and not m["content"].strip())]
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=not continue_last,
                                             continue_final_message=continue_last, tools=tools)
    except Exception as exc:  # a Jinja template may raise anything, raise_exception() included
        raise TemplateError(f"the tokenizer's chat template failed: {exc}") from exc


def prompt_ids(tokenizer, name: str, messages: list[dict], continue_last: bool = False,
               tools: list[dict] | None = None) -> list[int]:
    text = render(tokenizer, name, messages, continue_last, tools)
    return tokenizer.encode(text, add_special_tokens=name in NAMED)


def stop_token_ids(tokenizer, name: str) -> tuple[int, ...]:
    """Stop strings that are single added tokens: decoding skips those, so they must stop by id."""
    added = getattr(tokenizer, "added_tokens_encoder", {})
    return tuple(added[text] for text in stop_strings(name) if text in added)
