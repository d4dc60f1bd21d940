"""``/v1/sessions``: list, show, fork, rollback, reset, export, import and delete the tenant's sessions.

Every operation runs in the caller's namespace and nowhere else: another tenant's session is simply not there
(404, the same as an id nobody uses, so ids do not leak). The engine's calls block (store transactions, the
session's lock), so they run in worker threads.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from .errors import APIError, engine_errors
from .schemas import ForkRequest, RollbackRequest
from .session_choice import choose_session
from .state import TenantDep, server_state

__all__ = ["router", "session_object"]

router = APIRouter(prefix="/v1/sessions")


def _ts(value: Any) -> int:
    return int(value.timestamp())


def session_object(info: Any) -> dict[str, Any]:
    """A session's header as JSON (``created_at``/``updated_at`` in Unix seconds, as OpenAI's objects)."""
    return {
        "id": info.session_id, "object": "session", "namespace": info.namespace, "turn": info.turn,
        "version": info.version, "created_at": _ts(info.created_at), "updated_at": _ts(info.updated_at),
        "metadata": dict(info.metadata or {}),
    }  # fmt: skip


async def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    with engine_errors():
        return await asyncio.to_thread(fn, *args, **kwargs)


def _id(session_id: str) -> str:
    return str(choose_session(None, session_id, None).session_id)  # the same id check as everywhere


@router.get("")
async def list_sessions(request: Request, tenant: TenantDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                        offset: Annotated[int, Query(ge=0)] = 0) -> dict[str, Any]:
    engine = server_state(request).engine
    infos = await _call(engine.list_sessions, namespace=tenant.namespace, limit=limit, offset=offset)
    return {"object": "list", "data": [session_object(i) for i in infos], "has_more": len(infos) == limit}


@router.post("/import")
async def import_session(request: Request, tenant: TenantDep,
                         session_id: Annotated[str | None, Query()] = None) -> JSONResponse:
    """The body is an exported ``.safetensors`` file; the session id comes from ``?session_id=``, the
    ``X-Session-ID`` header, or the file. It is always imported into the caller's namespace."""
    state = server_state(request)
    choice = choose_session(request.headers.get("X-Session-ID"), session_id, None)
    limit = state.settings.max_import_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the session file is larger than max_import_bytes={limit}", code="file_too_large")
    fd, name = tempfile.mkstemp(prefix="deltamem-import-", suffix=".safetensors")
    path = Path(name)
    try:
        size = 0
        with os.fdopen(fd, "wb") as out:
            async for part in request.stream():
                size += len(part)
                if size > limit:  # a chunked upload has no Content-Length to refuse it by
                    raise APIError(413, f"the session file is larger than max_import_bytes={limit}",
                                   code="file_too_large")
                out.write(part)
        if size == 0:
            raise APIError(422, "the request body must be an exported session file", code="invalid_session_file")
        try:
            info = await _call(state.engine.import_session, path, choice.session_id, namespace=tenant.namespace)
        except APIError as err:
            err.message = err.message.replace(str(path), "the uploaded file")  # no server paths in responses
            raise
    finally:
        path.unlink(missing_ok=True)
    return JSONResponse(session_object(info), status_code=201)


@router.get("/{session_id}")
async def show_session(session_id: str, request: Request, tenant: TenantDep) -> dict[str, Any]:
    engine = server_state(request).engine
    sid = _id(session_id)
    stats = await _call(engine.stats, sid, namespace=tenant.namespace)
    turns = await _call(engine.list_turns, sid, namespace=tenant.namespace)
    return session_object(stats.info) | {
        "stats": {
            "snapshots": stats.turns, "written_messages": stats.written_messages,
            "written_tokens": stats.written_tokens, "window_messages": stats.window_messages,
            "state_bytes": stats.state_bytes, "stored_bytes": stats.stored_bytes,
        },
        "turns": [{"turn": t.turn, "created_at": _ts(t.created_at), "written_count": t.written_count,
                   "state_bytes": t.state_bytes} for t in turns],
    }  # fmt: skip


@router.post("/{session_id}/fork")
async def fork_session(session_id: str, body: ForkRequest, request: Request,
                       tenant: TenantDep) -> JSONResponse:
    engine = server_state(request).engine
    new_id = _id(body.new_id) if body.new_id is not None else None
    info = await _call(engine.fork, _id(session_id), new_id, namespace=tenant.namespace, turn=body.turn)
    return JSONResponse(session_object(info), status_code=201)


@router.post("/{session_id}/rollback")
async def rollback_session(session_id: str, body: RollbackRequest, request: Request,
                           tenant: TenantDep) -> dict[str, Any]:
    engine = server_state(request).engine
    return session_object(await _call(engine.rollback, _id(session_id), body.turn, namespace=tenant.namespace))


@router.post("/{session_id}/reset")
async def reset_session(session_id: str, request: Request, tenant: TenantDep) -> dict[str, Any]:
    engine = server_state(request).engine
    return session_object(await _call(engine.reset, _id(session_id), namespace=tenant.namespace))


@router.get("/{session_id}/export")
async def export_session(session_id: str, request: Request, tenant: TenantDep,
                         turn: Annotated[int | None, Query(ge=0)] = None) -> Response:
    """The session as one portable ``.safetensors`` file (what ``POST /v1/sessions/import`` takes back)."""
    engine = server_state(request).engine
    sid = _id(session_id)
    with tempfile.TemporaryDirectory(prefix="deltamem-export-") as tmp:
        path = Path(tmp) / f"{sid}.safetensors"
        await _call(engine.export_session, sid, path, namespace=tenant.namespace, turn=turn)
        data = await asyncio.to_thread(path.read_bytes)
    return Response(data, media_type="application/octet-stream",
                    headers={"Content-Disposition": f'attachment; filename="{sid}.safetensors"'})


@router.delete("/{session_id}")
async def delete_session(session_id: str, request: Request, tenant: TenantDep) -> dict[str, Any]:
    engine = server_state(request).engine
    sid = _id(session_id)
    await _call(engine.delete, sid, namespace=tenant.namespace)
    return {"id": sid, "object": "session.deleted", "deleted": True}
