"""`DeltaMemConfig`: the hyper-parameters of a δ-mem adapter, validated on construction."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

__all__ = [
    "BRANCHES",
    "INITS",
    "LAYER_PRESETS",
    "QUERY_INITS",
    "SSW_SEMANTICS",
    "STATE_UPDATE_MODES",
    "UPDATE_RULES",
    "WRITE_MODES",
    "DeltaMemConfig",
]

WRITE_MODES = ("tsw", "ssw", "msw")
BRANCHES = ("q", "o")
#: ``ov_svd`` (beyond the paper): ``W_v^m`` and ``W_o^Δ`` start as the top ``N·r`` singular directions of the
#: layer's own value→output map ``o_proj ∘ repeat_kv ∘ v_proj``, so a read decodes like attention to the stored tokens.
INITS = ("zero", "base_slice", "ov_svd")
#: ``coupled``: λ = 1 − β (the paper). Extensions beyond the paper: ``decoupled`` (λ from its own projection,
#: bias ``lambda_bias_init``) and ``delta`` (λ = 1: nothing decays, only the delta rule's erase overwrites).
UPDATE_RULES = ("coupled", "decoupled", "delta")
#: The authors' ``state_update_mode`` (declare-lab/delta-Mem): ``standard`` (the paper: the erase term has the write
#: gate β) or ``lambda_outside`` (the erase term is scaled by the retention too: ``S ← Diag(λ)(S − Diag(β) S k kᵀ) +
#: Diag(β) v kᵀ``). Their third mode, ``no_lambda`` (λ = 1), is ``update_rule="delta"``.
STATE_UPDATE_MODES = ("standard", "lambda_outside")
#: Sequence-state write semantics: ``ours`` (one write per message, whenever the message closes, across calls; the
#: tokens of a message read the state from before its write) or ``official`` (the authors' code: every token of a
#: forward call reads the state from the start of the call; each message id ≥ 0 present in the call is written
#: once, as the mean of its tokens in that call, at the end of the call, in ascending id order; id −1 is never
#: written; a call with no writable token — no ids given, or only −1 — writes every token as TSW does).
SSW_SEMANTICS = ("ours", "official")
#: Initialisation of the memory read projection W_q^m: ``random`` (the paper) or ``key`` (a copy of W_k^m, so a
#: read with the hidden state that was written finds it at once; beyond the paper).
QUERY_INITS = ("random", "key")
#: Named layer subsets, resolved against the model's depth when the adapter is attached (beyond the paper, whose
#: adapter wraps every layer): ``upper_half``, ``middle_half`` (the central 50 %), ``last_quarter``.
LAYER_PRESETS = ("upper_half", "middle_half", "last_quarter")


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
        target_layers: indices of the decoder layers to wrap, a preset name (``LAYER_PRESETS``), or ``None`` for
            every layer.
        branches: which attention branches receive the read-back correction, a subset of ``("q", "o")``.
        init: initialisation of the correction matrices ``W_q^Δ``/``W_o^Δ``: ``"zero"`` or ``"base_slice"``
            (first ``N·r`` input columns of the frozen projection, columns L2-normalised, times
            ``base_slice_scale``; gives the memory projections gradient from the first step), or ``"ov_svd"``
            (beyond the paper: ``W_v^m``/``W_o^Δ`` from the SVD of the layer's frozen ``o_proj ∘ v_proj``, the
            rank-``N·r`` version of ``wide_value``'s decode; ``W_q^Δ`` zero).
        base_slice_scale: scale of the ``base_slice`` initialisation.
        beta_bias_init: initial value of the write-gate bias ``b_β`` (−1.5 gives β ≈ 0.18).
        chunk_size: chunk length of the chunked scan used for prompts (prefill and training).
        update_rule: ``"coupled"`` (paper), ``"decoupled"`` or ``"delta"`` (see ``UPDATE_RULES``).
        lambda_bias_init: initial retention-gate bias of the decoupled rule (5.0 gives λ ≈ 0.993 per write, a
            half-life of ≈ 100 writes).
        query_init: ``"random"`` (paper) or ``"key"`` (see ``QUERY_INITS``).
        steer_writes: whether a call that writes the memory is also steered by it (True, the paper). False
            (beyond the paper): writing calls run the frozen base unchanged and only calls with writes off (the
            windowed and state-only engine modes' prompts) read the memory back — which lets training compute
            the write pass's hidden states once, without autograd. Online mode then gets no memory reads.
        wide_value: (beyond the paper) the memory stores the attention input itself as its value: ``S ∈ R^{d×r}``
            per sub-state, written with a scalar gate per token, and the read ``m = S q`` (width ``d``) is decoded
            by the layer's own frozen ``v_proj`` and ``o_proj`` (no bias) — as if attention had attended to the
            remembered tokens — times a learned per-layer gain, and added to the attention output. Replaces the
            two low-rank corrections (needs ``branches=("o",)``); TSW/MSW only. ``S = 0`` is exactly the base
            model whatever the gain.
        wide_gain_init: initial gain of the wide read (0: the untrained adapter is the base model even with a
            written state; the gain learns first, then keys and queries).
        state_update_mode: the authors' option (``STATE_UPDATE_MODES``): ``"standard"`` (the paper) or
            ``"lambda_outside"`` (the erase term is scaled by the retention λ too).
        normalize_qk: the authors' option: ``True`` (the paper) reads and writes with ``l2norm(tanh(·))`` of the
            query and key projections; ``False`` uses the raw projections.
        ssw_semantics: ``"ours"`` (default) or ``"official"`` (the authors' per-call semantics, see
            ``SSW_SEMANTICS``); only with ``write_mode="ssw"``.
    """

    rank: int = 8
    alpha: float = 16.0
    write_mode: str = "tsw"
    num_states: int | None = None
    target_layers: tuple[int, ...] | str | None = None
    branches: tuple[str, ...] = ("q", "o")
    init: str = "base_slice"
    base_slice_scale: float = 0.05
    beta_bias_init: float = -1.5
    chunk_size: int = 64
    update_rule: str = "coupled"
    lambda_bias_init: float = 5.0
    query_init: str = "random"
    steer_writes: bool = True
    wide_value: bool = False
    wide_gain_init: float = 0.0
    state_update_mode: str = "standard"
    normalize_qk: bool = True
    ssw_semantics: str = "ours"

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
        if isinstance(self.target_layers, str):
            if self.target_layers not in LAYER_PRESETS:
                raise ValueError(f"target_layers preset must be one of {LAYER_PRESETS}, got {self.target_layers!r}")
        elif self.target_layers is not None:
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
        if self.update_rule not in UPDATE_RULES:
            raise ValueError(f"update_rule must be one of {UPDATE_RULES}, got {self.update_rule!r}")
        if self.state_update_mode not in STATE_UPDATE_MODES:
            hint = " (the authors' 'no_lambda' is update_rule='delta')" if self.state_update_mode == "no_lambda" else ""
            raise ValueError(f"state_update_mode must be one of {STATE_UPDATE_MODES}, got {self.state_update_mode!r}{hint}")
        if not isinstance(self.normalize_qk, bool):
            raise ValueError(f"normalize_qk must be a bool, got {self.normalize_qk!r}")
        if self.ssw_semantics not in SSW_SEMANTICS:
            raise ValueError(f"ssw_semantics must be one of {SSW_SEMANTICS}, got {self.ssw_semantics!r}")
        if self.ssw_semantics != "ours" and self.write_mode != "ssw":
            raise ValueError(f"ssw_semantics applies to write_mode 'ssw' only (write_mode is {self.write_mode!r})")
        if self.update_rule == "decoupled" and self.keeps_open_message:
            # our SSW keeps the open message's projection sums in the state; a λ projection would need its own
            raise ValueError("update_rule 'decoupled' is not supported with write_mode 'ssw' and ssw_semantics "
                             "'ours'; use 'delta' or 'coupled' (or ssw_semantics='official')")
        if isinstance(self.lambda_bias_init, bool) or not isinstance(self.lambda_bias_init, int | float):
            raise ValueError(f"lambda_bias_init must be a number, got {self.lambda_bias_init!r}")
        if not isinstance(self.wide_value, bool):
            raise ValueError(f"wide_value must be a bool, got {self.wide_value!r}")
        if self.wide_value:
            if self.write_mode == "ssw":
                raise ValueError("wide_value supports write_mode 'tsw' and 'msw', not 'ssw'")
            if self.branches != ("o",):
                raise ValueError("wide_value reads into the attention output only: set branches=('o',)")
            if self.state_update_mode != "standard":
                raise ValueError("wide_value supports state_update_mode 'standard' only")
        if isinstance(self.wide_gain_init, bool) or not isinstance(self.wide_gain_init, int | float):
            raise ValueError(f"wide_gain_init must be a number, got {self.wide_gain_init!r}")
        if not isinstance(self.steer_writes, bool):
            raise ValueError(f"steer_writes must be a bool, got {self.steer_writes!r}")
        if self.query_init not in QUERY_INITS:
            raise ValueError(f"query_init must be one of {QUERY_INITS}, got {self.query_init!r}")

    def resolve_layers(self, num_layers: int) -> tuple[int, ...]:
        """The decoder-layer indices this adapter wraps in a model of ``num_layers`` layers."""
        t = self.target_layers
        if t is None:
            return tuple(range(num_layers))
        if isinstance(t, str):
            start, stop = {"upper_half": (num_layers // 2, num_layers),
                           "middle_half": (num_layers // 4, num_layers - num_layers // 4),
                           "last_quarter": (num_layers - max(1, num_layers // 4), num_layers)}[t]
            return tuple(range(start, stop))
        if max(t) >= num_layers:
            raise ValueError(f"target_layers {t} out of range: the model has {num_layers} layers")
        return tuple(t)

    @property
    def keeps_open_message(self) -> bool:
        """Whether the state carries the open message's running sums (our SSW semantics)."""
        return self.write_mode == "ssw" and self.ssw_semantics == "ours"

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
        t = self.target_layers
        d["target_layers"] = t if t is None or isinstance(t, str) else list(t)
        d["branches"] = list(self.branches)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeltaMemConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown DeltaMemConfig keys: {unknown}")
        data = dict(data)
        if data.get("target_layers") is not None and not isinstance(data["target_layers"], str):
            data["target_layers"] = tuple(data["target_layers"])
        if "branches" in data:
            data["branches"] = tuple(data["branches"])
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json_file(cls, path: str | Path) -> DeltaMemConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))
