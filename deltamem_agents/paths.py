"""Where deltamem keeps files on disk (no torch imports here: the store uses it too)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["ENV_CACHE_DIR", "cache_dir"]

ENV_CACHE_DIR = "DELTAMEM_CACHE_DIR"


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name, "").strip()
    return Path(value).expanduser() if value else None


def cache_dir() -> Path:
    """The deltamem cache root: ``$DELTAMEM_CACHE_DIR``, else ``$XDG_CACHE_HOME/deltamem``, else
    ``~/.cache/deltamem``. Not created here."""
    explicit = _env_path(ENV_CACHE_DIR)
    if explicit is not None:
        return explicit
    xdg = _env_path("XDG_CACHE_HOME")
    if xdg is not None:
        return xdg / "deltamem"
    return Path.home() / ".cache" / "deltamem"
