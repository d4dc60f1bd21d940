"""Which implementation runs a layer's memory computation: decided here, in one place, for every call.

A δ-mem layer's call reads (and usually writes) its memory; several implementations compute the same thing
(and what ``auto`` picks them for):

* ``numba-decode``: one compiled call — projection, activations, read, write, query steering (``T == 1``; CPU,
  float32, no gradient);
* ``numba-scan``: torch projection, then one compiled call — activations + scan (``T > 1``; CPU, float32, no
  gradient);
* ``triton-decode``: torch projection, then one fused Triton step (``T == 1``; CUDA, no gradient);
* ``triton-scan``: torch projection and activations, then the Triton chunked scan, differentiable (CUDA
  otherwise: prefill, training, SSW);
* ``torch``: ``delta_rule_step`` / ``delta_rule_chunked`` (shared-gate for wide values): everything else;
* ``read``: writes off, one einsum reads the fixed state (nothing to choose).

The choice depends on the call (device, dtypes, whether a gradient is needed, what it does with the memory: token
writes, sequence-state writes, reads only), the adapter's options (the compiled CPU kernel covers the paper's rule,
the pure delta rule and the authors' ``lambda_outside``, not ``decoupled``; neither compiled kernel serves wide
values) and the preference: ``auto`` (default), ``torch``, ``numba`` or ``triton``, from ``DELTAMEM_KERNEL`` when
the adapter is attached or :attr:`DeltaMemModel.kernel <deltamem_agents.adapter.model.DeltaMemModel.kernel>`
later. A forced kernel that cannot serve a call raises :class:`KernelUnavailableError` saying why (no silent
fallback); ``auto`` falls back to torch. ``auto`` never picks Triton on a CPU (its interpreter is for tests).

Every implementation is tested against the torch path and the per-token reference
(``tests/adapter/test_kernel_choice.py``, ``test_fast_path.py``, ``test_cpu_kernel.py``, ``test_triton_decode.py``).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections import Counter
from types import SimpleNamespace

import torch
from torch import Tensor

from ..errors import DeltaMemError
from . import _cpu_kernel
from .config import DeltaMemConfig

__all__ = [
    "ENV_VAR",
    "IMPLEMENTATIONS",
    "KERNELS",
    "KernelChoice",
    "KernelUnavailableError",
    "kernel_from_env",
    "triton_modules",
]

ENV_VAR = "DELTAMEM_KERNEL"
#: Kernel preferences: ``auto`` picks per call; the others force one family (torch serves every call).
KERNELS = ("auto", "torch", "numba", "triton")

# What a call does with the memory (planned by the model once per forward call).
READ, TOKENS, SEQUENCE, MESSAGES = "read", "tokens", "sequence", "messages"

NUMBA_DECODE, NUMBA_SCAN = "numba-decode", "numba-scan"
TRITON_DECODE, TRITON_SCAN = "triton-decode", "triton-scan"
TORCH, READ_ONLY = "torch", "read"
IMPLEMENTATIONS = (NUMBA_DECODE, NUMBA_SCAN, TRITON_DECODE, TRITON_SCAN, TORCH, READ_ONLY)

_F32 = torch.float32
_TRITON_MAX_RANK = 64  # ops.triton_scan.MAX_RANK, without importing triton to know it


class KernelUnavailableError(DeltaMemError, RuntimeError):
    """A forced kernel (``DELTAMEM_KERNEL`` or ``DeltaMemModel.kernel``) cannot serve this call; the message says
    why. ``auto`` never raises it."""


def kernel_from_env() -> str:
    """The kernel preference in ``DELTAMEM_KERNEL`` (``auto`` when unset).

    Raises:
        ValueError: an unknown value.
    """
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    return check_kernel(value, f"{ENV_VAR}")


def check_kernel(value: object, where: str = "kernel") -> str:
    if value not in KERNELS:
        raise ValueError(f"{where} must be one of {KERNELS}, got {value!r}")
    return value


@functools.cache
def _triton_installed() -> bool:
    """Whether triton can be imported, without importing it (importing triton is slow and needs
    ``TRITON_INTERPRET`` settled first; only a call that may run it imports it)."""
    return importlib.util.find_spec("triton") is not None


@functools.cache
def triton_modules() -> SimpleNamespace:
    """The Triton code, imported on first use (once; the decode hot path asks for it every call): ``support``
    (:mod:`deltamem_agents.ops.triton_support`), ``scan`` (:mod:`deltamem_agents.ops.triton_scan`) and ``decode``
    (the layer's private fused step, ``adapter/_triton_decode.py``)."""
    from ..ops import triton_scan, triton_support
    from . import _triton_decode

    return SimpleNamespace(support=triton_support, scan=triton_scan, decode=_triton_decode)


class KernelChoice:
    """The kernel decision of the :class:`~deltamem_agents.adapter.layer.DeltaMemLayer` s of one adapter (they share
    one: the same options and preference; a layer made on its own gets its own).

    The parts that depend only on the adapter's options are settled once here; :meth:`choose` adds what depends on
    the call. It reads metadata only (devices, dtypes, ``requires_grad``), never a tensor's values: no host sync.
    Why shared: on a CPU every Python line of the decode step runs cold (the MLP's weights have just streamed
    through the caches); one object for all layers stays warm where thirty would not.

    Attributes:
        preference: ``auto``, ``torch``, ``numba`` or ``triton``.
        numba_rule: the compiled CPU kernel's rule code (``_cpu_kernel.RULE_*``), or None where it cannot serve.
        triton_update: the fused Triton decode step's ``update`` (``standard``, ``lambda_outside``, ``no_lambda``).
        calls: how many layer calls each implementation served (:data:`IMPLEMENTATIONS`), for benchmarks and tests.
    """

    def __init__(self, config: DeltaMemConfig, preference: str = "auto") -> None:
        self.preference = check_kernel(preference)
        wide = config.wide_value
        rule = None if wide else _cpu_kernel.kernel_rule(config.update_rule, config.state_update_mode)
        self.numba_rule = rule
        if not _cpu_kernel.AVAILABLE:
            self._numba_static = "numba is not installed (pip install numba)"
        elif wide:
            self._numba_static = "wide values (d × r sub-states) are not covered by the compiled kernel"
        elif rule is None:
            self._numba_static = (f"update_rule {config.update_rule!r} (its own retention projection) is not "
                                  "covered by the compiled kernel")
        else:
            self._numba_static = None
        if wide:
            self._triton_static = "wide values (d × r sub-states) are not covered by the Triton kernels"
        elif config.rank > _TRITON_MAX_RANK:
            self._triton_static = f"the Triton kernels support r <= {_TRITON_MAX_RANK}, this adapter has r = {config.rank}"
        else:
            self._triton_static = None
        if config.update_rule == "delta":
            self.triton_update = "no_lambda"  # λ = 1: lambda_outside's erase λβ is β, the same rule
        else:
            self.triton_update = config.state_update_mode
        self._numba_first = False
        self._set_fast_flag()
        self.calls: Counter[str] = Counter()
        self._served: list[dict[str, Tensor | None]] = []  # the layers' live parameter dicts
        self._weights_key: tuple | None = None
        self._weights_generation = 0
        self._checked_call: object = None

    def serve(self, parameters: dict[str, Tensor | None]) -> None:
        """Add a layer (its live parameter dict; entries may become None: ``training/gates.py``)."""
        self._served.append(parameters)

    def _set_fast_flag(self) -> None:
        # the CPU inference hot path (decode: once per layer per token) is one test of this flag and four of the
        # call; everything else goes through _choose
        self._numba_first = self.preference in ("auto", "numba") and self._numba_static is None

    def set_preference(self, preference: str) -> None:
        self.preference = check_kernel(preference)
        self._set_fast_flag()

    def needs_grad(self, x: Tensor, memory: Tensor, out: Tensor | None, parameters: dict[str, Tensor | None]) -> bool:
        """Whether this call must be differentiable: grad mode on and the input, the state, the output to steer
        (a trainable base projection) or a parameter of the layer (``parameters``) requiring a gradient."""
        if not torch.is_grad_enabled():
            return False
        if x.requires_grad or memory.requires_grad or (out is not None and out.requires_grad):
            return True
        return any(p is not None and p.requires_grad for p in parameters.values())

    def weights_generation(self, call: object) -> int:
        """A number that changes whenever a parameter of a served layer was replaced, moved or changed in place
        (identity, data pointer and autograd version counter of each: an optimiser step, ``load_state_dict``,
        ``.to()``): what the layers' inference weight copies are keyed on. Computed once per forward call
        (``call``: the call's plan, by identity) for every layer at once — one tight loop instead of one per layer."""
        if call is self._checked_call:
            return self._weights_generation
        key = tuple([(id(p), p._version, p.data_ptr()) for ps in self._served for p in ps.values() if p is not None])
        if key != self._weights_key:
            self._weights_key = key
            self._weights_generation += 1
        self._checked_call = call
        return self._weights_generation

    def choose(self, x: Tensor, memory: Tensor, form: str, out: Tensor | None,
               parameters: dict[str, Tensor | None]) -> tuple[str, bool]:
        """The implementation for one call of a layer, and whether it needs a gradient.

        Args:
            x: ``(B, T, d)`` the attention input of the call. memory: the layer's state before it.
            form: what the call does: ``read`` (writes off), ``tokens`` (TSW/MSW), ``sequence`` (SSW, ours) or
                ``messages`` (SSW, the authors' semantics).
            out: the projection output the call steers (in place when no gradient is needed), or None.
            parameters: the layer's parameter dict (does one need a gradient?).
        Returns:
            ``(implementation, needs_grad)``.
        Raises:
            KernelUnavailableError: a forced kernel cannot serve this call.
        """
        # CPU inference (decode: once per layer per token) is settled by the first test; every line here runs cold
        # in situ (after the MLP's weights streamed through the caches), so it reads as little as it can
        grad = torch.is_grad_enabled() and self.needs_grad(x, memory, out, parameters)
        if self._numba_first and not grad and form == TOKENS and x.is_cpu and x.dtype is _F32 and memory.dtype is _F32:
            impl = NUMBA_DECODE if x.shape[1] == 1 else NUMBA_SCAN
        else:
            impl = self._choose(x, memory, form, grad)
        self.calls[impl] += 1
        return impl, grad

    def _choose(self, x: Tensor, memory: Tensor, form: str, grad: bool) -> str:
        if form == READ:
            return READ_ONLY  # one einsum of the fixed state: the same for every preference
        pref = self.preference
        if pref == "torch":
            return TORCH
        if pref == "auto":
            if x.device.type == "cpu":  # numba when it can serve (the fast test in choose failed: it cannot)
                return TORCH
            return self._triton(x, form, grad) if self.triton_refusal(x, memory) is None else TORCH
        reason = self.numba_refusal(x, memory, form, grad) if pref == "numba" else self.triton_refusal(x, memory)
        if reason is not None:
            raise KernelUnavailableError(f"kernel {pref!r} ({ENV_VAR} or DeltaMemModel.kernel) cannot serve this "
                                         f"call: {reason}; use 'auto' to let each call take what can serve it")
        if pref == "numba":
            return NUMBA_DECODE if x.shape[1] == 1 else NUMBA_SCAN
        return self._triton(x, form, grad)

    @staticmethod
    def _triton(x: Tensor, form: str, grad: bool) -> str:
        # the fused decode step has no autograd; the scan handles T == 1 in one launch and is differentiable
        return TRITON_DECODE if form == TOKENS and x.shape[1] == 1 and not grad else TRITON_SCAN

    def numba_refusal(self, x: Tensor, memory: Tensor, form: str, grad: bool) -> str | None:
        """Why the compiled CPU kernel cannot serve this call (None: it can)."""
        if self._numba_static is not None:
            return self._numba_static
        if form != TOKENS:
            return "sequence-state writes (SSW) are not covered by the compiled kernel"
        if x.device.type != "cpu":
            return f"the compiled kernel runs on the CPU, this call is on {x.device}"
        if x.dtype != _F32 or memory.dtype != _F32:
            return (f"the compiled kernel runs float32, this call has {x.dtype} hidden states and a {memory.dtype} "
                    "state")
        if grad:
            return "this call needs gradients and the compiled kernel has no autograd"
        return None

    def triton_refusal(self, x: Tensor, memory: Tensor) -> str | None:
        """Why the Triton kernels cannot serve this call (None: they can)."""
        if self._triton_static is not None:
            return self._triton_static
        if not _triton_installed():
            return 'triton is not installed (pip install "deltamem-agents[cuda]")'
        reason = triton_modules().support.unavailable_reason(x.device)
        if reason is not None:
            return reason
        if memory.dtype != _F32:
            return f"the Triton kernels keep a float32 state, this state is {memory.dtype} (float64: the torch paths)"
        return None
