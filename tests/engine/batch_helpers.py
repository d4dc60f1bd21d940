"""Helpers of the batched-decode tests: the one-at-a-time reference, tolerances, and a gate that makes sessions
share batched steps deterministically."""

from __future__ import annotations

import threading
import time

import torch

#: Batched rows equal running alone within this (fp32 on CPU; measured: ≤ 4e-7 on logits of magnitude ~0.7 for
#: the engine's tiny models, ≤ 3e-6 for the vocab-96 ones). Padded attention and batched matmuls sum in another
#: order than one row alone, so equality is not bitwise.
ATOL = 1e-5
RTOL = 1e-5
#: The generated tokens' KV inside the model (deeper layers, larger activations: measured ≤ 2.3e-5 on the 7-layer
#: Gemma3) — only the logits decide tokens.
KV_ATOL = 1e-4


def assert_close(actual, expected, msg: str = "", atol: float = ATOL) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=RTOL, msg=lambda m: f"{msg}: {m}")


def assert_no_near_ties(logits_seq, msg: str = "") -> None:
    """Greedy tokens can only be compared when no step's top-2 logits are closer than twice the tolerance (else
    a legitimate rounding difference may pick the other one): check that premise instead of assuming it."""
    for i, logits in enumerate(logits_seq):
        top = torch.topk(logits.float(), 2).values
        gap, bound = float(top[0] - top[1]), 2 * (ATOL + RTOL * float(top[0].abs()))
        assert gap > bound, f"{msg}: step {i} has a near tie (top-2 gap {gap:.2e} <= {bound:.2e}); pick another seed"


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


class LogitRecorder:
    """Records the logits of every generation step the runner computes (prefills and decode steps, alone or
    batched: every row), to check the no-near-tie premise of comparing greedy texts."""

    def __init__(self, runner):
        self.logits = []
        forward, forward_rows = runner.forward, runner.forward_rows

        def recorded(state, ids, **kw):
            logits, new_state = forward(state, ids, **kw)
            if logits is not None and not kw.get("writes", True):
                self.logits.append(logits)
            return logits, new_state

        def recorded_rows(*args, **kw):
            logits = forward_rows(*args, **kw)
            self.logits.extend(logits)
            return logits

        runner.forward, runner.forward_rows = recorded, recorded_rows
