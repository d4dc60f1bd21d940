"""Server-sent events for streamed completions, and the lifetime of one streamed turn.

A streamed turn is opened *before* the response starts: the first engine chunk is awaited first, so every
error the engine raises before generating (validation, unknown session, size, conflict) is still a proper
HTTP status. After that, an error is sent as one ``data: {"error": …}`` event (OpenAI's clients raise it) and
the stream ends without ``[DONE]``.

Whatever ends the response — the last chunk, an error, the client going away — :meth:`OpenStream.close` runs
exactly once: it frees the admission ticket, closes the engine stream (an engine stream closed before its last
chunk commits nothing) and discards a throwaway session.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from .errors import to_api_error

__all__ = ["DONE", "ChunkFormat", "OpenStream", "SSEResponse", "sse", "sse_events"]

logger = logging.getLogger("deltamem_agents.server")

DONE = b"data: [DONE]\n\n"


def sse(data: dict[str, Any]) -> bytes:
    """One ``data:`` event (compact JSON has no newlines, so one line is one event)."""
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"


class ChunkFormat(Protocol):
    """How an endpoint spells its chunks."""

    def opening(self) -> list[dict[str, Any]]: ...

    def content(self, text: str) -> list[dict[str, Any]]: ...

    def closing(self, text: str, finish_reason: str, result: Any, extension: dict[str, Any]) -> list[dict[str, Any]]: ...


class OpenStream:
    """An engine stream whose first chunk has arrived, with what must be released when it ends."""

    def __init__(self, stream: AsyncIterator[Any], first: Any, on_close: Callable[[], Awaitable[None]]) -> None:
        self.stream = stream
        self.first = first
        self._on_close = on_close
        self._closed = False

    async def next(self) -> Any:
        return await self.stream.__anext__()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            aclose = getattr(self.stream, "aclose", None)
            if aclose is not None:
                await aclose()  # stops generation at the next token; an unfinished turn commits nothing
        finally:
            await self._on_close()


async def sse_events(handle: OpenStream, fmt: ChunkFormat,
                     finish: Callable[[Any], Awaitable[dict[str, Any]]]) -> AsyncIterator[bytes]:
    """The event stream of one turn: opening chunk(s), content chunks, closing chunk(s), ``[DONE]``.
    ``finish(result)`` runs once the engine committed the turn and gives the ``deltamem`` extension."""
    try:
        for event in fmt.opening():
            yield sse(event)
        chunk = handle.first
        while True:
            if chunk.result is not None:
                extension = await finish(chunk.result)
                for event in fmt.closing(chunk.text, chunk.finish_reason, chunk.result, extension):
                    yield sse(event)
                yield DONE
                return
            if chunk.text:  # the engine may hand over empty chunks while it holds back a possible stop string
                for event in fmt.content(chunk.text):  # none while a possible tool call is held back
                    yield sse(event)
            chunk = await handle.next()
    except Exception as exc:  # noqa: BLE001 - becomes an error event; unexpected ones are logged there
        yield sse(to_api_error(exc, engine_call=True).body())
    finally:
        await handle.close()


class SSEResponse(StreamingResponse):
    """A ``text/event-stream`` response that closes its turn however the response ends — also when the
    client disconnects before the body iterator ever ran (its ``finally`` would then never run)."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], handle: OpenStream, headers: dict[str, str] | None = None) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})}
        super().__init__(events, headers=headers, media_type=self.media_type)
        self._events = events
        self._handle = handle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self._events, "aclose", None)
            try:
                if aclose is not None:
                    with contextlib.suppress(RuntimeError):  # already running elsewhere: it closes itself
                        await aclose()
            finally:
                await asyncio.shield(self._handle.close())
