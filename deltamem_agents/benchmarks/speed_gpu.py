"""Speed and peak memory of δ-mem beside the plain model and the authors' code, in one process and one run
(``deltamem bench speed --device cuda --shapes qwen3-4b``).

Why a module of its own (and not more options of :mod:`.speed`): this one builds a random-weight model from a
named shape (speed does not depend on weight values, so no weights need to travel), measures long prompts with a
KV cache and a greedy decode after them, reports peak GPU memory per arm, and runs the authors' code as a third
arm; :mod:`.speed` stays the CPU benchmark of the embedded model whose figures are in ``docs/speed.md``.

Arms, all on the same base weights in the same process:

* ``plain``: the base model, every δ-mem hook removed.
* ``ours-torch``: our adapter (the paper's TSW, r = 8, N = 1, every layer) with its kernel preference forced to
  ``torch`` (chunked scan for prefill, 6-op step for decode).
* ``ours-triton``: the same adapter with the preference forced to ``triton``, i.e. the layer's own kernel choice
  (``adapter/kernel_choice.py``): the Triton scan (:func:`~deltamem_agents.ops.triton_scan.delta_rule_triton`) for
  prefill and the fused Triton decode step (projection in torch, then activations + read + write in one kernel)
  for decode. The arm counts the calls each implementation served (``DeltaMemModel.kernel_calls``) and fails
  unless both Triton kernels ran. On CUDA the default (``auto``) takes the same paths.
* ``theirs``: the authors' ``attach_delta_mem`` (declare-lab/delta-Mem, an uncommitted checkout given by
  ``--theirs``) with their release settings, on the same base modules (their wrappers are swapped in and out).

The authors' quirks and how this benchmark handles them (see the official fixtures' README):

* transformers ≥ 5.2x passes the KV cache to the attention module as ``cache=``; their ``forward`` takes
  ``past_key_values=``, so it would silently never extend the cache (and decode would attend to one token). Their
  wrappers get a shim that passes ``cache`` on as ``past_key_values``; every decode checks that the cache grew by
  one token per call (:func:`~deltamem_agents.models.kv_cache.forward_with_cache` for the prefill, a length check
  after the decode), so an arm that does not use its cache fails instead of being timed.
* their write mask reads a 4-D attention mask as additive; a boolean mask (what sdpa gets when transformers cannot
  drop it) makes every token padding and switches δ-mem off. Batch 1 without padding and without an
  ``attention_mask`` argument gives them no mask at all; after each arm the run checks that their state (and
  ours) was actually written, and fails otherwise.
* their state is kept in the model dtype (bf16 here), ours in float32; their scan uses their Triton kernel on
  CUDA (``DELTA_MEM_SCAN_IMPL`` unset), which stores the state after every position.

Timing: CUDA-synchronised wall clock around the prefill (``logits_to_keep=1``, so no arm materialises 32k × 152k
logits) and around ``decode_tokens`` greedy single-token calls with the cache. Peak memory:
``torch.cuda.max_memory_allocated`` over the arm's prefill + decode, reset before each arm. Arms run in a rotated
order per prompt length after one short warm-up call each (Triton compilation, cuBLAS heuristics).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..adapter import DeltaMemConfig, attach
from ..models.kv_cache import CacheNotUsedError, cache_kwargs, cache_length, forward_with_cache, new_cache

__all__ = ["ARMS", "SHAPES", "ArmResult", "build_model", "format_table", "kernel_preference",
           "run_gpu_speed_benchmark"]

ARMS = ("plain", "ours-torch", "ours-triton", "theirs")

# Qwen3-4B-Instruct-2507 (config.json of the release): 36 layers, d = 2560, GQA 32/8 heads of 128, tied embeddings.
SHAPES: dict[str, dict[str, Any]] = {
    "qwen3-4b": dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                     rms_norm_eps=1e-6, tie_word_embeddings=True, rope_theta=5_000_000.0),
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, rms_norm_eps=1e-6,
                 tie_word_embeddings=True, rope_theta=10_000.0),
}

# The authors' release settings (the fixtures' attach settings): rank 8, alpha 16, q/o corrections.
THEIR_SETTINGS = dict(rank=8, alpha=16.0, beta_bias_init=-1.5, couple_lambda=True, state_update_mode="standard",
                      output_init="base_slice_fixed", base_slice_ref_width=8, delta_heads=("q", "o"),
                      online_gain=0.05, rankwise_gates=True, normalize_qk=True)


@dataclass
class ArmResult:
    """One arm at one prompt length."""

    arm: str
    prompt_tokens: int
    decode_tokens: int
    prefill_s: float
    decode_s: float
    peak_bytes: int | None
    checks: dict[str, Any] = field(default_factory=dict)

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_s


# -- the model --------------------------------------------------------------------------------------------------
def build_model(shapes: str, device: str | torch.device, dtype: torch.dtype, seed: int = 0):
    """A random-weight Qwen3 causal LM of the named shape on ``device`` (sdpa attention, eval mode)."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    if shapes not in SHAPES:
        raise ValueError(f"unknown shapes {shapes!r}; known: {sorted(SHAPES)}")
    torch.manual_seed(seed)
    config = Qwen3Config(**SHAPES[shapes])
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


