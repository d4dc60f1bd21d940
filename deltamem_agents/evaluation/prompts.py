"""Rendering messages with the model's chat template, once, as token ids every arm shares.

Every prompt is ``system + history messages (some subset, in their original order) + question``, each piece
rendered by the tokenizer's chat template exactly as it would appear inside the whole conversation and
tokenised on its own. Pieces meet at the template's special tokens (``<|im_start|>`` in ChatML), so the
concatenated ids equal the ids of the concatenated text for such templates, and every arm sees byte-identical
messages. A message is rendered as the difference between the template applied to ``[anchor, message]`` and to
``[anchor]``, which keeps templates that inject a default system prompt (SmolLM2 does) from repeating it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["PromptRenderer"]

_ANCHOR = {"role": "system", "content": "."}


class PromptRenderer:
    """Renders and tokenises messages with a tokenizer's chat template, caching by content."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._text_cache: dict[tuple[str, str, bool], str] = {}
        self._ids_cache: dict[str, list[int]] = {}
        if getattr(tokenizer, "chat_template", None):
            self._anchor_text = self._template([_ANCHOR], add_generation_prompt=False)
        else:
            self._anchor_text = ""

    def _template(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def render(self, message: dict[str, str], *, generation_prompt: bool = False) -> str:
        """The text of one message as it appears inside a conversation (with the assistant header after it
        when ``generation_prompt``)."""
        key = (message["role"], message["content"], generation_prompt)
        text = self._text_cache.get(key)
        if text is not None:
            return text
        if not getattr(self.tokenizer, "chat_template", None):
            # No template (a base model): a plain "role: content" transcript.
            text = f"{message['role']}: {message['content']}\n" + ("assistant:" if generation_prompt else "")
        elif message["role"] == "system":
            text = self._template([message], add_generation_prompt=False)
            if generation_prompt:
                text = self._template([message, {"role": "user", "content": ""}], add_generation_prompt=True)
        else:
            both = self._template([_ANCHOR, message], add_generation_prompt=generation_prompt)
            if not both.startswith(self._anchor_text):
                raise ValueError(
                    "the chat template renders a conversation whose prefix differs from its first message; "
                    "it cannot be rendered message by message"
                )
            text = both[len(self._anchor_text) :]
        self._text_cache[key] = text
        return text

    def ids(self, text: str) -> list[int]:
        """Token ids of a rendered piece (no special tokens added: the template wrote them)."""
        cached = self._ids_cache.get(text)
        if cached is None:
            cached = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            self._ids_cache[text] = cached
        return cached

    def message_ids(self, message: dict[str, str]) -> list[int]:
        return self.ids(self.render(message))

    def history_ids(self, history: Sequence[dict[str, str]]) -> list[list[int]]:
        return [self.message_ids(m) for m in history]

    def system_ids(self, system: str) -> list[int]:
        return self.ids(self.render({"role": "system", "content": system}))

    def question_ids(self, question: str) -> list[int]:
        """The question as the last user message, followed by the assistant header the answer continues."""
        return self.ids(self.render({"role": "user", "content": question}, generation_prompt=True))

    def answer_ids(self, answer: str) -> list[int]:
        """Token ids of an answer as the assistant would write it, ended by the end-of-turn token when the
        tokenizer has one (so that "Paris" and "Paris, Texas" are told apart)."""
        ids = list(self.tokenizer(answer, add_special_tokens=False)["input_ids"])
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is not None:
            ids.append(int(eos))
        return ids
