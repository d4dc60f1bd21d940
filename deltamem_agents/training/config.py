"""`TrainConfig`: every knob of a training run, validated on construction and saved with each checkpoint."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..adapter.config import DeltaMemConfig

__all__ = ["DEFAULT_SYSTEM_PROMPT", "VARIANTS", "TrainConfig"]

VARIANTS = ("offline", "online")
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant. Answer with the value only."


@dataclass
class TrainConfig:
    """A training run.

    Model and adapter:
        model: ``"embedded"`` (the packaged SmolLM2-135M-Instruct) or a path / hub id for ``load_base_model``.
        adapter: keyword arguments of :class:`~deltamem_agents.adapter.DeltaMemConfig` (``write_mode``, ``rank``,
            ``beta_bias_init``, ...).
        init_adapter: optional adapter directory to start from instead of a fresh initialisation.

    Objective:
        variant: ``"offline"`` (the paper: a write pass over the context, then read passes over system + question
            + answer with writes off, gradients through the scan) or ``"online"`` (context and question in one
            sequence, writes on throughout).
        reads_in_write_pass: offline only; whether the memory also steers attention during the write pass (the
            paper trains with reads on). Off, the write pass sees the base model's hidden states.
        beta_reg_weight, beta_target: the regulariser ``w·(mean β − target)²`` (0.01 and 0.05 in the paper).
        system_prompt: system message of the read pass (and of the online sequence).
        max_context_tokens: write passes are truncated to their last this-many tokens.

    Data:
        task: ``"synthetic"`` (generated on the fly, open vocabulary, train split only) or a file task of
            :func:`~deltamem_agents.training.data.load_task` read from ``data_path``.
        questions_per_context: read passes that share one written context (offline; a group's questions).
        curriculum: stage end fractions for the synthetic curriculum (``()`` = always the hardest level).

    Optimisation:
        steps: optimizer steps. batch_size: written contexts per micro-batch. grad_accum: micro-batches per step.
        lr, weight_decay, warmup_frac (cosine schedule after a linear warm-up), max_grad_norm, seed.

    Bookkeeping:
        save_every: checkpoint every N steps (and at the end). log_every: JSONL log period (steps).
        num_threads: ``torch.set_num_threads`` (0 leaves it alone). recipe: the recipe name, recorded.
        time_budget_s: stop early (checkpoint + final adapter) once this much training time has passed; the
            schedule is still the one of ``steps``, so an early stop ends before the cosine reaches zero.
    """

    recipe: str = "custom"
    model: str = "embedded"
    adapter: dict[str, Any] | None = None
    init_adapter: str | None = None

    variant: str = "offline"
    reads_in_write_pass: bool = True
    beta_reg_weight: float = 0.01
    beta_target: float = 0.05
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    max_context_tokens: int = 8192

    task: str = "synthetic"
    data_path: str | None = None
    questions_per_context: int = 4
    curriculum: tuple[float, ...] = (0.1, 0.3, 0.55, 1.0)

    steps: int = 100
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_frac: float = 0.1
    max_grad_norm: float = 1.0
    seed: int = 0

    save_every: int = 50
    log_every: int = 1
    num_threads: int = 0
    time_budget_s: float | None = None

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        self.adapter = dict(self.adapter or {})
        self.adapter_config()  # validates the adapter keyword arguments
        for name in ("steps", "batch_size", "grad_accum", "questions_per_context", "max_context_tokens",
                     "save_every", "log_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if isinstance(self.num_threads, bool) or not isinstance(self.num_threads, int) or self.num_threads < 0:
            raise ValueError(f"num_threads must be >= 0, got {self.num_threads!r}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ValueError(f"time_budget_s must be positive, got {self.time_budget_s!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if self.weight_decay < 0 or self.beta_reg_weight < 0 or self.max_grad_norm <= 0:
            raise ValueError("weight_decay and beta_reg_weight must be >= 0, max_grad_norm > 0")
        if not 0 <= self.warmup_frac < 1:
            raise ValueError(f"warmup_frac must be in [0, 1), got {self.warmup_frac!r}")
        if not 0 < self.beta_target < 1:
            raise ValueError(f"beta_target must be in (0, 1), got {self.beta_target!r}")
        self.curriculum = tuple(float(c) for c in self.curriculum)
        if self.curriculum and (
            any(b <= a for a, b in zip(self.curriculum, self.curriculum[1:], strict=False))
            or self.curriculum[-1] != 1.0 or self.curriculum[0] <= 0
        ):
            raise ValueError(f"curriculum must be increasing fractions ending at 1.0, got {self.curriculum!r}")
        from .data import TASKS

        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; known: {sorted(TASKS)}")

    def adapter_config(self) -> DeltaMemConfig:
        return DeltaMemConfig.from_dict(self.adapter or {})

    @property
    def contexts_per_step(self) -> int:
        return self.batch_size * self.grad_accum

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["curriculum"] = list(self.curriculum)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig keys: {unknown}")
        data = dict(data)
        if "curriculum" in data:
            data["curriculum"] = tuple(data["curriculum"])
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json_file(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))