# -- our arms ----------------------------------------------------------------------------------------------------
#: the kernel preference each of our arms forces (the torch arm never takes numba, even on a CPU run)
ARM_KERNELS = {"ours-torch": "torch", "ours-triton": "triton"}


@contextlib.contextmanager
def kernel_preference(dm, kernel: str) -> Iterator[None]:
    """Force ``dm``'s kernel preference for this block (restored after)."""
    saved = dm.kernel
    dm.kernel = kernel
    try:
        yield
    finally:
        dm.kernel = saved


def _calls_since(dm, before: dict[str, int]) -> dict[str, int]:
    return {k: n - before.get(k, 0) for k, n in dm.kernel_calls().items() if n != before.get(k, 0)}


# -- the authors' arm -------------------------------------------------------------------------------------------
class TheirArm:
    """The authors' δ-mem on the same base: ``enable()`` swaps their attention wrappers in, ``disable()`` out."""

    def __init__(self, model, path: str | Path) -> None:
        path = Path(path)
        if not (path / "deltamem" / "core" / "delta.py").is_file():
            raise FileNotFoundError(f"--theirs {path}: no deltamem/core/delta.py (a declare-lab/delta-Mem checkout)")
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
        from deltamem.core.delta import HFDeltaMemConfig, attach_delta_mem, reset_delta_mem_states

        self._reset = reset_delta_mem_states
        self.model = model
        layers = model.model.layers
        self.originals = [layer.self_attn for layer in layers]
        attach_delta_mem(model, HFDeltaMemConfig(**THEIR_SETTINGS))
        self.wrappers = [layer.self_attn for layer in layers]
        if any(w is o for w, o in zip(self.wrappers, self.originals, strict=True)):
            raise RuntimeError("the authors' attach_delta_mem did not wrap every attention layer")
        for w in self.wrappers:
            _pass_cache_as_past_key_values(w)
        self.disable()

    def enable(self) -> None:
        for layer, w in zip(self.model.model.layers, self.wrappers, strict=True):
            layer.self_attn = w

    def disable(self) -> None:
        for layer, o in zip(self.model.model.layers, self.originals, strict=True):
            layer.self_attn = o

    def reset(self) -> None:
        self._reset(self.model)

    def state_written(self) -> bool:
        state = getattr(self.wrappers[0], "delta_state", None)
        return state is not None and bool(state.abs().sum() > 0)


def _pass_cache_as_past_key_values(module: torch.nn.Module) -> None:
    """transformers ≥ 5.2x calls attention with ``cache=``; the authors' forward takes ``past_key_values=``."""
    forward = module.forward

    def shim(*args, cache=None, **kwargs):
        if cache is not None and kwargs.get("past_key_values") is None:
            kwargs["past_key_values"] = cache
        return forward(*args, **kwargs)

    module.forward = shim


# -- measuring --------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def _run_arm(model, config, ids: torch.Tensor, decode_tokens: int, device: torch.device) -> tuple[float, float, int | None]:
    """Prefill ``ids`` with a fresh cache, then ``decode_tokens`` greedy steps. Returns (prefill s, decode s,
    peak bytes or None off CUDA)."""
    cache = new_cache(config)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    out = forward_with_cache(model, cache, ids, logits_to_keep=1)
    token = out.logits[:, -1:].argmax(-1)
    _sync(device)
    t1 = time.perf_counter()
    kw = cache_kwargs(model, cache)
    for _ in range(decode_tokens):
        out = model(input_ids=token, logits_to_keep=1, **kw)
        token = out.logits[:, -1:].argmax(-1)
    _sync(device)
    t2 = time.perf_counter()
    if cache_length(cache) != ids.shape[1] + decode_tokens:
        raise CacheNotUsedError(f"the cache holds {cache_length(cache)} tokens after the decode, expected "
                                f"{ids.shape[1] + decode_tokens}: an arm did not use its KV cache")
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return t1 - t0, t2 - t1, peak


