"""Session KV caches on disk, so a resumed session skips its re-prefill (llama.cpp's slot save/restore, for us).

One safetensors file per session (the name is a hash of namespace and session id, so ids never become paths),
holding the per-layer key/value tensors of its :class:`~.kv_pool.HotContext` and, in the header, JSON with what
the cache belongs to: namespace, session id, session version, state digest, message indices and digests, the
engine's model and adapter fingerprints, and a SHA-256 over the tensor bytes.

A file is used only when all of that matches the session as loaded from the store and the checksum verifies;
anything else (missing, stale version, another state, another model, a torn or edited file) is a miss and the
engine re-prefills from text — a cache file can make a turn faster, never different. Files are written to a
temporary name and renamed (a crash leaves the old file or none), and the directory is kept under a byte cap by
deleting the least recently used files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

import torch

from ..files import atomic_write
from ..models.kv_cache import cache_layers, new_cache
from ..store.base import SessionData
from .kv_pool import HotContext

__all__ = ["KVCacheFiles"]

logger = logging.getLogger(__name__)

FORMAT = 1
_SUFFIX = ".kv.safetensors"


def _tensor_digest(tensors: list[torch.Tensor]) -> str:
    h = hashlib.sha256(b"deltamem-kv-v1")
    for t in tensors:
        t = t.detach().to("cpu").contiguous()
        h.update(f"|{t.dtype}|{','.join(map(str, t.shape))}|".encode())
        h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()


class KVCacheFiles:
    """A directory of session KV caches, capped at ``max_bytes`` (LRU by file access time).

    Args:
        directory: where the files go (created if missing).
        max_bytes: total size cap of the directory's cache files.
        fingerprints: the engine's ``{"model": …, "adapter": …}``; files of another model/adapter never load.
    """

    def __init__(self, directory: str | os.PathLike[str], max_bytes: int, fingerprints: dict[str, str]) -> None:
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0:
            raise ValueError(f"max_bytes must be a non-negative integer, got {max_bytes!r}")
        self.directory = Path(directory).expanduser()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.fingerprints = dict(fingerprints)
        self._lock = threading.Lock()

    def path(self, key: tuple[str, str]) -> Path:
        name = hashlib.sha256(f"{key[0]}\0{key[1]}".encode()).hexdigest()[:40]
        return self.directory / f"{name}{_SUFFIX}"

    # ------------------------------------------------------------------------------------------------- save
    def save(self, key: tuple[str, str], context: HotContext) -> Path | None:
        """Write ``context`` as the session's file (atomically), then enforce the cap. Errors are logged, not
        raised: a cache that could not be saved only costs a re-prefill later."""
        from safetensors.torch import save_file

        layers = cache_layers(context.cache)
        tensors: dict[str, torch.Tensor] = {}
        for i, (k, v) in enumerate(layers):
            tensors[f"k{i}"] = k.detach().to("cpu").contiguous()
            tensors[f"v{i}"] = v.detach().to("cpu").contiguous()
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if size > self.max_bytes:
            return None
        meta = {
            "format": FORMAT,
            "namespace": key[0],
            "session_id": key[1],
            "version": context.version,
            "state": context.state,
            "indices": list(context.indices),
            "digests": list(context.digests),
            "head_tokens": context.head_tokens,
            "tools": context.tools,
            "layers": len(layers),
            "fingerprints": self.fingerprints,
            "sha256": _tensor_digest([tensors[f"{kv}{i}"] for i in range(len(layers)) for kv in "kv"]),
        }
        path = self.path(key)
        try:
            atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"deltamem_kv": json.dumps(meta)}))
        except OSError as exc:
            logger.warning("could not save the KV cache of %s/%s to %s: %s", key[0], key[1], path, exc)
            return None
        self._enforce_cap(keep=path)
        return path

    # ------------------------------------------------------------------------------------------------- load
    def load(self, key: tuple[str, str], data: SessionData, config: Any, device: torch.device) -> HotContext | None:
        """The session's cache if its file belongs to ``data`` (see the module docstring), else None."""
        from safetensors import safe_open

        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("deltamem_kv", "null"))
                if not self._header_ok(meta, key):
                    return None
                context = HotContext(None, int(meta["version"]), str(meta["state"]), tuple(meta["indices"]),
                                     tuple(meta["digests"]), int(meta["head_tokens"]), str(meta.get("tools", "")))
                if not context.belongs_to(data):
                    return None  # stale: another version or state of the session
                n = int(meta["layers"])
                layers = [(f.get_tensor(f"k{i}"), f.get_tensor(f"v{i}")) for i in range(n)]
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:  # torn or foreign file
            logger.warning("ignoring unreadable KV cache file %s: %s", path, exc)
            self._remove(path)
            return None
        if _tensor_digest([t for pair in layers for t in pair]) != meta["sha256"]:
            logger.warning("ignoring KV cache file %s: checksum mismatch", path)
            self._remove(path)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # recently used
        context.cache = new_cache(config, [(k.to(device), v.to(device)) for k, v in layers])
        return context

    def _header_ok(self, meta: Any, key: tuple[str, str]) -> bool:
        return (
            isinstance(meta, dict)
            and meta.get("format") == FORMAT
            and meta.get("namespace") == key[0]
            and meta.get("session_id") == key[1]
            and meta.get("fingerprints") == self.fingerprints
            and all(k in meta for k in ("version", "state", "indices", "digests", "head_tokens", "layers", "sha256"))
        )

    # ------------------------------------------------------------------------------------------------- housekeeping
    def delete(self, key: tuple[str, str]) -> None:
        self._remove(self.path(key))

    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.directory.glob(f"*{_SUFFIX}") if p.is_file())

    def _remove(self, path: Path) -> None:
        with contextlib.suppress(OSError):
            path.unlink()

    def _enforce_cap(self, keep: Path) -> None:
        with self._lock:
            files = []
            for p in self.directory.glob(f"*{_SUFFIX}"):
                with contextlib.suppress(OSError):
                    st = p.stat()
                    files.append((st.st_atime if st.st_atime > st.st_mtime else st.st_mtime, st.st_size, p))
            total = sum(size for _, size, _ in files)
            for _, size, p in sorted(files):
                if total <= self.max_bytes:
                    break
                if p == keep:
                    continue
                self._remove(p)
                total -= size
