"""Helpers of the batched-decode tests: the one-at-a-time reference, tolerances, and a gate that makes sessions
share batched steps deterministically."""

from __future__ import annotations

import threading
import time

import torch

#: Batched rows equal running alone within this (fp32 logits; measured: ≤ 3e-6 on the tiny models). The sum
#: order of padded attention and of batched matmuls differs from one row alone, so equality is not bitwise.
ATOL = 1e-4
RTOL = 1e-4


def assert_close(actual, expected, msg: str = "") -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL, msg=lambda m: f"{msg}: {m}")


def assert_no_near_ties(logits_seq, msg: str = "") -> None:
    """Greedy tokens can only be compared when no step's top-2 logits are closer than the tolerance (else a
    legitimate rounding difference may pick the other one): check that premise instead of assuming it."""
    for i, logits in enumerate(logits_seq):
        top = torch.topk(logits.float(), 2).values
        gap = float(top[0] - top[1])
        assert gap > 4 * ATOL, f"{msg}: step {i} has a near tie (top-2 gap {gap:.2e}); pick another seed"


def alone(runner, state, prompt: list[int], steps: int):
    """The reference: prefill, then ``steps`` greedy decode steps, each the session's own forward call.

    Returns ``(cache, first_logits, tokens, step_logits)``: ``tokens[0]`` comes from the prefill, ``tokens[k]``
    from ``step_logits[k-1]``."""
    cache = runner.new_cache()
    first, _ = runner.forward(state, prompt, cache=cache, writes=False)
    tokens, logits = [int(first.argmax())], []
    for _ in range(steps):
        out, _ = runner.forward(state, [tokens[-1]], cache=cache, writes=False)
        logits.append(out)
        tokens.append(int(out.argmax()))
    return cache, first, tokens, logits


class StepGate:
    """Holds the batcher's first batched step until ``n`` sessions are in it, so that the sessions of a test
    share steps whatever the thread timing (wraps ``runner.forward_rows``; the gate is about our own logic).

    ``sizes``: the number of rows of every batched step run since."""

    def __init__(self, runner, batcher, n: int, timeout: float = 120.0) -> None:
        self.sizes: list[int] = []
        self._open = threading.Event()
        inner = runner.forward_rows

        def gated(state, tokens, cache, **kwargs):
            if not self._open.is_set():
                deadline = time.monotonic() + timeout
                while batcher.sessions < n:  # the others are still in their prefill
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"only {batcher.sessions} of {n} sessions reached the batcher")
                    time.sleep(0.002)
                self._open.set()
            self.sizes.append(tokens.shape[0])
            return inner(state, tokens, cache, **kwargs)

        runner.forward_rows = gated


def cache_tensors(cache):
    return [(layer.keys, layer.values) for layer in cache.layers]
