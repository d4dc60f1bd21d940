"""Gated delta-rule kernels (the bottom layer: imports nothing else from ``deltamem_agents``).

All three share one contract, ``fn(q, k, v, beta, initial_state=None, mask=None, *, decay=None, erase=None)
-> (out, final_state)`` with ``q, k, v, beta (B, T, N, r)``, ``initial_state (B, N, r, r)``, ``mask (B, T)``
bool, and the optional retention ``decay`` and erase gate ``erase`` (``None``: the paper's ``1 − β`` and ``β``);
see :mod:`.reference` for the math. :mod:`.cpu_fused` is the compiled inference kernel (activations included).
"""

from . import cpu_fused
from .chunked import delta_rule_chunked
from .cpu_fused import delta_rule_fused_cpu, delta_rule_numba
from .reference import delta_rule_reference
from .shared_gate import delta_rule_chunked_shared_gate
from .step import delta_rule_step

__all__ = [
    "cpu_fused",
    "delta_rule_chunked",
    "delta_rule_chunked_shared_gate",
    "delta_rule_fused_cpu",
    "delta_rule_numba",
    "delta_rule_reference",
    "delta_rule_step",
]
