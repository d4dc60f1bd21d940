"""``deltamem serve``: an OpenAI-compatible HTTP server on the engine, with persistent sessions and tenants
(``docs/server.md``).

>>> from deltamem_agents.server import create_app, ServerSettings
>>> app = create_app(engine, ServerSettings(max_queue=8))   # any ASGI server; tests use uvicorn

The names are imported lazily: ``deltamem keys`` needs only the key table (SQLAlchemy), not FastAPI.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "create_app": ".app",
    "build_engine": ".app",
    "ServerSettings": ".settings",
    "KeyStore": ".keys",
    "APIKey": ".keys",
    "APIError": ".errors",
    "Tenant": ".auth",
    "ServerConfigError": ".serve",
    "run_server": ".serve",
}

__all__ = [
    "APIError",
    "APIKey",
    "KeyStore",
    "ServerConfigError",
    "ServerSettings",
    "Tenant",
    "build_engine",
    "create_app",
    "run_server",
]

if TYPE_CHECKING:  # pragma: no cover
    from .app import build_engine, create_app
    from .auth import Tenant
    from .errors import APIError
    from .keys import APIKey, KeyStore
    from .serve import ServerConfigError, run_server
    from .settings import ServerSettings


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
