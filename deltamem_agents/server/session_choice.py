"""Which session a generation request runs in, and the private engine of throwaway sessions.

Order: the ``X-Session-ID`` header or a ``session_id`` body field (they must agree when both are given), then
the ``conversation`` body field (its id is used as the session id), then ``previous_response_id`` (the
Responses API: the session that response left, or a fork of it — :mod:`.responses` resolves the id and passes
the session here). With none of them the request runs in a **throwaway** session: on a second engine
that shares the model (and its forward lock) but keeps sessions in a private in-memory store with no KV cache,
and that session is deleted when the request ends. Nothing of it ever reaches the real store or its cache dir.
The twin and the throwaway ids come from :mod:`deltamem_agents.integrations.ephemeral`, shared with the
framework integrations.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..integrations.ephemeral import make_ephemeral_engine, new_ephemeral_id
from ..store.base import InvalidIdentifierError, validate_identifier
from .errors import APIError

__all__ = ["SessionChoice", "choose_session", "make_throwaway_engine", "new_throwaway_id"]


@dataclass(frozen=True)
class SessionChoice:
    """The session a request names (``None``: a throwaway one) and where the name came from."""

    session_id: str | None
    source: str | None = None  # "header", "session_id", "conversation", "previous_response_id"

    @property
    def throwaway(self) -> bool:
        return self.session_id is None


def _checked(value: str, param: str) -> str:
    try:
        return validate_identifier(value, "session id")
    except InvalidIdentifierError as exc:
        raise APIError(422, str(exc), param=param, code="invalid_identifier") from exc


def choose_session(header: str | None, session_id: str | None, conversation: str | None,
                   previous_response: str | None = None) -> SessionChoice:
    """Apply the order above (``previous_response``: the session a ``previous_response_id`` resolved to).
    Raises a 422 :class:`APIError` for an invalid id or a header and a body field that disagree (one of them
    would be silently ignored)."""
    if header is not None and header.strip():
        header = _checked(header.strip(), "X-Session-ID")
        if session_id is not None and session_id != header:
            raise APIError(422, f"the X-Session-ID header ({header!r}) and the session_id field ({session_id!r}) "
                           "name different sessions", param="session_id", code="invalid_value")
        return SessionChoice(header, "header")
    if session_id is not None:
        return SessionChoice(_checked(session_id, "session_id"), "session_id")
    if conversation is not None:
        return SessionChoice(_checked(conversation, "conversation"), "conversation")
    if previous_response is not None:
        return SessionChoice(_checked(previous_response, "previous_response_id"), "previous_response_id")
    return SessionChoice(None)


#: The throwaway mechanism is the integrations' (one implementation for the server and the framework packages).
new_throwaway_id = new_ephemeral_id
make_throwaway_engine = make_ephemeral_engine
