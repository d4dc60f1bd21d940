"""Where the Triton kernel tests run: on CUDA when there is a GPU, otherwise on the CPU through Triton's
interpreter. The switch (``TRITON_INTERPRET=1``) is read when triton is first imported (its standard library) and
when a kernel is built (:mod:`deltamem_agents.ops.triton_support` builds them lazily); ``tests/conftest.py`` sets it
before any test runs, and this module once more for runs of a single file."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton", reason='triton is not installed (pip install "deltamem-agents[cuda]")')

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def affine_reference(q, k, v, keep, erase, write, initial_state=None, mask=None):
    """The general update ``S[i] ← keep_i S[i] − erase_i (S[i]·k) k + write_i v_i k``, one position at a time
    (float64 or float32, whatever the inputs): the plain loop the affine kernel is tested against."""
    B, T, N, r = q.shape
    S = q.new_zeros(B, N, r, r) if initial_state is None else initial_state
    outs = []
    for t in range(T):
        kt, vt = k[:, t], v[:, t]
        ke, er, wr = keep[:, t], erase[:, t], write[:, t]
        if mask is not None:
            m = mask[:, t, None, None]
            ke = torch.where(m, ke, torch.ones_like(ke))
            er = torch.where(m, er, torch.zeros_like(er))
            wr = torch.where(m, wr, torch.zeros_like(wr))
        outs.append(torch.einsum("bnij,bnj->bni", S, q[:, t]))
        Sk = torch.einsum("bnij,bnj->bni", S, kt)
        S = ke[..., None] * S + ((wr * vt - er * Sk)[..., None]) * kt[..., None, :]
    return torch.stack(outs, 1), S
