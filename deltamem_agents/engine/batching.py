"""`ModelRunner`: the only code that calls the model; shares one model between sessions safely.

A :class:`~deltamem_agents.adapter.DeltaMemModel` keeps its live memory state, and the per-call context its hooks
use, on the model object. Two forward calls from different threads would mix them, so every call goes through
the runner, which holds the model lock for exactly one call: it installs the caller's state, runs the model,
and hands back the advanced state.

Two ways sessions share the model:

* **One call at a time** (:meth:`ModelRunner.forward`; the default, and the reference): sessions interleave at
  the granularity of one forward call — a decode step of session A, then one of B, … — and each session's
  computation is exactly the one it would do alone (same inputs, same shapes, same kernels), so its state and
  logits are bitwise those of running it alone.
* **Batched decode** (:meth:`ModelRunner.forward_rows`, driven by :mod:`.decode_batcher` when the engine runs
  with ``batch_decode=True``): the decode steps of every session generating at the same time run as one
  forward over a left-padded KV cache (:mod:`.decode_group`), each row reading its own state. Padded attention
  and batched matmuls change the floating-point summation order, so a row equals running alone within a
  tolerance (tested), not bitwise. On CPU a decode step is bound by reading the weights once per call, which a
  batch shares; on a GPU the gain is larger (``docs/speed.md``).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..adapter import DeltaMemModel, DeltaMemState
from ..models.kv_cache import forward_with_cache, new_cache

__all__ = ["ModelRunner"]

_LOCKS_GUARD = threading.Lock()


class ModelRunner:
    """Runs forward calls of one model for many sessions, one call at a time (a call may carry many rows).

    Args:
        model: the δ-mem model (its base model in eval mode).
        device: where inputs go (the model's device).
    """

    def __init__(self, model: DeltaMemModel, device: torch.device) -> None:
        self.model = model
        self.device = device
        # The lock lives on the model, not the runner: two engines sharing one model object still take turns.
        with _LOCKS_GUARD:
            lock = model.__dict__.get("_deltamem_forward_lock")
            if lock is None:
                lock = threading.Lock()
                model.__dict__["_deltamem_forward_lock"] = lock
        self.lock: threading.Lock = lock
        self.forward_calls = 0

    def new_cache(self) -> Any:
        return new_cache(self.model.base_model.config)

    @torch.no_grad()
    def forward(
        self,
        state: DeltaMemState,
        ids: list[int],
        *,
        cache: Any = None,
        writes: bool,
        segment_id: int | Sequence[int] | None = None,
        want_logits: bool = True,
    ) -> tuple[Tensor | None, DeltaMemState]:
        """Run ``ids`` (one sequence) on ``state``.

        Args:
            state: 1-row state the call reads (and, with ``writes``, advances). Not modified.
            ids: token ids ``(T,)`` continuing ``cache`` (a ``DynamicCache``, extended in place) or, with
                ``cache=None``, a fresh sequence with no context.
            writes: write these tokens into the state (TSW/MSW: every token; SSW: one message, ``segment_id``).
            segment_id: SSW message id of all ``ids`` (the history index), or one id per token ``(T,)`` (the
                authors' protocol runs several messages and the generation header, id ``-1``, in one call);
                ignored by TSW/MSW.
            want_logits: compute the last position's logits.
        Returns:
            ``logits (V,)`` float32 of the last position (or None) and the state after the call.
        """
        if not ids:
            return None, state
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        kwargs: dict[str, Any] = {"logits_to_keep": 1}
        if writes and self.model.config.write_mode == "ssw" and segment_id is not None:
            if isinstance(segment_id, int):
                kwargs["segment_ids"] = torch.full_like(input_ids, segment_id)
            else:
                if len(segment_id) != len(ids):
                    raise ValueError(f"segment_id: {len(segment_id)} ids for {len(ids)} tokens")
                kwargs["segment_ids"] = torch.tensor([list(segment_id)], dtype=torch.long, device=self.device)
        with self.lock:
            self.model.set_state(state)
            with contextlib.nullcontext() if writes else self.model.writes_disabled():
                if cache is None:
                    out = self.model(input_ids=input_ids, use_cache=False, **kwargs)
                else:
                    out = forward_with_cache(self.model, cache, input_ids, **kwargs)
            new_state = self.model.state  # a new object: the hooks never modify the installed state in place
            self.forward_calls += 1
        logits = out.logits[0, -1].float() if want_logits else None
        return logits, new_state

    @torch.no_grad()
    def forward_rows(
        self,
        state: DeltaMemState,
        tokens: Tensor,
        cache: Any,
        *,
        attention_mask: Tensor | None,
        position_ids: Tensor,
    ) -> Tensor:
        """One decode step of ``B`` sequences at once (writes off: every row reads its own state).

        Args:
            state: ``B``-row state, row ``i`` the state sequence ``i`` reads. Not modified.
            tokens: ``(B, 1)`` the next token of each row.
            cache: a ``DynamicCache`` of ``B`` rows, left-padded to a common length ``L`` (extended in place).
            attention_mask: ``(B, L + 1)``, 0 on padding columns (``None``: no row is padded).
            position_ids: ``(B, 1)``, each row's own position (its token count so far, padding excluded).
        Returns:
            ``logits (B, V)`` of the new position.
        """
        with self.lock:
            self.model.set_state(state)
            with self.model.writes_disabled():
                out = forward_with_cache(self.model, cache, tokens, attention_mask=attention_mask,
                                         position_ids=position_ids, logits_to_keep=1)
            self.forward_calls += 1
        return out.logits[:, -1].float()
