"""Helpers for the trainer tests: a character-level ChatML-like tokenizer for the tiny random models."""

from __future__ import annotations


class CharTokenizer:
    """Just enough of a Hugging Face tokenizer for the trainer: ChatML rendering, char-level ids < 96."""

    pad_token_id = 0
    eos_token_id = 1
    vocab_size = 96

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        text = "".join(f"<{m['role'][0]}>{m['content']}|" for m in messages)
        if add_generation_prompt:
            text += "<a>"
        return text

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + (ord(ch) % 90) for ch in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)
