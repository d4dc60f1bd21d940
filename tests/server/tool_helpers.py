"""Helpers of the tool-call tests: real models' chat templates on the embedded tokenizer, and scripted replies.

A tiny random model cannot be made to write a tool call, and the API has no ``logit_bias`` to steer it. So the
live tests replace only the **text the decode loop produces** (:func:`script_replies` patches the engine's
``generate``); everything from that text on is real: the engine parses it, writes the reply into the session as
the assistant message a client sends back, commits, and the server builds bodies and chunks that the real
clients parse — and the next turn's history matching sees what the client really resends.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from deltamem_agents.integrations.testing import script_replies  # noqa: F401  (re-exported for the tests)

TEMPLATES = Path(__file__).resolve().parent / "chat_templates"

QWEN25 = "Qwen-Qwen2.5-7B-Instruct"
QWEN3 = "Qwen-Qwen3-0.6B"
LLAMA31 = "meta-llama-Llama-3.1-8B-Instruct"
LLAMA32 = "meta-llama-Llama-3.2-3B-Instruct"
MISTRAL_NEMO = "mistralai-Mistral-Nemo-Instruct-2407"

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}}  # fmt: skip
ADD_TOOL = {"type": "function", "function": {
    "name": "add", "description": "Add two integers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}},
}}  # fmt: skip


def template(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text()


def with_template(tokenizer: Any, name: str) -> Any:
    """A copy of ``tokenizer`` whose chat template is the named model's."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template(name)
    return tok
