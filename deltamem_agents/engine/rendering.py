"""Turning messages into token ids with the model's chat template.

Two uses, two functions:

* :meth:`ChatRenderer.message_ids` — the tokens **written** for one message: the message rendered by the chat
  template as it appears inside a conversation (for ChatML: ``<|im_start|>{role}\\n{content}<|im_end|>\\n``). We
  render ``[placeholder system, message]`` and cut off the placeholder's rendering, so that templates that inject
  a default system prompt before a first message (SmolLM2 does) do not leak it into every write. The result
  depends on the message alone, which is what makes writes idempotent and replay exact.
* :meth:`ChatRenderer.prompt_ids` — the **prompt** of a turn: the template applied to the prompt's messages as a
  whole, with the generation header (and ``tools`` if given).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from .errors import InvalidMessageError
from .messages import Message

__all__ = ["ChatRenderer"]

_PLACEHOLDER = {"role": "system", "content": "deltamem-placeholder"}


class ChatRenderer:
    """Chat-template rendering with a small cache of per-message token ids (keyed by digest)."""

    def __init__(self, tokenizer: Any, cache_size: int = 4096) -> None:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("the tokenizer has no chat template; the engine needs one to render messages")
        self.tokenizer = tokenizer
        self._cache: OrderedDict[str, list[int]] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.generation_header_ids = self._generation_header()

    # -- template helpers -----------------------------------------------------------------------------------
    def _template(self, messages: list[dict[str, Any]], *, generation: bool = False, tools: Any = None,
                  **template_vars: Any) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation, tools=tools, **template_vars
            )
        except Exception as exc:  # jinja raises TemplateError for roles/orders a template does not accept
            raise InvalidMessageError(f"the chat template cannot render these messages: {exc}") from exc

    def encode(self, text: str) -> list[int]:
        """Token ids of already-templated text (special tokens appear literally in it)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _generation_header(self) -> list[int]:
        convo = [_PLACEHOLDER, {"role": "user", "content": "x"}]
        plain = self._template(convo)
        with_header = self._template(convo, generation=True)
        if not with_header.startswith(plain):
            raise ValueError("chat template: the generation prompt does not extend the conversation")
        return self.encode(with_header[len(plain) :])

    # -- messages -------------------------------------------------------------------------------------------
    def message_text(self, message: Message) -> str:
        """The template's rendering of ``message`` inside a conversation (see the module docstring)."""
        head = self._template([_PLACEHOLDER])
        try:
            full = self._template([_PLACEHOLDER, message.to_template()])
        except InvalidMessageError:
            full = ""
        if full.startswith(head) and len(full) > len(head):
            return full[len(head) :]
        # Templates that refuse a system message after the first (or render it merged): render it alone.
        return self._template([message.to_template()])

    def message_ids(self, message: Message) -> list[int]:
        """Token ids written for ``message`` (cached by digest)."""
        key = message.digest
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        ids = self.encode(self.message_text(message))
        with self._lock:
            self._cache[key] = ids
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return ids

    def prompt_ids(self, messages: list[Message], *, tools: Any = None, generation: bool = True) -> list[int]:
        """Token ids of a whole prompt: the template over ``messages`` (+ the generation header)."""
        if not messages:
            return list(self.generation_header_ids) if generation else []
        return self.encode(self._template([m.to_template() for m in messages], generation=generation, tools=tools))

    def continuation_ids(self, history: list[Message], new: list[Message], *, tools: Any = None) -> list[int]:
        """Tokens that the template puts *before* the first message when ``history`` is empty (a default system
        prompt, a BOS token…), or the rendering of ``history`` itself otherwise. Used by online mode, whose
        prompt is ``continuation_ids + Σ message_ids(new) + generation header``."""
        if history:
            return self.encode(self._template([m.to_template() for m in history], tools=tools))
        if not new:
            return []
        head = self._head_before(new[0], tools)
        if head is None and tools:
            head = self._tools_head(tools)
        return self.encode(head) if head else []

    def _head_before(self, first: Message, tools: Any, **template_vars: Any) -> str | None:
        """What the template renders before ``first`` when it opens the conversation; ``None`` when the
        template does not render ``first`` as its own (it merged ``tools`` into it) or refuses it alone."""
        try:
            text = self._template([first.to_template()], tools=tools, **template_vars)
        except InvalidMessageError:
            return None
        own = self.message_text(first)
        return text[: -len(own)] if own and text.endswith(own) else None

    def _tools_head(self, tools: Any) -> str | None:
        """The tool definitions as a head of their own, for templates that write them *into* the first message
        (Qwen into a leading system message, Llama 3 into the first user message): rendered as the template
        does before a plain user message (Llama 3 asked to put them in its system block), so the tools reach
        the model although each message is written as its own."""
        probe = Message("user", "deltamem-probe")
        for template_vars in ({}, {"tools_in_user_message": False}):
            head = self._head_before(probe, tools, **template_vars)
            if head is not None:
                return head
        return None
