"""The app's outermost own layer: per-request metrics, and the catch-all that turns any exception nothing else
handled into a logged 500 in OpenAI's shape (instead of Starlette's plain-text page and a second traceback)."""

from __future__ import annotations

import time
from typing import Any

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import internal_error, logger
from .metrics import ServerMetrics

__all__ = ["ObservabilityMiddleware"]


def route_label(scope: Scope) -> str:
    """The matched route's template (``/v1/sessions/{session_id}``), never the raw path: ids must not become
    label values (unbounded cardinality, and they would leak into the metrics)."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


class ObservabilityMiddleware:
    """Pure ASGI (no buffering, so streamed responses stream)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500, "started": False}

        async def tracking_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = int(message["status"])
                status["started"] = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except ClientDisconnect:  # the client left mid-response: nothing to answer, nothing went wrong here
            logger.debug("client disconnected from %s %s", scope.get("method"), scope.get("path"))
        except Exception as exc:  # noqa: BLE001 - the last line of defence
            logger.error("unhandled error on %s %s", scope.get("method"), scope.get("path"), exc_info=exc)
            if not status["started"]:
                await _send_json(tracking_send, internal_error())
            status["code"] = 500 if not status["started"] else status["code"]
        finally:
            self.metrics.observe_request(route_label(scope), str(scope.get("method", "")), int(status["code"]),
                                         time.perf_counter() - start)


async def _send_json(send: Send, error: Any) -> None:
    response = error.response()
    await send({"type": "http.response.start", "status": response.status_code,
                "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})
