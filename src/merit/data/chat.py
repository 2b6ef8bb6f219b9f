"""Chat templating and assistant-only loss masks.

The mask is found by rendering the conversation up to each assistant turn with and without that turn
and comparing token ids, so it is right for any template (no ``{% generation %}`` markers needed).
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE = -100  # label value that the causal-LM loss skips


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]  # IGNORE outside assistant turns
    truncated: bool

    @property
    def loss_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def _ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class TemplateError(ValueError):
    """The chat template renders a conversation's prefix differently from the whole conversation."""


def tokenize_conversation(tokenizer, messages: list[dict], max_length: int) -> Tokenized:
    """Token ids of the whole conversation and labels that keep only assistant-turn tokens.

    Each assistant turn's span runs from the end of the rendered prefix with a generation prompt to the
    end of the rendered conversation through that turn, so it includes the end-of-turn token (the model
    learns to stop). Sequences longer than ``max_length`` are cut at the end.
    """
    full = _ids(tokenizer, messages)
    labels = [IGNORE] * len(full)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = _ids(tokenizer, messages[:i], add_generation_prompt=True)
        through = _ids(tokenizer, messages[: i + 1])
        if through[: len(prefix)] != prefix or full[: len(through)] != through:
            raise TemplateError("chat template is not prefix-consistent at assistant turn %d" % i)
        labels[len(prefix) : len(through)] = full[len(prefix) : len(through)]
    truncated = len(full) > max_length
    return Tokenized(full[:max_length], labels[:max_length], truncated)


def generation_prompt(tokenizer, messages: list[dict]) -> tuple[list[int], str]:
    """Prompt ids up to the last assistant turn (with the generation prompt) and that turn's text."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return _ids(tokenizer, messages[:last], add_generation_prompt=True), messages[last]["content"]
