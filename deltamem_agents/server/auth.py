"""Who is asking: the tenant (namespace) of a request, from its ``Authorization: Bearer dm-…`` key.

Two modes:

* **keys** — once any key exists in the key table (revoked ones count, so revoking the last key locks the server
  rather than opening it), or with ``require_keys``: every request needs an active key, and works in that key's
  namespace only. A missing, malformed, unknown or revoked key is a 401, all with the same message.
* **local single-user** — no key was ever created: no authentication, every request in the configured
  namespace, and only on a loopback address. ``deltamem serve`` refuses to bind elsewhere in this mode, and a
  request reaching a non-loopback socket anyway (the app run by another ASGI server) is refused with 401.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from dataclasses import dataclass

from .errors import APIError
from .keys import KeyStore

__all__ = ["Authenticator", "Tenant", "is_loopback"]

#: While in local mode, how often the key table is looked at again (a key created meanwhile turns keys on).
_RECHECK_S = 1.0


@dataclass(frozen=True)
class Tenant:
    """The namespace a request works in, and the key that granted it (``None`` in local mode)."""

    namespace: str
    key_id: str | None = None


def is_loopback(host: str | None) -> bool:
    """``localhost`` or a loopback IP address (``127.0.0.0/8``, ``::1``)."""
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _unauthorized(message: str) -> APIError:
    return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


class Authenticator:
    """Resolves a request's tenant (blocking: it reads the key table; call it from a worker thread).

    Args:
        keys: the key table.
        namespace: the namespace of local mode.
        require_keys: keys mode even while the table is empty.
    """

    def __init__(self, keys: KeyStore, *, namespace: str, require_keys: bool = False) -> None:
        self.keys = keys
        self.namespace = namespace
        self._keys_mode = bool(require_keys)
        self._checked_at = float("-inf")
        self._guard = threading.Lock()

    def keys_mode(self) -> bool:
        """Whether keys are required (sticky: once on, it stays on)."""
        if self._keys_mode:
            return True
        now = time.monotonic()
        with self._guard:
            if now - self._checked_at >= _RECHECK_S:
                self._checked_at = now
                self._keys_mode = self.keys.count() > 0
            return self._keys_mode

    def authenticate(self, authorization: str | None, server_host: str | None) -> Tenant:
        """The tenant of a request with this ``Authorization`` header, reaching a socket bound to
        ``server_host`` (``None``: not an IP socket, e.g. a Unix socket). Raises a 401 :class:`APIError`."""
        if not self.keys_mode():
            if server_host is not None and not is_loopback(server_host):
                raise _unauthorized(
                    "no API keys are configured, so this server only answers on a loopback address; "
                    "create one with `deltamem keys create --namespace NS`"
                )
            # Local mode ignores whatever Authorization a client sends (SDKs insist on sending some key).
            return Tenant(self.namespace)
        if not authorization:
            raise _unauthorized("missing API key: send 'Authorization: Bearer dm-…'")
        scheme, _, secret = authorization.strip().partition(" ")
        key = self.keys.lookup(secret.strip()) if scheme.lower() == "bearer" else None
        if key is None:
            raise _unauthorized("invalid API key")
        return Tenant(key.namespace, key.id)
