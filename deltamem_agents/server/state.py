"""What the routes share (:class:`ServerState`, kept on ``app.state.deltamem``) and the request dependencies
that read it: the server state and the request's tenant."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Request

from .auth import Authenticator, Tenant
from .keys import KeyStore
from .limits import AdmissionLimiter
from .metrics import ServerMetrics
from .settings import ServerSettings

__all__ = ["ServerState", "TenantDep", "current_tenant", "server_state"]


@dataclass
class ServerState:
    """The engine (and its throwaway twin), settings, keys, admission limiter and metrics of one app."""

    engine: Any
    throwaway: Any
    settings: ServerSettings
    keys: KeyStore
    auth: Authenticator
    limiter: AdmissionLimiter
    metrics: ServerMetrics
    owns_engine: bool = False
    owns_keys: bool = False
    started: int = field(default_factory=lambda: int(time.time()))


def server_state(request: Request) -> ServerState:
    return request.app.state.deltamem


async def current_tenant(request: Request) -> Tenant:
    """The request's tenant (401 otherwise). The key lookup reads the database: off the event loop."""
    state = server_state(request)
    server = request.scope.get("server")
    host = server[0] if isinstance(server, tuple | list) and server else None
    return await asyncio.to_thread(state.auth.authenticate, request.headers.get("authorization"), host)


#: A route parameter that is the request's tenant.
TenantDep = Annotated[Tenant, Depends(current_tenant)]
