"""Portable session files: one ``.safetensors`` file per exported session.

Tensors: the state as :meth:`DeltaMemState.to_tensors` gives them (``memory (L, 1, N, r, r)`` float32; SSW adds
``pending_sum``, ``pending_count``, ``last_segment``). Header metadata key ``deltamem`` holds JSON::

    {"format": "deltamem-session", "format_version": 1, "session_id", "namespace", "turn",
     "fingerprints": {"model", "adapter"}, "model_name", "adapter_config",
     "written": [{"index", "role", "digest", "tokens"}, …], "window": [{"index", "role", "content", "tokens"}, …],
     "metadata": {…}, "exported_at": ISO time}

safetensors parses no code (unlike pickle), so importing a file from elsewhere is safe; everything in it is
validated before a session is created.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file

from ..adapter import DeltaMemConfig, DeltaMemState
from ..store.base import SessionData, WindowMessage, WrittenMessage
from .errors import InvalidStateError, PortableFormatError

__all__ = ["FORMAT", "FORMAT_VERSION", "ExportedSession", "export_session", "read_export"]

FORMAT = "deltamem-session"
FORMAT_VERSION = 1
_META_KEY = "deltamem"


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
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.to_tensors().items()}
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


def read_export(path: str | os.PathLike[str]) -> ExportedSession:
    """Read and validate an exported session (the state is checked finite here; the layout against a model is
    checked by the engine)."""
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
        if meta.get("format") != FORMAT:
            raise PortableFormatError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r}")
        if int(meta.get("format_version", 0)) > FORMAT_VERSION:
            raise PortableFormatError(
                f"{path} has format version {meta['format_version']}; this library reads up to {FORMAT_VERSION}"
            )
        written = [WrittenMessage(int(w["index"]), str(w["role"]), str(w["digest"]), int(w["tokens"]))
                   for w in meta["written"]]
        window = [WindowMessage(int(w["index"]), str(w["role"]), str(w["content"]), int(w["tokens"]))
                  for w in meta["window"]]
        fingerprints = {"model": str(meta["fingerprints"]["model"]), "adapter": str(meta["fingerprints"]["adapter"])}
        session_id, namespace = str(meta["session_id"]), str(meta["namespace"])
    except PortableFormatError:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise PortableFormatError(f"{path}: malformed session metadata ({exc})") from exc
    try:
        state = DeltaMemState.from_tensors(tensors)
    except ValueError as exc:
        raise InvalidStateError(f"{path}: {exc}") from exc
    if not state.is_finite():
        raise InvalidStateError(f"{path}: the state contains NaN or Inf")
    return ExportedSession(
        session_id=session_id, namespace=namespace, turn=int(meta.get("turn", 0)), fingerprints=fingerprints,
        model_name=str(meta.get("model_name", "")), state=state, written=written, window=window,
        metadata=dict(meta.get("metadata") or {}),
    )