def run_gpu_speed_benchmark(
    *,
    device: str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    shapes: str = "qwen3-4b",
    prompts: Sequence[int] = (4096, 16384, 32768),
    decode_tokens: int = 256,
    arms: Sequence[str] = ARMS,
    theirs: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
) -> list[ArmResult]:
    """Measure every arm at every prompt length (see the module docstring). ``theirs`` is required for the
    ``theirs`` arm; ``ours-triton`` needs triton (and, off CUDA, ``TRITON_INTERPRET=1``)."""
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise ValueError(f"unknown arms {unknown}; known: {ARMS}")
    if "plain" not in arms:
        raise ValueError("the plain arm is needed: every ratio is to it")
    if "theirs" in arms and theirs is None:
        raise ValueError("the 'theirs' arm needs --theirs PATH (a declare-lab/delta-Mem checkout)")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch sees no CUDA device")
    model = build_model(shapes, dev, dtype, seed)
    config = model.config
    their = TheirArm(model, theirs) if "theirs" in arms else None  # attached first, swapped out until used
    dm = attach(model, DeltaMemConfig())
    dm.eval()
    vocab = config.vocab_size
    gen = torch.Generator().manual_seed(seed)

    def arm_context(arm: str):
        stack = contextlib.ExitStack()
        if arm == "plain":
            stack.enter_context(dm.hooks_removed())
        elif arm == "theirs":
            stack.enter_context(dm.hooks_removed())
            their.enable()
            stack.callback(their.disable)
        else:
            stack.enter_context(kernel_preference(dm, ARM_KERNELS[arm]))
            calls_before.clear()
            calls_before.update(dm.kernel_calls())
        return stack

    def target(arm: str):
        return dm if arm.startswith("ours") else model

    def reset(arm: str) -> None:
        if arm.startswith("ours"):
            dm.reset_state(1)
        elif arm == "theirs":
            their.reset()

    def checks(arm: str) -> dict[str, Any]:
        if arm.startswith("ours"):
            written = bool(dm.state.memory[0].abs().sum() > 0)
            if not written:
                raise RuntimeError(f"{arm}: the δ-mem state was not written")
            calls = _calls_since(dm, calls_before)
            out = {"state_written": written, "state_dtype": str(dm.state.memory[0].dtype), "kernel_calls": calls}
            if arm == "ours-triton" and not (calls.get("triton-scan") and calls.get("triton-decode")):
                raise RuntimeError(f"ours-triton: the Triton kernels were not called ({calls})")
            if arm == "ours-torch" and set(calls) != {"torch"}:
                raise RuntimeError(f"ours-torch: other implementations ran ({calls})")
            return out
        if arm == "theirs":
            if not their.state_written():
                raise RuntimeError("theirs: the authors' state was not written (their mask reading switched δ-mem "
                                   "off: quirk 2 of the fixtures' README)")
            return {"state_written": True, "state_dtype": str(their.wrappers[0].delta_state.dtype)}
        return {}

    calls_before: dict[str, int] = {}
    results: list[ArmResult] = []
    warm = torch.randint(10, vocab, (1, min(256, min(prompts))), generator=gen).to(dev)
    for arm in arms:  # one short call each: Triton compilation, cuBLAS heuristics, allocator
        with arm_context(arm):
            reset(arm)
            _run_arm(target(arm), config, warm, 4, dev)
    for i, n in enumerate(prompts):
        ids = torch.randint(10, vocab, (1, n), generator=gen).to(dev)
        order = list(arms[i % len(arms):]) + list(arms[: i % len(arms)])  # rotate who goes first
        for arm in order:
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            with arm_context(arm):
                reset(arm)
                prefill_s, decode_s, peak = _run_arm(target(arm), config, ids, decode_tokens, dev)
                res = ArmResult(arm, n, decode_tokens, prefill_s, decode_s, peak, checks(arm))
            results.append(res)
            if progress:
                mem = f"  peak {res.peak_bytes / 2**30:6.2f} GiB" if res.peak_bytes is not None else ""
                print(f"{arm:>12} prompt {n:>6}: prefill {res.prefill_tok_s:10.1f} tok/s  decode "
                      f"{res.decode_tok_s:8.2f} tok/s{mem}", flush=True)
        reset("ours")
    dm.detach_adapter()
    return results


# -- reporting --------------------------------------------------------------------------------------------------
def ratios(results: Sequence[ArmResult]) -> list[dict[str, Any]]:
    """One row per (prompt, arm) with the arm's figures and its ratios to the plain arm at that prompt."""
    plain = {r.prompt_tokens: r for r in results if r.arm == "plain"}
    rows = []
    for r in results:
        p = plain[r.prompt_tokens]
        rows.append({
            **asdict(r), "prefill_tok_s": r.prefill_tok_s, "decode_tok_s": r.decode_tok_s,
            "prefill_ratio": r.prefill_tok_s / p.prefill_tok_s, "decode_ratio": r.decode_tok_s / p.decode_tok_s,
            "peak_ratio": (r.peak_bytes / p.peak_bytes) if r.peak_bytes and p.peak_bytes else None,
        })
    return rows


def format_table(results: Sequence[ArmResult]) -> str:
    lines = ["| prompt | arm | prefill tok/s | ÷ plain | decode tok/s | ÷ plain | peak GiB | ÷ plain |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for row in ratios(results):
        peak = "–" if row["peak_bytes"] is None else f"{row['peak_bytes'] / 2**30:.2f}"
        pr = "–" if row["peak_ratio"] is None else f"{row['peak_ratio']:.4f}"
        lines.append(f"| {row['prompt_tokens']} | {row['arm']} | {row['prefill_tok_s']:.1f} | "
                     f"{row['prefill_ratio']:.3f} | {row['decode_tok_s']:.2f} | {row['decode_ratio']:.3f} | {peak} | "
                     f"{pr} |")
    return "\n".join(lines)


def write_json(results: Sequence[ArmResult], path: str | Path, **context: Any) -> None:
    env = {"torch": torch.__version__, "cuda": torch.version.cuda,
           "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    payload = {"context": {**env, **context}, "results": ratios(results)}
    Path(path).write_text(json.dumps(payload, indent=2))
