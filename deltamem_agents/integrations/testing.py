"""Test helpers of the framework integrations: a stand-in engine, and pytest fixtures on the embedded model.

Each integration package's ``tests/conftest.py`` imports what it needs from here, so its tests run from the
package directory as well as from the repository root, without the root test suite's conftest::

    from deltamem_agents.integrations.testing import (  # noqa: F401  (fixtures and a hook, found by name)
        deltamem_engine, embedded, pytest_pycollect_makeitem,
    )

Needs pytest (and pytest-asyncio for the coroutine tests): the ``[dev]`` extra, or a package's ``[test]`` extra.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from ..engine import ChatChunk, ChatResult, SessionNotFoundError, Usage
from ..engine.token_decoder import GenerationEvent
from .ephemeral import _set_twin, close_ephemeral_engine

__all__ = [
    "HERMES_TEMPLATE",
    "FakeEngine",
    "deltamem_engine",
    "embedded",
    "load_embedded_once",
    "pytest_pycollect_makeitem",
    "script_replies",
    "tool_calling_engine",
]


class FakeEngine:
    """A stand-in for :class:`~deltamem_agents.MemoryEngine` with the surface the integrations use, for fast
    tests of their own logic (session routing, option plumbing) that need no model.

    Replies "ok" in two chunks; records every call's session and options in ``calls``; counts turns per session
    in ``sessions``. Its throwaway twin (``ephemeral``) is another ``FakeEngine``, so calls without a session
    land there, as they land on a real engine's twin.
    """

    model_name = "fake-model"
    context_window = 2048
    tokenizer = SimpleNamespace(chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")

    def __init__(self, *, twin: bool = True) -> None:
        self.calls: list[dict[str, Any]] = []
        self.sessions: dict[str, int] = {}
        self.ephemeral: FakeEngine | None = None
        if twin:
            self.ephemeral = FakeEngine(twin=False)
            _set_twin(self, self.ephemeral)

    def _result(self, session_id: str, namespace: str | None, messages: Any, options: dict[str, Any]) -> ChatResult:
        self.calls.append({"session_id": session_id, "namespace": namespace, "messages": list(messages), **options})
        self.sessions[session_id] = self.sessions.get(session_id, 0) + 1
        usage = Usage(prompt_tokens=5, completion_tokens=2, written_tokens=9, full_context_tokens=5, cached_tokens=1)
        return ChatResult("ok", "stop", usage, session_id, namespace or "default", self.sessions[session_id],
                          written_messages=2, kv_cache="new")

    def stream(self, session_id: str, messages: Any, *, namespace: str | None = None,
               **options: Any) -> Iterator[ChatChunk]:
        result = self._result(session_id, namespace, messages, options)

        def chunks() -> Iterator[ChatChunk]:
            yield ChatChunk("o", session_id)
            yield ChatChunk("k", session_id)
            yield ChatChunk("", session_id, finish_reason="stop", usage=result.usage, result=result)

        return chunks()

    async def astream(self, session_id: str, messages: Any, **options: Any):  # noqa: ANN201 - async iterator
        for chunk in self.stream(session_id, messages, **options):
            yield chunk

    def delete(self, session_id: str, *, namespace: str | None = None) -> None:
        if self.sessions.pop(session_id, None) is None:
            raise SessionNotFoundError(session_id)

    def get_session(self, session_id: str, *, namespace: str | None = None) -> Any:
        if session_id not in self.sessions:
            raise SessionNotFoundError(session_id)
        turn = self.sessions[session_id]
        return SimpleNamespace(session_id=session_id, turn=turn, version=turn)


@functools.lru_cache(maxsize=1)
def load_embedded_once() -> tuple[Any, Any]:
    """``(model, tokenizer)`` of the embedded SmolLM2-135M-Instruct, loaded once per process (both packages'
    tests share it). Fetched first only under CI; otherwise :class:`EmbeddedModelUnavailable` when missing."""
    from ..models import load_embedded_model

    return load_embedded_model(fetch=bool(os.environ.get("CI")), progress=False)


@pytest.fixture(scope="session")
def embedded() -> tuple[Any, Any]:
    """(model, tokenizer) of the embedded model; skips when it is not fetched (fails under CI)."""
    from ..models import EmbeddedModelUnavailable

    try:
        return load_embedded_once()
    except EmbeddedModelUnavailable as exc:  # pragma: no cover - depends on the machine
        if os.environ.get("CI"):
            raise
        pytest.skip(f"embedded model not fetched (run `deltamem model fetch`): {exc}")


@pytest.fixture(scope="module")
def deltamem_engine(embedded: tuple[Any, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A MemoryEngine on the embedded model with a fresh, deterministically initialised adapter
    (``adapter="none"``: results do not depend on which trained adapter is installed) and a temporary SQLite
    store (never the user's cache).

    Module-scoped: the adapter is attached to the process-wide embedded model and detached when the module
    ends, so the next module (of either package) starts from the plain model."""
    from ..engine import MemoryEngine

    path = tmp_path_factory.mktemp("integrations-store") / "sessions.db"
    engine = MemoryEngine(embedded, adapter="none", store=f"sqlite:///{path}", window_tokens=256)
    yield engine
    close_ephemeral_engine(engine)
    engine.close()
    engine.model.detach_adapter()


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makeitem(collector: Any, name: str, obj: Any) -> None:
    """Run coroutine tests (the packages' own and the inherited standard-suite ones) with pytest-asyncio, also
    under its strict mode (the repository root's), where a coroutine test needs the mark."""
    if inspect.iscoroutinefunction(obj) and name.startswith("test") and not any(
        m.name == "asyncio" for m in getattr(obj, "pytestmark", [])
    ):
        pytest.mark.asyncio(obj)
    return None


