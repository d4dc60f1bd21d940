"""Generation options of a framework call: the engine's defaults are the one source of truth.

A framework object leaves a generation option ``None`` unless its user set it; a call then passes only the
options that were set, and the engine fills in the rest from its own defaults (``MemoryEngine(max_new_tokens=…,
sampling=…)``, by default :data:`~deltamem_agents.engine.engine.DEFAULT_SAMPLING` and 512 new tokens). What a
framework reports before running (LangSmith parameters, LlamaIndex ``num_output``) comes from
:meth:`GenerationDefaults.of` — the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["GenerationDefaults", "generation_options"]


@dataclass(frozen=True)
class GenerationDefaults:
    """What an engine uses for an option a call leaves unset."""

    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int | None
    repetition_penalty: float

    @classmethod
    def of(cls, engine: Any = None) -> GenerationDefaults:
        """``engine``'s defaults; with no engine (not loaded yet), those a ``MemoryEngine`` is built with."""
        from ..engine.engine import DEFAULT_MAX_NEW_TOKENS, DEFAULT_SAMPLING

        sampling = getattr(engine, "sampling", None) or DEFAULT_SAMPLING
        return cls(
            max_new_tokens=int(getattr(engine, "max_new_tokens", DEFAULT_MAX_NEW_TOKENS)),
            temperature=float(sampling.temperature),
            top_p=float(sampling.top_p),
            top_k=sampling.top_k,
            repetition_penalty=float(sampling.repetition_penalty),
        )

    def effective(self, **explicit: Any) -> dict[str, Any]:
        """These defaults with the explicitly set (not ``None``) values of ``explicit`` on top."""
        values = {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p,
                  "top_k": self.top_k, "repetition_penalty": self.repetition_penalty}
        unknown = set(explicit) - set(values)
        if unknown:
            raise TypeError(f"unknown generation options {sorted(unknown)}")
        values.update({k: v for k, v in explicit.items() if v is not None})
        return values


def generation_options(
    *,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    stop: str | Sequence[str] | None = None,
) -> dict[str, Any]:
    """Keyword arguments for :meth:`~deltamem_agents.MemoryEngine.stream`: only the options that are set
    (``None`` leaves the engine's default). Values are not converted: the engine validates them and raises a
    clear error for a bad one (``temperature=nan``, ``max_new_tokens=-1``) before anything is written."""
    given = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k,
             "repetition_penalty": repetition_penalty, "seed": seed, "stop": stop}
    return {name: value for name, value in given.items() if value is not None}
