"""`create_app`: the FastAPI app of ``deltamem serve`` (OpenAI-compatible, with persistent sessions).

``create_app(engine=None, settings=None)`` builds the engine from the settings when none is given (tests pass
one built on a tiny model). API keys live in the session store's database: an SQL store's own SQLAlchemy engine
is reused; a store without one (the in-memory test store) gets an in-memory key table, i.e. local mode unless
keys are created in it. As an ASGI factory: ``uvicorn --factory deltamem_agents.server.app:create_app``
(settings from ``DELTAMEM_*``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from .auth import Authenticator
from .completions import router as completions_router
from .conversations import router as conversations_router
from .errors import APIError, install_error_handlers
from .keys import KeyStore
from .limits import AdmissionLimiter
from .metrics import CONTENT_TYPE_LATEST, ServerMetrics
from .middleware import ObservabilityMiddleware
from .responses import router as responses_router
from .session_choice import make_throwaway_engine
from .sessions_api import router as sessions_router
from .settings import ServerSettings
from .state import ServerState, TenantDep, server_state

__all__ = ["build_engine", "create_app", "open_key_store"]

logger = logging.getLogger("deltamem_agents.server")

#: Worker threads beyond max_concurrency: key lookups, session operations, metrics, throwaway clean-up.
_SPARE_THREADS = 8

LOCAL_MODE_WARNING = (
    "NO API KEYS CONFIGURED: local single-user mode. Every request is served, without authentication, in "
    "namespace %r, and only on a loopback address. Create a key (`deltamem keys create --namespace NS`) to "
    "require keys and separate tenants."
)


def build_engine(settings: ServerSettings) -> Any:
    """The :class:`~deltamem_agents.engine.MemoryEngine` the settings describe (loads the model)."""
    from ..engine import MemoryEngine

    return MemoryEngine(
        settings.model, adapter=settings.adapter, store=settings.store, mode=settings.mode,
        device=settings.device, dtype=settings.dtype,
        window_tokens=settings.window_tokens, kv_tokens=settings.kv_tokens, kv_cache_bytes=settings.kv_cache_bytes,
        kv_cache_dir=settings.kv_cache_dir, max_message_tokens=settings.max_message_tokens,
        max_new_tokens=settings.max_new_tokens, namespace=settings.namespace,
        batch_decode=settings.batch_decode, batch_max_rows=settings.batch_max_rows, protocol=settings.protocol,
        on_divergence=settings.on_divergence, max_messages_per_call=settings.max_messages_per_call,
    )  # fmt: skip


def open_key_store(engine: Any, settings: ServerSettings) -> tuple[KeyStore, bool]:
    """The key table beside the engine's sessions: ``(store, owned)`` (an owned one is closed with the app)."""
    sql_engine = getattr(engine.store, "engine", None)
    if sql_engine is not None and hasattr(sql_engine, "connect"):
        return KeyStore(sql_engine), False
    return KeyStore("sqlite://"), True  # a store without a database: keys in memory, beside it


def create_app(engine: Any = None, settings: ServerSettings | None = None, *, keys: KeyStore | None = None) -> FastAPI:
    """The app. ``engine``: a ready ``MemoryEngine`` (``None``: built from ``settings``, and closed with the app);
    ``keys``: the key table (default: in the engine's store database)."""
    settings = settings or ServerSettings()
    owns_engine = engine is None
    if engine is None:
        engine = build_engine(settings)
    owns_keys = False
    if keys is None:
        keys, owns_keys = open_key_store(engine, settings)
    limiter = AdmissionLimiter(settings.max_queue, settings.max_concurrency or 1, settings.retry_after_s)
    state = ServerState(
        engine=engine, throwaway=make_throwaway_engine(engine), settings=settings, keys=keys,
        auth=Authenticator(keys, namespace=settings.namespace, require_keys=settings.require_keys),
        limiter=limiter, metrics=ServerMetrics(engine, limiter), owns_engine=owns_engine, owns_keys=owns_keys,
    )  # fmt: skip

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # Engine turns, key lookups and store calls all run in the loop's default executor, whose default size
        # (CPUs + 4) would let max_concurrency streams starve the short calls; give it room for both.
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(
            max_workers=(settings.max_concurrency or 1) + _SPARE_THREADS, thread_name_prefix="deltamem-server"))
        if not await asyncio.to_thread(state.auth.keys_mode):
            logger.warning(LOCAL_MODE_WARNING, settings.namespace)
        logger.info("deltamem server: model %s, mode %s, store %s", engine.model_name, engine.default_mode,
                    getattr(engine.store, "url", type(engine.store).__name__))
        try:
            yield
        finally:
            _close(state)

    app = FastAPI(title="deltamem", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.deltamem = state
    install_error_handlers(app)
    app.add_middleware(ObservabilityMiddleware, metrics=state.metrics)
    app.include_router(completions_router)
    app.include_router(sessions_router)
    app.include_router(responses_router)
    app.include_router(conversations_router)

    @app.get("/v1/models")
    async def list_models(request: Request, _tenant: TenantDep) -> dict[str, Any]:
        return {"object": "list", "data": [_model_object(server_state(request))]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request, _tenant: TenantDep) -> dict[str, Any]:
        st = server_state(request)
        if model_id != st.engine.model_name:
            raise APIError(404, f"the model {model_id!r} does not exist; this server runs {st.engine.model_name!r}",
                           param="model", code="model_not_found")
        return _model_object(st)

    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        st = server_state(request)
        return {"status": "ok", "model": st.engine.model_name, "mode": st.engine.default_mode,
                "requests_admitted": st.limiter.admitted, "max_queue": st.limiter.max_queue}

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        body = await asyncio.to_thread(server_state(request).metrics.render)  # it may count the store's sessions
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return app


def _model_object(state: ServerState) -> dict[str, Any]:
    return {"id": state.engine.model_name, "object": "model", "created": state.started, "owned_by": "deltamem"}


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("deltamem-agents")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        return "0"


def _close(state: ServerState) -> None:
    with contextlib.suppress(Exception):
        state.throwaway.close()
    if state.owns_keys:
        state.keys.close()
    if state.owns_engine:
        state.engine.close()
