"""What the Triton kernels (:mod:`.triton_scan`, and the layer's fused decode step
``deltamem_agents/adapter/_triton_decode.py``) share: the optional import, lazy compilation and the device rule.

Triton is an optional dependency (``pip install "deltamem-agents[cuda]"``). Its kernels run on CUDA tensors; on the
CPU they run only through Triton's interpreter (``TRITON_INTERPRET=1``), which is how CI tests them: slowly, but the
same kernel source, the same masks and the same float32 arithmetic.

Kernels are decorated with ``triton.jit`` on first use, not at import, and cached per interpreter setting: Triton
decides at decoration time whether a kernel is compiled or interpreted, so a module imported before
``TRITON_INTERPRET`` was set would otherwise be stuck with compiled kernels that cannot run on CPU tensors.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import Tensor

from ..errors import DeltaMemError

try:  # optional dependency
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None
    tl = None

__all__ = ["AVAILABLE", "TritonUnavailableError", "check_device", "interpreting", "jit", "next_power_of_2", "tl",
           "unavailable_reason"]

AVAILABLE = triton is not None


class TritonUnavailableError(DeltaMemError, RuntimeError):
    """The Triton kernels cannot run here: Triton is missing, or the tensors are on a CPU without the interpreter."""


def interpreting() -> bool:
    """Whether Triton runs kernels through its interpreter (``TRITON_INTERPRET=1``, read live)."""
    if not AVAILABLE:
        return False
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4; older releases read the variable directly
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


_COMPILED: dict[tuple[str, bool], object] = {}


def jit(fn: Callable) -> object:
    """``triton.jit(fn)``, built on first use and cached per interpreter setting."""
    key = (f"{fn.__module__}.{fn.__qualname__}", interpreting())
    kernel = _COMPILED.get(key)
    if kernel is None:
        kernel = _COMPILED[key] = triton.jit(fn)
    return kernel


def check_device(*tensors: Tensor | None) -> torch.device:
    """The common device of ``tensors`` (None entries skipped) if the kernels can run there.

    Raises:
        TritonUnavailableError: Triton is not installed, or the device is neither CUDA nor a CPU with the
            interpreter on.
        ValueError: the tensors are on different devices.
    """
    present = [t for t in tensors if t is not None]
    device = present[0].device
    for t in present[1:]:
        if t.device != device:
            raise ValueError(f"all tensors must be on one device, got {device} and {t.device}")
    reason = unavailable_reason(device)
    if reason is not None:
        raise TritonUnavailableError(reason)
    return device


def unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on ``device`` (None: they can). Reads no tensor: no host sync."""
    if not AVAILABLE:
        return 'the Triton kernels need triton: pip install "deltamem-agents[cuda]"'
    if device.type == "cuda" or (device.type == "cpu" and interpreting()):
        return None
    return f"the Triton kernels run on CUDA tensors (or on the CPU with TRITON_INTERPRET=1), got device {device}"


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
