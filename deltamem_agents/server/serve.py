"""Running the server: the bind check of local mode, then uvicorn (what ``deltamem serve`` calls)."""

from __future__ import annotations

import logging
import os
from typing import Any

from ..errors import DeltaMemError
from .auth import is_loopback
from .keys import KeyStore
from .settings import ServerSettings

__all__ = ["ServerConfigError", "check_bind", "create_worker_app", "run_server", "settings_to_env"]


class ServerConfigError(DeltaMemError, RuntimeError):
    """The server refuses to start with these settings (the message says why and what to do)."""


def check_bind(settings: ServerSettings, keys: KeyStore) -> bool:
    """Whether keys are required; raises :class:`ServerConfigError` for a non-loopback host without keys.

    Checked before the model loads, so the refusal is immediate.
    """
    keys_mode = settings.require_keys or keys.count() > 0
    if not keys_mode and not is_loopback(settings.host):
        raise ServerConfigError(
            f"refusing to listen on {settings.host!r} without API keys: with no key configured the server "
            "serves everyone, unauthenticated (local single-user mode), so it only binds a loopback address "
            "such as 127.0.0.1. Create a key first (`deltamem keys create --namespace NS"
            f"{' --store URL' if settings.store else ''}`), or use --host 127.0.0.1."
        )
    return keys_mode


def settings_to_env(settings: ServerSettings) -> dict[str, str]:
    """The settings as ``DELTAMEM_*`` variables (what a worker process reads back with ``ServerSettings()``)."""
    env = {}
    for name, value in settings.model_dump().items():
        if value is not None:
            env[f"DELTAMEM_{name.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


def create_worker_app() -> Any:
    """The ASGI factory each worker process of ``deltamem serve --workers N`` calls: settings from the
    environment, the torch thread count applied, then its own engine (model and store connections)."""
    from ..cli_support import apply_threads, default_threads
    from .app import create_app

    settings = ServerSettings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    apply_threads(default_threads() if settings.threads is None else settings.threads)
    return create_app(settings=settings)


def run_server(settings: ServerSettings, workers: int = 1) -> None:
    """Check the bind, load the engine, serve until interrupted.

    ``workers > 1``: uvicorn starts that many processes on one socket; each builds its own engine from the
    settings, handed over as ``DELTAMEM_*`` environment variables (:func:`create_worker_app`). They share
    nothing but the store, so use PostgreSQL (one SQLite file serialises every write).
    """
    import uvicorn

    from ..cli_support import apply_threads, default_threads
    from .app import create_app

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with KeyStore(settings.store) as keys:
        check_bind(settings, keys)
    if workers > 1:
        os.environ.update(settings_to_env(settings))  # the spawned workers inherit the environment
        uvicorn.run("deltamem_agents.server.serve:create_worker_app", factory=True, workers=workers,
                    host=settings.host, port=settings.port, log_level=settings.log_level)
        return
    apply_threads(default_threads() if settings.threads is None else settings.threads)  # before the model loads
    app = create_app(settings=settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level)
