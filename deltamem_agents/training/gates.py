"""Training-only instruments on a :class:`DeltaMemModel`, implemented outside the adapter.

* :class:`WriteGateRecorder` collects the mean write gate β of every wrapped layer (with autograd) for the β
  regulariser, by observing the input of each wrapped ``q_proj``; it recomputes only the β block of the fused
  projection (``N·r`` of the ``4·N·r`` rows), which is cheap next to the layer itself.
* :func:`steering_disabled` runs a block with the memory written but not read back into attention (the
  "reads off" write pass), by hiding the correction matrices for the block's duration.

Both leave the adapter's own code paths untouched; inference never uses them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..adapter.architectures import resolve_architecture
from ..adapter.model import DeltaMemModel

__all__ = ["WriteGateRecorder", "steering_disabled", "wrapped_q_projs"]


def wrapped_q_projs(dm: DeltaMemModel) -> list[tuple[nn.Module, nn.Module]]:
    """``(δ-mem layer, q_proj module)`` for every wrapped attention layer, in layer order."""
    spec, decoder_layers = resolve_architecture(dm.base_model)
    out = []
    for idx in dm.layer_indices:
        attn = getattr(decoder_layers[idx], spec.attention)
        out.append((dm.delta_layers[str(idx)], getattr(attn, spec.q_proj)))
    return out


class WriteGateRecorder:
    """Context manager: records, for each wrapped layer and forward call, the mean β over written tokens.

    ``mask (B, T)`` (1 = real token) must describe the calls made inside the block. For SSW the gate is taken per
    token (the message write uses the gate of the message's mean hidden state; the per-token mean is the usual
    definition of "mean β" and what the paper regularises).

    Attributes:
        means: one 0-dim float32 tensor per (layer, call), differentiable w.r.t. ``W_β`` and ``b_β``.
        sums, counts: the numerator (differentiable) and denominator (detached, unclamped) of each entry of
            ``means``, so data-parallel ranks can form the mean over the global batch.
    """

    def __init__(self, dm: DeltaMemModel, mask: Tensor | None = None) -> None:
        self.dm = dm
        self.mask = mask
        self.means: list[Tensor] = []
        self.sums: list[Tensor] = []
        self.counts: list[Tensor] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, layer: nn.Module):
        gate_rows = layer.in_proj.shape[0] - layer.beta_bias.shape[0]  # the gate block is the last one
        width = layer.beta_bias.shape[0]

        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            x = args[0]
            # as the layer computes it: the float32 gate rows cast to the hidden states' dtype (bf16 on a GPU; the
            # gradient reaches the float32 parameter through the cast), the sigmoid in float32
            beta = torch.sigmoid(F.linear(x, layer.in_proj[gate_rows:].to(x.dtype)).float() + layer.beta_bias.float())
            if self.mask is None:
                self.means.append(beta.mean())
                self.sums.append(beta.sum())
                self.counts.append(torch.tensor(float(beta.numel())))
            else:
                m = self.mask[:, -x.shape[1] :].to(beta.dtype)[..., None]
                total, count = (beta * m).sum(), (m.sum() * width).detach()
                self.means.append(total / count.clamp_min(1.0))
                self.sums.append(total)
                self.counts.append(count)

        return hook

    def mean(self) -> Tensor:
        """Mean β over layers and calls (0-dim)."""
        if not self.means:
            raise RuntimeError("no write gates recorded: did the block run the model?")
        return torch.stack(self.means).mean()

    def __enter__(self) -> WriteGateRecorder:
        for layer, q_proj in wrapped_q_projs(self.dm):
            self._handles.append(q_proj.register_forward_hook(self._hook(layer)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


@contextlib.contextmanager
def steering_disabled(dm: DeltaMemModel) -> Iterator[None]:
    """Write the memory but do not let it steer attention inside this block.

    The δ-mem hooks add a correction only when a layer has ``delta_q``/``delta_o``; hiding them for the block gives
    the base model's hidden states while the state is still written. The parameters are restored on exit.
    """
    saved: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        for layer in dm.delta_layers.values():
            for name in ("delta_q", "delta_o"):
                p = getattr(layer, name)
                if p is not None:
                    saved.append((layer, name, p))
                    setattr(layer, name, None)
        yield
    finally:
        for layer, name, p in saved:
            setattr(layer, name, p)
