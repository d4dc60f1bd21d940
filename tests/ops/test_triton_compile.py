"""Every Triton kernel compiles to machine code for a Hopper GPU (sm_90, the H100/H200), without a GPU.

The interpreter tests (``test_triton_scan.py``, ``tests/adapter/test_triton_decode.py``) check the kernels'
arithmetic; they do not run Triton's compiler, which is stricter (types of loop-carried values, tensor shapes, what
is constexpr). This compiles each kernel in each of its constexpr variants for ``cuda:90`` with Triton's own bundled
``ptxas``, in a subprocess with the interpreter off (the switch is read when triton is imported), and checks with
the bundled ``cuobjdump`` that no variant spills registers to local memory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason='triton is not installed (pip install "deltamem-agents[cuda]")')

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r'''
import inspect, itertools, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction
from deltamem_agents.adapter import _triton_decode as td
from deltamem_agents.ops import triton_scan as ts

INTS = {"T", "N", "R", "C", "NC"}
HALF = {"q_ptr", "k_ptr", "v_ptr", "g0_ptr", "g1_ptr", "g2_ptr", "p_ptr", "bias_ptr", "decay_ptr", "out_ptr"}
VARIANTS = {
    ts._fwd_transition: dict(MODE=(0, 1, 2), HAS_MASK=(False, True), BLOCK=(16,)),
    ts._fwd_carry: dict(HAS_INIT=(False, True), BLOCK=(16,)),
    ts._fwd_reads: dict(MODE=(0, 1, 2), HAS_MASK=(False, True), BLOCK=(16,)),
    ts._bwd_offsets: dict(MODE=(0, 1, 2), HAS_MASK=(True,), BLOCK=(16,)),
    ts._bwd_carry: dict(HAS_DFINAL=(False, True), BLOCK=(16,)),
    ts._bwd_positions: dict(MODE=(0, 1, 2), HAS_MASK=(False, True), BLOCK=(16,)),
    td._decode_step: dict(UPDATE=(0, 1, 2), HAS_DECAY=(False, True), NORMALIZE_QK=(False, True), HAS_MASK=(True,),
                          BLOCK=(8,)),
}
target = GPUTarget("cuda", 90, 32)
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
count = 0
for fn, variants in VARIANTS.items():
    names = list(inspect.signature(fn).parameters)
    for values in itertools.product(*variants.values()):
        consts = dict(zip(variants, values))
        signature = {}
        for n in names:
            if n in consts:
                signature[n] = "constexpr"
            elif n in INTS:
                signature[n] = "i32"
            elif n == "eps":
                signature[n] = "fp32"
            elif n == "mask_ptr":
                signature[n] = "*i8"
            else:
                signature[n] = "*bf16" if n in HALF else "*fp32"
        src = ASTSource(fn=JITFunction(fn), signature=signature,
                        constexprs={(names.index(k),): v for k, v in consts.items()})
        cube = fn in (ts._fwd_transition, ts._fwd_carry, ts._bwd_carry)
        warps = ts.WARPS_CUBE if cube else ts.WARPS_TILE
        kernel = triton.compile(src, target=target, options={"num_warps": warps})
        assert kernel.asm["cubin"], fn.__name__
        if os.path.exists(cuobjdump):  # no register spills to local memory
            with tempfile.NamedTemporaryFile("wb", suffix=".cubin") as f:
                f.write(kernel.asm["cubin"])
                f.flush()
                usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
            local = re.search(r"LOCAL:(\d+)", usage)
            assert local is not None and local.group(1) == "0", (fn.__name__, consts, usage)
        count += 1
print("compiled", count)
'''


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "compiled 37" in proc.stdout, proc.stdout
