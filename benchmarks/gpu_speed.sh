#!/usr/bin/env bash
# δ-mem speed and peak GPU memory beside the plain model and the authors' code, on one GPU, in one process
# (docs/speed.md, "On a GPU"). Builds nothing: random-weight Qwen3-4B shapes in bf16, prompts 4k/16k/32k + 256
# greedy tokens, arms plain / ours-torch / ours-triton / theirs. About 3-5 minutes on an H200 (not yet measured).
#
#   OUT=/some/dir THEIRS=/path/to/delta-Mem benchmarks/gpu_speed.sh
#
# OUT: where gpu_speed.json, gpu_speed.log and env.txt go (default ./gpu-speed-out).
# THEIRS: an uncommitted checkout of declare-lab/delta-Mem (the folder holding deltamem/core/delta.py); without
#   it the 'theirs' arm is left out. PROMPTS, DECODE, LIMIT_S, PYTHON override the defaults below; DEVICE=cpu
#   SHAPES=tiny DTYPE=float32 (with TRITON_INTERPRET=1) is a smoke test of this script on a CPU.
# Needs python with torch (CUDA), transformers >= 4.56 and triton; runs from this source tree (no install).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-speed-out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
DEVICE="${DEVICE:-cuda}"
if [ "$DEVICE" = cuda ]; then unset TRITON_INTERPRET; fi

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c 'import sys, torch, transformers, triton; print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda, "| transformers", transformers.__version__, "| triton", triton.__version__)'
} 2>&1 | tee "$OUT/env.txt"

# shellcheck disable=SC2206  # PROMPTS is a space-separated list on purpose
args=(bench speed --device "$DEVICE" --dtype "${DTYPE:-bfloat16}" --shapes "${SHAPES:-qwen3-4b}"
      --prompts ${PROMPTS:-4096 16384 32768}
      --decode-tokens "${DECODE:-256}" --json "$OUT/gpu_speed.json")
if [ -n "${THEIRS:-}" ]; then
  args+=(--theirs "$THEIRS")
fi
set -o pipefail
timeout "${LIMIT_S:-520}" "$PY" -m deltamem_agents.cli "${args[@]}" 2>&1 | tee "$OUT/gpu_speed.log"
