"""Adapters that ship inside the package (trained for the embedded SmolLM2-135M-Instruct).

Layout: ``deltamem_agents/assets/adapters/<name>/{adapter_config.json, adapter_model.safetensors}``, in the
format of :func:`~deltamem_agents.adapter.io.save_adapter`. ``DEFAULT_ADAPTER`` names the one ``deltamem`` uses by
default; its training recipe is recorded in its ``adapter_config.json`` and in ``docs/results.md``.

A trained adapter ships only when it passes the gates of ``docs/results.md``: held-out recall above the no-memory
arm, and general ability kept (perplexity within 1 % of the plain model after unrelated writes). The first CPU
run (recipe ``smollm2-tsw``, 1.6k training questions) passed neither — recall at chance, perplexity ×17–130 once
anything was written — so this release ships none, and the engine falls back to a fresh adapter (base-slice
init: within 0.01 % of the plain model's perplexity) with a logged warning.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["ASSETS_DIR", "DEFAULT_ADAPTER", "shipped_adapter_dir", "shipped_adapters"]

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets" / "adapters"

#: The adapter used by default with the embedded model.
DEFAULT_ADAPTER = "smollm2-135m-instruct-tsw"


def shipped_adapters() -> list[str]:
    """Names of the adapters shipped in this installation."""
    if not ASSETS_DIR.is_dir():
        return []
    return sorted(p.name for p in ASSETS_DIR.iterdir() if (p / "adapter_model.safetensors").is_file())


def shipped_adapter_dir(name: str | None = None) -> Path | None:
    """Directory of a shipped adapter (default: :data:`DEFAULT_ADAPTER`), or ``None`` if it is not installed."""
    path = ASSETS_DIR / (name or DEFAULT_ADAPTER)
    return path if (path / "adapter_model.safetensors").is_file() else None
