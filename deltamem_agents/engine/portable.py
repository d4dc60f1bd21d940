"""Portable session files: one ``.safetensors`` file per exported session.

Tensors: the state as :meth:`DeltaMemState.to_tensors` gives them (``memory (L, 1, N, r, r)`` float32; SSW adds
``pending_sum``, ``pending_count``, ``last_segment``). Header metadata key ``deltamem`` holds JSON::

    {"format": "deltamem-session", "format_version": 2, "session_id", "namespace", "turn",
     "fingerprints": {"model", "adapter"}, "model_name", "adapter_config",
     "written": [{"index", "role", "digest", "tokens"}, …], "window": [{"index", "role", "content", "tokens"}, …],
     "metadata": {…}, "exported_at": ISO time, "integrity": {"sha256": …}}

``integrity.sha256`` (format 2) is :func:`integrity_digest`: SHA-256 over the canonical JSON of every other key
and every tensor's name, dtype, shape and bytes, so one flipped bit anywhere in what an import uses is refused
(:class:`PortableFormatError`). It detects damage, not a deliberate forgery (whoever edits the file can
recompute it). Format-1 files carry no such check and nothing else in them can verify the state bytes, so they
are refused with a message saying to export the session again.

Everything else is validated before a session is created: the written record must be numbered 0, 1, 2, … (a
gap would later make two records claim one position), the window must be valid messages (the rules of live
messages, :func:`~deltamem_agents.engine.messages.normalize_message`) at increasing positions of the record.
safetensors parses no code (unlike pickle), so importing a file from elsewhere is safe.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..adapter import DeltaMemConfig, DeltaMemState
from ..store.base import SessionData, WindowMessage, WrittenMessage
from ..store.digests import canonical_json
from .errors import InvalidMessageError, InvalidStateError, PortableFormatError
from .messages import ROLES, normalize_message

__all__ = ["FORMAT", "FORMAT_VERSION", "ExportedSession", "export_session", "integrity_digest", "read_export"]

FORMAT = "deltamem-session"
FORMAT_VERSION = 2
_META_KEY = "deltamem"
_INTEGRITY_KEY = "integrity"


def integrity_digest(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over ``meta`` (without its ``integrity`` key; canonical JSON) and each tensor (by name: name,
    dtype, shape, raw bytes in C order)."""
    h = hashlib.sha256(b"deltamem-session-export-v2\0")
    body = {k: v for k, v in meta.items() if k != _INTEGRITY_KEY}
    h.update(canonical_json(body).encode("ascii"))
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(canonical_json([name, str(t.dtype), list(t.shape)]).encode("ascii"))
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class ExportedSession:
    session_id: str
    namespace: str
    turn: int
    fingerprints: dict[str, str]
    model_name: str
    state: DeltaMemState
    written: list[WrittenMessage]
    window: list[WindowMessage]
    metadata: dict[str, Any]


def export_session(path: str | os.PathLike[str], data: SessionData, state: DeltaMemState,
                   fingerprints: dict[str, str], model_name: str, config: DeltaMemConfig) -> Path:
    """Write ``data`` (its state already deserialised as ``state``) to ``path`` atomically."""
    path = Path(path).expanduser()
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "session_id": data.info.session_id,
        "namespace": data.info.namespace,
        "turn": data.turn,
        "fingerprints": dict(fingerprints),
        "model_name": model_name,
        "adapter_config": config.to_dict(),
        "written": [{"index": w.index, "role": w.role, "digest": w.digest, "tokens": w.tokens} for w in data.written],
        "window": [{"index": w.index, "role": w.role, "content": w.content, "tokens": w.tokens} for w in data.window],
        "metadata": data.info.metadata,
        "exported_at": datetime.now(UTC).isoformat(),
    }
    if data.written is None:
        raise ValueError("export_session needs the full written record: load it with full_record=True")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.to_tensors().items()}
    meta[_INTEGRITY_KEY] = {"sha256": integrity_digest(meta, tensors)}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={_META_KEY: json.dumps(meta, ensure_ascii=False)})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _records(path: Path, raw: Any) -> list[WrittenMessage]:
    if not isinstance(raw, list):
        raise PortableFormatError(f"{path}: 'written' must be a list")
    records = []
    for position, w in enumerate(raw):
        if not isinstance(w, dict):
            raise PortableFormatError(f"{path}: written record {position} is not an object")
        index, role, digest, tokens = w.get("index"), w.get("role"), w.get("digest"), w.get("tokens")
        if index != position or not _is_int(index):
            raise PortableFormatError(
                f"{path}: written record {position} has index {index!r}; the record must be numbered 0, 1, 2, … "
                "without gaps (each index is a position in the history)"
            )
        if role not in ROLES or not isinstance(digest, str) or not digest or len(digest) > 128 \
                or not _is_int(tokens) or tokens < 0:
            raise PortableFormatError(f"{path}: written record {position} is malformed: {w!r}")
        records.append(WrittenMessage(index, role, digest, tokens))
    return records