def script_replies(monkeypatch: Any, replies: list[str], piece: int = 3) -> list[str]:
    """Make the engine's next generations produce ``replies`` (one per turn, in order), streamed ``piece``
    characters at a time so that markers arrive split across chunks.

    For tests of what happens *after* the decode loop (tool-call parsing, what is written, what a client gets
    back, how its resent history matches): a tiny random model cannot be made to write a given reply. Only the
    text the decode loop produces is replaced (the engine's ``generate``); the model still reads the prompt (its
    last tokens are run as the real loop runs them), and everything from the text on is the real code.
    Returns the list, which empties as turns run.
    """
    from ..engine import engine as engine_module

    queue = list(replies)

    def scripted_generate(runner: Any, state: Any, cache: Any, prompt_tail: list[int], *, tokenizer: Any,
                          cancelled: Any = None, **_: Any) -> Iterator[GenerationEvent]:
        text = queue.pop(0)
        runner.forward(state, prompt_tail, cache=cache, writes=False)
        tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        for start in range(0, len(text), piece):
            if cancelled is not None and cancelled.is_set():
                yield GenerationEvent("", "cancelled", 0, text[:start])
                return
            yield GenerationEvent(text[start : start + piece])
        yield GenerationEvent("", "stop", tokens, text)

    monkeypatch.setattr(engine_module, "generate", scripted_generate)
    return queue


# A minimal ChatML template with the Hermes tool-call convention (written for the tests): it renders the offered
# tools and past calls, so the engine detects the ``hermes`` call format on it.
HERMES_TEMPLATE = """
{%- if tools %}<|im_start|>system
Tools you may call: {% for t in tools %}{{ t | tojson }} {% endfor %}
To call one, answer <tool_call>{"name": ..., "arguments": {...}}</tool_call><|im_end|>
{% endif %}
{%- for m in messages %}<|im_start|>{{ m.role }}
{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>
{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}
</tool_call>{% endfor %}{% else %}{{ m.content }}{% endif %}<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def tool_calling_engine(tokenizer: Any, store: str) -> Any:
    """A :class:`~deltamem_agents.MemoryEngine` whose template has a tool-call format: a tiny random 2-layer Llama
    (seeded) on a copy of ``tokenizer`` given :data:`HERMES_TEMPLATE`, a fresh adapter, the session store
    ``store``. Its replies are noise; script them with :func:`script_replies`. Close it after use."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from ..engine import MemoryEngine

    tok = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tok.chat_template = HERMES_TEMPLATE
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tok), max_position_embeddings=1024)).eval()
    return MemoryEngine((model, tok), adapter="none", store=store)
