"""`DeltaMemConfig`: the hyper-parameters of a δ-mem adapter, validated on construction."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

WRITE_MODES = ("tsw", "ssw", "msw")
BRANCHES = ("q", "o")
INITS = ("zero", "base_slice")


@dataclass
class DeltaMemConfig:
    """Configuration of a δ-mem adapter (design brief §1).

    Attributes:
        rank: side ``r`` of each square memory sub-state ``S ∈ R^{r×r}`` (8 in the paper).
        alpha: correction scale numerator; corrections are multiplied by ``alpha / rank``.
        write_mode: ``"tsw"`` (token-state write), ``"ssw"`` (sequence-state write: one write per message,
            of the mean of its hidden states) or ``"msw"`` (multi-state write: ``num_states`` independent
            sub-states, token writes, reads concatenated).
        num_states: number of sub-states ``N``; derived from ``write_mode`` when left as ``None``
            (1 for TSW/SSW, 4 for MSW).
        target_layers: indices of the decoder layers to wrap; ``None`` wraps every layer.
        branches: which attention branches receive the read-back correction, a subset of ``("q", "o")``.
        init: initialisation of the correction matrices ``W_q^Δ``/``W_o^Δ``: ``"zero"`` or ``"base_slice"``
            (first ``N·r`` input columns of the frozen projection, columns L2-normalised, times
            ``base_slice_scale``; gives the memory projections gradient from the first step).
        base_slice_scale: scale of the ``base_slice`` initialisation.
        beta_bias_init: initial value of the write-gate bias ``b_β`` (−1.5 gives β ≈ 0.18).
        chunk_size: chunk length of the chunked scan used for prompts (prefill and training).
    """

    rank: int = 8
    alpha: float = 16.0
    write_mode: str = "tsw"
    num_states: int | None = None
    target_layers: tuple[int, ...] | None = None
    branches: tuple[str, ...] = ("q", "o")
    init: str = "base_slice"
    base_slice_scale: float = 0.05
    beta_bias_init: float = -1.5
    chunk_size: int = 64

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be a positive integer, got {self.rank!r}")
        if not isinstance(self.alpha, int | float) or not self.alpha > 0:
            raise ValueError(f"alpha must be a positive number, got {self.alpha!r}")
        self.alpha = float(self.alpha)
        if self.write_mode not in WRITE_MODES:
            raise ValueError(f"write_mode must be one of {WRITE_MODES}, got {self.write_mode!r}")
        if self.num_states is None:
            self.num_states = 4 if self.write_mode == "msw" else 1
        if isinstance(self.num_states, bool) or not isinstance(self.num_states, int) or self.num_states < 1:
            raise ValueError(f"num_states must be a positive integer, got {self.num_states!r}")
        if self.write_mode == "msw" and self.num_states < 2:
            raise ValueError("write_mode 'msw' needs num_states >= 2 (the paper uses 4)")
        if self.write_mode != "msw" and self.num_states != 1:
            raise ValueError(f"write_mode {self.write_mode!r} keeps one state; use 'msw' for num_states > 1")
        if self.target_layers is not None:
            layers = tuple(self.target_layers)
            if not layers or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers):
                raise ValueError(f"target_layers must be non-negative layer indices, got {self.target_layers!r}")
            if len(set(layers)) != len(layers):
                raise ValueError(f"target_layers has duplicates: {self.target_layers!r}")
            self.target_layers = tuple(sorted(layers))
        branches = tuple(self.branches)
        if not branches or any(b not in BRANCHES for b in branches) or len(set(branches)) != len(branches):
            raise ValueError(f"branches must be a non-empty subset of {BRANCHES}, got {self.branches!r}")
        self.branches = tuple(b for b in BRANCHES if b in branches)
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if not isinstance(self.base_slice_scale, int | float) or self.base_slice_scale < 0:
            raise ValueError(f"base_slice_scale must be >= 0, got {self.base_slice_scale!r}")
        if not isinstance(self.beta_bias_init, int | float):
            raise ValueError(f"beta_bias_init must be a number, got {self.beta_bias_init!r}")
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {self.chunk_size!r}")

    @property
    def state_width(self) -> int:
        """Width ``N·r`` of the concatenated memory read."""
        return self.num_states * self.rank

    @property
    def scale(self) -> float:
        """The correction scale ``alpha / rank``."""
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_layers"] = list(self.target_layers) if self.target_layers is not None else None
        d["branches"] = list(self.branches)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeltaMemConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown DeltaMemConfig keys: {unknown}")
        data = dict(data)
        if data.get("target_layers") is not None:
            data["target_layers"] = tuple(data["target_layers"])
        if "branches" in data:
            data["branches"] = tuple(data["branches"])
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json_file(cls, path: str | Path) -> DeltaMemConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))
