"""`DeltaMemModel`: a frozen Hugging Face causal LM with δ-mem attached through hooks.

No model code is copied. For every wrapped decoder layer we register:

* a forward hook on ``q_proj`` that hands the attention input ``x`` (after the input norm) to the layer
  (:meth:`DeltaMemLayer.attend_query`), which reads the memory, writes it, and returns ``q_proj(x) + (α/r)·W_q^Δ r``
  — so the correction lands before any ``q_norm`` and RoPE;
* a forward hook on ``o_proj`` that lets the layer add ``(α/r)·W_o^Δ r`` to the attention output.

The hooks do not know which kernel computes a layer's call: the layer decides, per call
(:mod:`.kernel_choice`).

A forward pre-hook on the causal LM itself reads the attention mask of each call (padding leaves the state
untouched) and plans sequence-state writes once per call. This works unchanged under ``generate()`` with a KV
cache: the prefill call writes the prompt, every decode call writes its one new token.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from .architectures import ArchitectureSpec, resolve_architecture
from .config import DeltaMemConfig
from .interception import Interception, intercept_output
from .kernel_choice import KernelChoice, check_kernel, kernel_from_env
from .layer import DeltaMemLayer, MemoryCall
from .segments import plan_message_writes, plan_segments
from .state import DeltaMemState

__all__ = ["DeltaMemModel", "attach"]


class DeltaMemModel(nn.Module):
    """A causal LM with δ-mem. Call it (or ``generate``) like the wrapped model.

    The memory state lives on this object (``.state``) and advances with every forward call; sessions swap it
    with :meth:`set_state` / :meth:`get_state`. Only the δ-mem weights are trainable; they are float32 whatever the
    base model's dtype (float64 for a float64 model; see :mod:`.layer`).
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

        kernels = KernelChoice(config, kernel_from_env())  # one for all layers (see KernelChoice)
        self.delta_layers = nn.ModuleDict()
        self._handles: list[torch.utils.hooks.RemovableHandle | Interception] = []
        self._targets: list[tuple[int, DeltaMemLayer, nn.Linear, nn.Linear]] = []
        for slot, idx in enumerate(self.layer_indices):
            attn = getattr(decoder_layers[idx], spec.attention)
            q_proj: nn.Linear = getattr(attn, spec.q_proj)
            o_proj: nn.Linear = getattr(attn, spec.o_proj)
            layer = DeltaMemLayer(q_proj.in_features, q_proj.out_features, o_proj.out_features, config,
                                  kernels=kernels)
            layer.to(device=q_proj.weight.device, dtype=_adapter_dtype(q_proj.weight.dtype))
            v_proj = getattr(attn, spec.v_proj, None)
            head_dim = getattr(attn, "head_dim", None)  # HF attention modules carry it (only wide/ov_svd use it)
            layer.reset_parameters(q_proj.weight, o_proj.weight, None if v_proj is None else v_proj.weight,
                                   None if head_dim is None else int(head_dim))
            self.delta_layers[str(idx)] = layer
            self._targets.append((slot, layer, q_proj, o_proj))
            if config.wide_value:  # the frozen projections that decode a wide read (references, not copies)
                if v_proj is None or head_dim is None:
                    raise ValueError(f"wide_value needs {spec.v_proj!r} and head_dim on the attention of layer {idx}")
                layer.set_wide_decoder(v_proj.weight, o_proj.weight, int(head_dim))
        self._install_hooks()

        self._state: DeltaMemState | None = None
        self._enabled = True
        self._writes = True
        self._segment_ids: Tensor | None = None
        self._call = MemoryCall()
        self._reads: list = [None] * len(self.layer_indices)  # q side → o side of each layer, within one call
        self._seal_token = object()  # marks the states this model handed out (see _seal)

    # -- hooks --------------------------------------------------------------------------------------------------
    def _pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Once per forward call: the batch, the write mask and (SSW) the write plan that every layer shares.
        No kernel choice here (each layer makes its own, :mod:`.kernel_choice`), and no host sync on a GPU."""
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
        state = self._state
        if state is None:
            state = self._state = self.new_state(B)
        elif state.batch_size != B:
            raise ValueError(
                f"the δ-mem state has batch size {state.batch_size} but this call has {B} rows; "
                "set a state of the right batch size with set_state() or reset_state(batch_size)"
            )
        mask = kwargs.get("attention_mask")
        write_mask = None
        if isinstance(mask, Tensor) and mask.dim() == 2:
            # Under generate() the mask covers the cache too. It is passed on as it is: testing it for "all ones"
            # first (to drop it) would read a device tensor on the host — a sync per call on a GPU — and every
            # kernel serves an all-True mask.
            write_mask = mask[:, -T:].to(device=state.device, dtype=torch.bool).contiguous()
        self._reads = [None] * len(self._reads)
        segment_ids, self._segment_ids = self._segment_ids, None
        if self.config.write_mode != "ssw" or not self._writes:
            self._call = MemoryCall(self._writes, write_mask)
            return None
        if segment_ids is not None and tuple(segment_ids.shape) != (B, T):
            raise ValueError(f"segment_ids must have shape {(B, T)}, got {tuple(segment_ids.shape)}")
        if not self.config.keeps_open_message:  # the authors' semantics: None → token writes, as theirs
            message_plan = None if segment_ids is None else plan_message_writes(segment_ids, write_mask,
                                                                                 device=state.device)
            self._call = MemoryCall(True, write_mask, message_plan=message_plan)
            return None
        if write_mask is None:
            write_mask = torch.ones(B, T, dtype=torch.bool, device=state.device)
        plan = plan_segments(segment_ids, write_mask, state.last_segment, state.pending_count)
        state.pending_count = plan.counts.gather(1, plan.last_slot[:, None])[:, 0]
        state.last_segment = plan.last_segment
        self._call = MemoryCall(True, write_mask, plan=plan)
        return None

    def _make_q_hook(self, slot: int, layer: DeltaMemLayer):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
            if not self._enabled:
                return None
            state = self._state
            pending = state.pending_sum
            new_out, self._reads[slot], state.memory[slot], new_pending = layer.attend_query(
                args[0], output, state.memory[slot], None if pending is None else pending[slot], self._call)
            if new_pending is not None:
                pending[slot] = new_pending
            return new_out

        return hook

    def _make_o_hook(self, slot: int, layer: DeltaMemLayer):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
            read = self._reads[slot]
            if read is None:
                return None
            self._reads[slot] = None
            return layer.attend_output(output, read)

        return hook

    # -- kernels ------------------------------------------------------------------------------------------------
    @property
    def kernel(self) -> str:
        """The kernel preference of every layer: ``auto`` (default, or ``DELTAMEM_KERNEL`` at attach time),
        ``torch``, ``numba`` or ``triton`` (see :mod:`.kernel_choice`). A forced kernel that cannot serve a call
        raises :class:`~deltamem_agents.adapter.kernel_choice.KernelUnavailableError`."""
        return next(iter(self.delta_layers.values())).kernels.preference

    @kernel.setter
    def kernel(self, value: str) -> None:
        check_kernel(value)
        for layer in self.delta_layers.values():
            layer.set_kernel(value)

    def kernel_calls(self) -> dict[str, int]:
        """How many layer calls each implementation served since the adapter was attached (summed over the
        layers): ``numba-decode``, ``numba-scan``, ``triton-decode``, ``triton-scan``, ``torch``, ``read``."""
        total: dict[str, int] = {}
        choices = {id(layer.kernels): layer.kernels for layer in self.delta_layers.values()}  # shared: count once
        for choice in choices.values():
            for name, n in choice.calls.items():
                total[name] = total.get(name, 0) + n
        return total

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
        return DeltaMemState.zeros(
            len(self.layer_indices),
            batch_size,
            self.config.num_states,
            self.config.rank,
            value_width=self.value_width,
            sequence_write=self.config.keeps_open_message,
            device=self._device(),
            dtype=dtype or self.state_dtype,
        )

    @property
    def state(self) -> DeltaMemState | None:
        """The live state (advanced in place by forward calls; carries autograd history in training)."""
        if self._state is not None:
            self._seal(self._state)
        return self._state

    def reset_state(self, batch_size: int = 1) -> None:
        self._state = self.new_state(batch_size)

    def get_state(self, rows: int | Sequence[int] | None = None) -> DeltaMemState:
        """A detached copy of the state (of some rows)."""
        if self._state is None:
            raise ValueError("no state yet: call reset_state() or run the model first")
        state = self._state.detach()
        return self._seal(state if rows is None else state.select(rows))

    def set_state(self, state: DeltaMemState, rows: int | Sequence[int] | None = None) -> None:
        """Install ``state`` (whole batch), or replace only ``rows`` of the current state with it.

        The state is checked (layout always; finite values unless this model handed it out unchanged — see
        :meth:`_seal` — since the finiteness check reads every tensor's values on the host: on a GPU that is a
        sync, once per decode step in the engine's loop). The installed state is a copy of the lists: the
        forward calls that follow never modify ``state`` itself."""
        self._check_layout(state)
        if not self._sealed_here(state) and not state.is_finite():
            raise ValueError("state contains NaN or Inf")
        state = state.to(self._device())
        if rows is None:
            self._state = state
        else:
            if self._state is None:
                raise ValueError("no state to set rows of: set a whole state first")
            self._state = self._state.with_rows(rows, state)

    def check_state(self, state: DeltaMemState) -> None:
        """Raise ``ValueError`` unless ``state`` fits this adapter (layers, sub-state shape, write mode) and is
        finite."""
        self._check_layout(state)
        if not state.is_finite():
            raise ValueError("state contains NaN or Inf")

    def _check_layout(self, state: DeltaMemState) -> None:
        cfg = self.config
        expect = (cfg.num_states, self.value_width, cfg.rank)
        if state.num_layers != len(self.layer_indices):
            raise ValueError(f"state has {state.num_layers} layers, the adapter wraps {len(self.layer_indices)}")
        if tuple(state.memory[0].shape[1:]) != expect:
            raise ValueError(f"state sub-states have shape {tuple(state.memory[0].shape[1:])}, expected {expect}")
        if state.sequence_write != cfg.keeps_open_message:
            raise ValueError(f"state layout does not match write mode {cfg.write_mode!r} "
                             f"(ssw_semantics {cfg.ssw_semantics!r})")

    def _seal(self, state: DeltaMemState) -> DeltaMemState:
        """Mark ``state`` as handed out by this model, with the identity and version counter of each of its
        tensors (:meth:`DeltaMemState.version_key`: metadata, no values read). Whoever replaces one of its tensors
        or changes one in place breaks the seal, and :meth:`set_state` checks it again (as it does states made under
        ``torch.inference_mode``, whose tensors keep no version counter). Why: the engine installs the state the
        model produced in the previous step before every decode step; re-checking it for NaN would be a host sync
        per step (per layer before this) on a GPU."""
        key = state.version_key()
        if key is not None:  # inference-mode tensors keep no versions: such states are always checked
            state.__dict__["_deltamem_seal"] = (self._seal_token, key)
        return state

    def _sealed_here(self, state: DeltaMemState) -> bool:
        seal = state.__dict__.get("_deltamem_seal")
        return seal is not None and seal[0] is self._seal_token and seal[1] == state.version_key()

    def _device(self) -> torch.device:
        device = next(iter(self.delta_layers.values())).in_proj.device
        return device if device.type != "meta" else torch.device("cpu")

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
        # copied into the float32 parameters (a bf16 file loads exactly); the layers' weight copies for inference
        # follow the parameters' version counters
        self.delta_layers.load_state_dict({k[len("layers.") :]: v for k, v in tensors.items()})

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

def _adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """The δ-mem parameters' dtype: float32 whatever the base dtype (float64 for a float64 base, as the paper's
    configuration computes on such models): the adapter is ~0.1 % of a 4B model's bytes, and AdamW on bf16 weights
    loses the small updates (bf16 keeps 8 significant bits). On a bf16 base the layer casts them per call."""
    return torch.float64 if base_dtype == torch.float64 else torch.float32


def attach(model: nn.Module, config: DeltaMemConfig | None = None) -> DeltaMemModel:
    """Attach δ-mem to a Hugging Face causal LM: freeze it, hook its attention, return the wrapper. The kernel
    preference is read from ``DELTAMEM_KERNEL`` (default ``auto``; :attr:`DeltaMemModel.kernel` changes it)."""
    return DeltaMemModel(model, config or DeltaMemConfig())
