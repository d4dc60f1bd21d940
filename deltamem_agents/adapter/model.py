"""`DeltaMemModel`: a frozen Hugging Face causal LM with δ-mem attached through hooks.

No model code is copied. For every wrapped decoder layer we register:

* a forward hook on ``q_proj`` that receives the attention input ``x`` (after the input norm), reads the memory,
  writes it, and returns ``q_proj(x) + (α/r)·W_q^Δ r`` — so the correction lands before any ``q_norm`` and RoPE;
* a forward hook on ``o_proj`` that adds ``(α/r)·W_o^Δ r`` to the attention output.

A forward pre-hook on the causal LM itself reads the attention mask of each call (padding leaves the state
untouched) and plans sequence-state writes once per call. This works unchanged under ``generate()`` with a KV
cache: the prefill call writes the prompt, every decode call writes its one new token.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..ops import cpu_fused
from .architectures import ArchitectureSpec, resolve_architecture
from .config import DeltaMemConfig
from .interception import Interception, intercept_output
from .layer import DeltaMemLayer
from .segments import MessageWritePlan, SegmentPlan, plan_message_writes, plan_segments
from .state import DeltaMemState


@dataclass
class _CallContext:
    """What the pre-hook learned about the current forward call (read by the projection hooks)."""

    write_mask: Tensor | None = None
    plan: SegmentPlan | None = None
    message_plan: MessageWritePlan | None = None  # SSW, the authors' semantics
    reads: list[Tensor | None] = field(default_factory=list)
    o_weights: list[Tensor | None] = field(default_factory=list)  # fast path: transposed W_o^Δ per slot
    fast: bool = False  # this call uses the compiled inference kernel


class DeltaMemModel(nn.Module):
    """A causal LM with δ-mem. Call it (or ``generate``) like the wrapped model.

    The memory state lives on this object (``.state``) and advances with every forward call; sessions swap it
    with :meth:`set_state` / :meth:`get_state`. Only the δ-mem weights are trainable.
    """

    def __init__(self, model: nn.Module, config: DeltaMemConfig) -> None:
        super().__init__()
        spec, decoder_layers = resolve_architecture(model)
        self.base_model = model
        self.config = config
        self.spec: ArchitectureSpec = spec
        self.layer_indices: tuple[int, ...] = config.resolve_layers(len(decoder_layers))
        for p in model.parameters():
            p.requires_grad_(False)

        self.delta_layers = nn.ModuleDict()
        self._wide: list[tuple[Tensor, Tensor, int]] = []
        self._handles: list[torch.utils.hooks.RemovableHandle | Interception] = []
        self._targets: list[tuple[int, DeltaMemLayer, nn.Linear, nn.Linear]] = []
        for slot, idx in enumerate(self.layer_indices):
            attn = getattr(decoder_layers[idx], spec.attention)
            q_proj: nn.Linear = getattr(attn, spec.q_proj)
            o_proj: nn.Linear = getattr(attn, spec.o_proj)
            layer = DeltaMemLayer(q_proj.in_features, q_proj.out_features, o_proj.out_features, config)
            layer.to(device=q_proj.weight.device, dtype=q_proj.weight.dtype)
            v_proj = getattr(attn, spec.v_proj, None)
            head_dim = getattr(attn, "head_dim", None)  # HF attention modules carry it (only wide/ov_svd use it)
            layer.reset_parameters(q_proj.weight, o_proj.weight, None if v_proj is None else v_proj.weight,
                                   None if head_dim is None else int(head_dim))
            self.delta_layers[str(idx)] = layer
            self._targets.append((slot, layer, q_proj, o_proj))
            if config.wide_value:  # the frozen projections that decode a wide read (references, not copies)
                if v_proj is None or head_dim is None:
                    raise ValueError(f"wide_value needs {spec.v_proj!r} and head_dim on the attention of layer {idx}")
                self._wide.append((v_proj.weight, o_proj.weight, int(head_dim)))
        self._install_hooks()

        self._state: DeltaMemState | None = None
        self._enabled = True
        self._writes = True
        self._segment_ids: Tensor | None = None
        self._ctx = _CallContext(reads=[None] * len(self.layer_indices), o_weights=[None] * len(self.layer_indices))

    # -- hooks --------------------------------------------------------------------------------------------------
    def _pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self._enabled:
            return None
        tokens = kwargs.get("input_ids")
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        if tokens is None and args:
            tokens = args[0]
        if tokens is None:
            raise ValueError("δ-mem needs input_ids or inputs_embeds to find the batch and length of a call")
        B, T = tokens.shape[:2]
        mask = kwargs.get("attention_mask")
        write_mask = None
        if isinstance(mask, Tensor) and mask.dim() == 2:
            m = mask[:, -T:].to(torch.bool)  # under generate() the mask covers the cache too
            if not bool(m.all()):
                write_mask = m
        state = self._state
        if state is None:
            state = self._state = self.new_state(B)
        elif state.batch_size != B:
            raise ValueError(
                f"the δ-mem state has batch size {state.batch_size} but this call has {B} rows; "
                "set a state of the right batch size with set_state() or reset_state(batch_size)"
            )
        self._ctx.write_mask = write_mask
        self._ctx.plan = None
        self._ctx.message_plan = None
        self._ctx.fast = (
            self._writes and self.config.write_mode != "ssw" and self._fast_path_possible(state)
        )
        if self._ctx.fast:
            self._drop_stale_fast_weights()
        segment_ids, self._segment_ids = self._segment_ids, None
        if self.config.write_mode == "ssw" and self._writes:
            if segment_ids is not None and tuple(segment_ids.shape) != (B, T):
                raise ValueError(f"segment_ids must have shape {(B, T)}, got {tuple(segment_ids.shape)}")
            if not self.config.keeps_open_message:  # the authors' semantics: None → token writes, as theirs
                if segment_ids is not None:
                    mask_dev = None if write_mask is None else write_mask.to(state.device)
                    self._ctx.message_plan = plan_message_writes(segment_ids.to(state.device), mask_dev)
                return None
            if write_mask is None:
                write_mask = torch.ones(B, T, dtype=torch.bool, device=state.device)
            plan = plan_segments(segment_ids, write_mask.to(state.device), state.last_segment, state.pending_count)
            self._ctx.plan = plan
            state.pending_count = plan.counts.gather(1, plan.last_slot[:, None])[:, 0]
            state.last_segment = plan.last_segment
        return None

    def _drop_stale_fast_weights(self) -> None:
        """Once per forward call: if any adapter parameter changed in place since the fast path's weight copies
        were made (an optimiser step, ``load_state_dict``), drop every layer's copies so they are rebuilt."""
        params = self.__dict__.get("_adapter_params")
        if params is None:
            params = self.__dict__["_adapter_params"] = [p for layer in self.delta_layers.values()
                                                          for p in layer.parameters()]
        key = tuple(p._version for p in params)
        if key != self.__dict__.get("_fast_weights_key"):
            for layer in self.delta_layers.values():
                layer.__dict__.pop("_fast_cache", None)
            self.__dict__["_fast_weights_key"] = key

    def _fast_path_possible(self, state: DeltaMemState) -> bool:
        """Whether this call may use the compiled inference kernel: float32 CPU model and state, and no gradient
        wanted (the kernel has no autograd). Checked once per forward call, not per layer."""
        if not cpu_fused.AVAILABLE:
            return False
        first = self._targets[0][1] if self._targets else None
        cfg = self.config
        if first is None or first.kernel_rule is None or not cfg.steer_writes:
            return False  # the compiled kernels cover the paper's rule and the authors' options without weights
        if torch.is_grad_enabled() and first.in_proj.requires_grad:
            return False
        weight = self._targets[0][2].weight
        return (weight.device.type == "cpu" and weight.dtype == torch.float32 and state.device.type == "cpu"
                and state.memory[0].dtype == torch.float32)

    def _make_q_hook(self, slot: int, layer: DeltaMemLayer):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
            if not self._enabled:
                return None
            x = args[0]
            state = self._state
            memory = state.memory[slot]
            if memory.device != x.device:
                memory = memory.to(x.device)
            if self._ctx.fast:
                # inference fast path (decided once per call by the pre-hook): one compiled read+write call and
                # in-place steering; this runs 30× per decoded token, so every line here is measured
                weights = layer.cached_inference_weights()
                if x.shape[1] == 1 and x.is_contiguous() and output.is_contiguous():
                    reads, state.memory[slot] = layer.fast_decode_write_steer_(
                        x, memory, self._ctx.write_mask, output, weights
                    )
                    self._ctx.reads[slot] = reads
                    self._ctx.o_weights[slot] = weights[3]
                    return None
                reads, state.memory[slot] = layer.fast_token_write(x, memory, self._ctx.write_mask, weights)
                self._ctx.reads[slot] = reads
                self._ctx.o_weights[slot] = weights[3]
                if weights[2] is None or layer.steer_(output, reads, weights[2]):
                    return None
                return layer.correct(output, reads.view(*x.shape[:2], -1), layer.delta_q)
            if not self._writes:
                reads = layer.read_only(x, memory)
            elif self._ctx.message_plan is not None:
                reads, state.memory[slot] = layer.message_write(x, memory, self._ctx.message_plan)
            elif self._ctx.plan is not None:
                reads, state.memory[slot], state.pending_sum[slot] = layer.sequence_write(
                    x, memory, state.pending_sum[slot].to(x.device), self._ctx.plan
                )
            else:
                mask = self._ctx.write_mask
                reads, state.memory[slot] = layer.token_write(x, memory, None if mask is None else mask.to(x.device))
            if self._writes and not self.config.steer_writes:
                return None  # write only: the base runs unchanged (the fast path is never on for such adapters)
            reads = reads.to(output.dtype)
            self._ctx.reads[slot] = reads
            return layer.correct(output, reads, layer.delta_q) if layer.delta_q is not None else None

        return hook

    def _make_o_hook(self, slot: int, layer: DeltaMemLayer):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
            reads = self._ctx.reads[slot]
            if reads is None:
                return None
            self._ctx.reads[slot] = None
            if reads.dim() == 2:  # from the fast path: flattened (B·T, N·r)
                weight_t = self._ctx.o_weights[slot]
                if weight_t is None or layer.steer_(output, reads, weight_t):
                    return None
                reads = reads.view(*output.shape[:2], -1)
            if layer.wide:
                return layer.wide_output(output, reads, *self._wide[slot])
            if layer.delta_o is None:
                return None
            return layer.correct(output, reads, layer.delta_o)

        return hook

    # -- calling ------------------------------------------------------------------------------------------------
    def forward(self, *args, segment_ids: Tensor | None = None, **kwargs):
        """Run the wrapped model. ``segment_ids (B, T)`` (SSW only) gives each token's message id."""
        self._segment_ids = segment_ids
        try:
            return self.base_model(*args, **kwargs)
        finally:
            self._segment_ids = None

    @torch.no_grad()
    def generate(self, *args, segment_ids: Tensor | None = None, **kwargs):
        """``generate()`` of the wrapped model; the prompt (and each generated token but the last) is written.

        The last generated token is never fed back through the model, so it is not in the state: run it through
        the model (or write the finished message) when it must be remembered.
        """
        self._segment_ids = segment_ids
        try:
            return self.base_model.generate(*args, **kwargs)
        finally:
            self._segment_ids = None

    # -- state --------------------------------------------------------------------------------------------------
    @property
    def value_width(self) -> int:
        """Rows of each sub-state: ``r`` (paper) or the hidden size (``wide_value``)."""
        first = next(iter(self.delta_layers.values()))
        return first.hidden_size if first.wide else self.config.rank

    @property
    def state_dtype(self) -> torch.dtype:
        """Dtype of a new state, and so of the memory arithmetic: float32 whatever the model dtype (long
        conversations do not drift in bf16), float64 for a float64 model (a state of another dtype installed
        with :meth:`set_state` is kept, and the arithmetic follows it)."""
        dtype = next(iter(self.delta_layers.values())).in_proj.dtype
        return torch.float64 if dtype == torch.float64 else torch.float32

    def new_state(self, batch_size: int = 1, dtype: torch.dtype | None = None) -> DeltaMemState:
        """A fresh (all-zero) state for ``batch_size`` sequences, on the model's device, of ``dtype``
        (default :attr:`state_dtype`)."""
        device = next(iter(self.delta_layers.values())).in_proj.device
        return DeltaMemState.zeros(
            len(self.layer_indices),
            batch_size,
            self.config.num_states,
            self.config.rank,
            value_width=self.value_width,
            sequence_write=self.config.keeps_open_message,
            device=device if device.type != "meta" else "cpu",
            dtype=dtype or self.state_dtype,
        )

    @property
    def state(self) -> DeltaMemState | None:
        """The live state (advanced in place by forward calls; carries autograd history in training)."""
        return self._state

    def reset_state(self, batch_size: int = 1) -> None:
        self._state = self.new_state(batch_size)

    def get_state(self, rows: int | Sequence[int] | None = None) -> DeltaMemState:
        """A detached copy of the state (of some rows)."""
        if self._state is None:
            raise ValueError("no state yet: call reset_state() or run the model first")
        state = self._state.detach()
        return state if rows is None else state.select(rows)

    def set_state(self, state: DeltaMemState, rows: int | Sequence[int] | None = None) -> None:
        """Install ``state`` (whole batch), or replace only ``rows`` of the current state with it."""
        self.check_state(state)
        state = state.to(self._state.device if self._state is not None else self.new_state(1).device)
        if rows is None:
            self._state = state
        else:
            if self._state is None:
                raise ValueError("no state to set rows of: set a whole state first")
            self._state = self._state.with_rows(rows, state)

    def check_state(self, state: DeltaMemState) -> None:
        """Raise ``ValueError`` unless ``state`` fits this adapter (layers, sub-state shape, write mode) and is
        finite."""
        cfg = self.config
        expect = (cfg.num_states, self.value_width, cfg.rank)
        if state.num_layers != len(self.layer_indices):
            raise ValueError(f"state has {state.num_layers} layers, the adapter wraps {len(self.layer_indices)}")
        if tuple(state.memory[0].shape[1:]) != expect:
            raise ValueError(f"state sub-states have shape {tuple(state.memory[0].shape[1:])}, expected {expect}")
        if state.sequence_write != cfg.keeps_open_message:
            raise ValueError(f"state layout does not match write mode {cfg.write_mode!r} "
                             f"(ssw_semantics {cfg.ssw_semantics!r})")
        if not state.is_finite():
            raise ValueError("state contains NaN or Inf")

    @contextlib.contextmanager
    def memory_disabled(self) -> Iterator[None]:
        """Neither read nor write: the model is exactly the base model inside this block."""
        prev, self._enabled = self._enabled, False
        try:
            yield
        finally:
            self._enabled = prev

    @contextlib.contextmanager
    def writes_disabled(self) -> Iterator[None]:
        """Every token reads the current state and nothing is written (the read pass of training)."""
        prev, self._writes = self._writes, False
        try:
            yield
        finally:
            self._writes = prev

    # -- parameters ---------------------------------------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, Tensor]:
        """The δ-mem tensors only, named ``layers.{i}.{in_proj,beta_bias,delta_q,delta_o}``."""
        return {f"layers.{k}": v for k, v in self.delta_layers.state_dict().items()}

    def load_adapter_state_dict(self, tensors: dict[str, Tensor]) -> None:
        expected = self.adapter_state_dict()
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise ValueError(f"adapter tensors do not match this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for name, t in tensors.items():
            if tuple(t.shape) != tuple(expected[name].shape):
                raise ValueError(f"adapter tensor {name} has shape {tuple(t.shape)}, expected {tuple(expected[name].shape)}")
        self.delta_layers.load_state_dict({k[len("layers.") :]: v for k, v in tensors.items()})
        self.__dict__.pop("_adapter_params", None)  # parameter objects may have changed: recollect them
        self.__dict__.pop("_fast_weights_key", None)
        for layer in self.delta_layers.values():
            layer.__dict__.pop("_fast_cache", None)

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def _install_hooks(self) -> None:
        if self._handles:
            return
        for slot, layer, q_proj, o_proj in self._targets:
            self._handles.append(intercept_output(q_proj, self._make_q_hook(slot, layer)))
            self._handles.append(intercept_output(o_proj, self._make_o_hook(slot, layer)))
        self._handles.append(self.base_model.register_forward_pre_hook(self._pre_forward, with_kwargs=True))

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @contextlib.contextmanager
    def hooks_removed(self) -> Iterator[nn.Module]:
        """The untouched base model, hooks and all removed, for this block (benchmarks compare against it)."""
        self._remove_hooks()
        try:
            yield self.base_model
        finally:
            self._install_hooks()

    def detach_adapter(self) -> nn.Module:
        """Remove every hook for good and return the untouched base model."""
        self._remove_hooks()
        self._targets.clear()
        return self.base_model

def attach(model: nn.Module, config: DeltaMemConfig | None = None) -> DeltaMemModel:
    """Attach δ-mem to a Hugging Face causal LM: freeze it, hook its attention, return the wrapper."""
    return DeltaMemModel(model, config or DeltaMemConfig())
