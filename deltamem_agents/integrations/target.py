"""Where one framework call runs: :class:`SessionTarget` — the engine, the session and whether it is a throwaway.

A call that names a session runs on the shared engine; one that names none runs in a throwaway session on the
engine's twin (:mod:`.ephemeral`), which is deleted by :meth:`SessionTarget.discard` when the call ends.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from .ephemeral import ephemeral_engine, new_ephemeral_id

__all__ = ["SessionTarget"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SessionTarget:
    """The engine and session of one call.

    Attributes:
        engine: the engine that runs the call (the shared one, or its throwaway twin).
        session_id: the session's id (a generated one for a throwaway session).
        namespace: the namespace given by the caller (``None``: the engine's default).
        ephemeral: a throwaway session (on the twin, deleted after the call, never reported to the caller).
    """

    engine: Any
    session_id: str
    namespace: str | None
    ephemeral: bool

    @classmethod
    def resolve(cls, engine: Any, session_id: str | None, namespace: str | None = None) -> SessionTarget:
        """``session_id=None``: a throwaway session on ``engine``'s twin; otherwise that session on ``engine``."""
        if session_id is None:
            return cls(ephemeral_engine(engine), new_ephemeral_id(), namespace, True)
        return cls(engine, str(session_id), namespace, False)

    @property
    def visible_session_id(self) -> str | None:
        """The id a caller may use again (``None`` for a throwaway session: it is gone after the call)."""
        return None if self.ephemeral else self.session_id

    def call_options(self, history: str | None, on_divergence: str | None = None) -> dict[str, Any]:
        """``namespace``, ``history`` and ``on_divergence`` for the engine call. A throwaway session is new, so
        its messages are the whole conversation (``history="full"``) whatever the caller's style, and cannot
        diverge. ``on_divergence=None`` leaves the engine's default (``"reject"`` unless the engine was built
        otherwise): it is passed only when the caller set it."""
        options: dict[str, Any] = {"namespace": self.namespace, "history": "full" if self.ephemeral else history}
        if on_divergence is not None:
            options["on_divergence"] = on_divergence
        return options

    def version(self, result: Any) -> int | None:
        """The session's version after the call: ``None`` for a throwaway session, else the result's own
        ``version`` when the engine reports one, else read back from the store (``None`` if the session is
        gone or the read fails: the turn itself succeeded, so a failed read does not fail the call)."""
        if self.ephemeral:
            return None
        version = getattr(result, "version", None)
        if version is not None:
            return int(version)
        try:
            return int(self.engine.get_session(self.session_id, namespace=self.namespace).version)
        except Exception:  # noqa: BLE001 - deleted meanwhile, or the store is unreachable after the commit
            logger.debug("could not read the version of session %s", self.session_id, exc_info=True)
            return None

    def discard(self) -> None:
        """Delete a throwaway session from the twin's private store (it may not exist: an early error).
        Does nothing for a named session."""
        if not self.ephemeral:
            return
        try:
            self.engine.delete(self.session_id, namespace=self.namespace)
        except Exception:  # noqa: BLE001 - never created (a call refused before it began), or a bad namespace
            logger.debug("throwaway session %s was not deleted", self.session_id, exc_info=True)