def _window(path: Path, raw: Any, written: int) -> list[WindowMessage]:
    if not isinstance(raw, list):
        raise PortableFormatError(f"{path}: 'window' must be a list")
    window: list[WindowMessage] = []
    for position, w in enumerate(raw):
        if not isinstance(w, dict):
            raise PortableFormatError(f"{path}: window message {position} is not an object")
        index, tokens = w.get("index"), w.get("tokens")
        if not _is_int(index) or not 0 <= index < written or (window and index <= window[-1].index):
            raise PortableFormatError(
                f"{path}: window message {position} has index {index!r}; window indexes must increase and refer "
                f"to written messages (0..{written - 1})"
            )
        if not _is_int(tokens) or tokens < 0:
            raise PortableFormatError(f"{path}: window message {position} has a bad token count {tokens!r}")
        if not isinstance(w.get("content"), str):
            raise PortableFormatError(f"{path}: window message {position} has no text content")
        try:  # the rules of a live message: role, text content, no NUL or lone surrogate, not empty
            message = normalize_message({"role": w.get("role"), "content": w.get("content")}, position)
        except InvalidMessageError as exc:
            raise PortableFormatError(f"{path}: window {exc}") from exc
        window.append(WindowMessage(index, message.role, message.content, tokens))
    return window


def read_export(path: str | os.PathLike[str]) -> ExportedSession:
    """Read and validate an exported session (the state is checked finite here; the layout against a model is
    checked by the engine).

    Raises :class:`PortableFormatError` for a file that is not a session export, of another format version, that
    fails its integrity check, or whose record or window is malformed; :class:`InvalidStateError` for a state
    that is not a state (or holds NaN/Inf).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no such session file: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as exc:  # safetensors raises its own error types for a damaged header
        raise PortableFormatError(f"{path} is not a readable safetensors file: {exc}") from exc
    raw = header.get(_META_KEY)
    if raw is None:
        raise PortableFormatError(f"{path} is not a deltamem session export (no '{_META_KEY}' metadata)")
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise PortableFormatError(f"{path}: malformed session metadata ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise PortableFormatError(f"{path}: format {meta.get('format') if isinstance(meta, dict) else None!r} "
                                  f"is not {FORMAT!r}")
    version = meta.get("format_version")
    if not _is_int(version) or version > FORMAT_VERSION:
        raise PortableFormatError(
            f"{path} has format version {version!r}; this library reads version {FORMAT_VERSION}"
        )
    if version < 2:
        raise PortableFormatError(
            f"{path} has format version {version}, written before session exports carried an integrity check; "
            "nothing in it can verify the state, so it is not imported. Export the session again with this "
            "version of deltamem (`deltamem sessions export`)"
        )
    try:
        state = DeltaMemState.from_tensors(tensors)
    except ValueError as exc:
        raise InvalidStateError(f"{path}: {exc}") from exc
    if not state.is_finite():
        raise InvalidStateError(f"{path}: the state contains NaN or Inf")
    given = meta.get(_INTEGRITY_KEY)
    if not isinstance(given, dict) or given.get("sha256") != integrity_digest(meta, tensors):
        raise PortableFormatError(
            f"{path} fails its integrity check: the file was damaged or altered after export (SHA-256 mismatch)"
        )
    try:
        written = _records(path, meta["written"])
        window = _window(path, meta["window"], len(written))
        fingerprints = {"model": str(meta["fingerprints"]["model"]), "adapter": str(meta["fingerprints"]["adapter"])}
        session_id, namespace = str(meta["session_id"]), str(meta["namespace"])
        metadata = meta.get("metadata") or {}
        turn = meta.get("turn", 0)
        if not isinstance(metadata, dict) or not _is_int(turn) or turn < 0:
            raise PortableFormatError(f"{path}: malformed session metadata (metadata or turn)")
    except PortableFormatError:
        raise
    except (KeyError, TypeError) as exc:
        raise PortableFormatError(f"{path}: malformed session metadata ({exc!r})") from exc
    return ExportedSession(
        session_id=session_id, namespace=namespace, turn=turn, fingerprints=fingerprints,
        model_name=str(meta.get("model_name", "")), state=state, written=written, window=window, metadata=metadata,
    )
