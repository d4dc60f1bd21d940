"""Gated delta-rule kernels: the contract forms (the bottom layer: imports nothing from ``deltamem_agents`` but
the error root).

Every form shares one contract, ``fn(q, k, v, beta, initial_state=None, mask=None, *, decay=None, erase=None)
-> (out, final_state)`` with ``q, k, v, beta (B, T, N, r)``, ``initial_state (B, N, r, r)``, ``mask (B, T)``
bool, and the optional retention ``decay`` and erase gate ``erase`` (``None``: the paper's ``1 − β`` and ``β``);
see :mod:`.reference` for the math:

* :func:`delta_rule_reference`: the per-token loop, the specification the others are tested against;
* :func:`delta_rule_chunked`: the chunked parallel form (prefill and training, differentiable);
* :func:`delta_rule_step`: one position (decode, differentiable);
* :func:`delta_rule_chunked_shared_gate`: the chunked form with one gate per sub-state (wide values);
* :func:`delta_rule_triton` / :func:`delta_rule_triton_affine`: the Triton scan, forward and backward (optional
  dependency; imported on first use of the names, so importing this package never imports triton).

The kernels that also compute the layer's projections and activations (the compiled CPU kernel, the fused Triton
decode step) take the layer's raw fused projections rather than this contract: they are private to
:class:`~deltamem_agents.adapter.layer.DeltaMemLayer` (``adapter/_cpu_kernel.py``, ``adapter/_triton_decode.py``).
"""

import importlib

from .chunked import delta_rule_chunked
from .reference import delta_rule_reference
from .shared_gate import delta_rule_chunked_shared_gate
from .step import delta_rule_step

__all__ = [
    "delta_rule_chunked",
    "delta_rule_chunked_shared_gate",
    "delta_rule_reference",
    "delta_rule_step",
    "delta_rule_triton",
    "delta_rule_triton_affine",
]

_LAZY = {
    "delta_rule_triton": "triton_scan",
    "delta_rule_triton_affine": "triton_scan",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
