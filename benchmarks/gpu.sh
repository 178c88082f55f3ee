#!/usr/bin/env bash
# One prepared command for a lent GPU: the benchmark figures on Qwen2.5-1.5B-shaped random weights
# in bf16, plus absolute sampling throughput at batch 1 and 64. No weights are downloaded.
#
# The GPU machine has its own CUDA PyTorch and transformers but no peft and no registry access:
# prepare here with  `.venv/bin/pip download --no-deps -d .wheels peft==0.21.2`  (ignored by git),
# then run this with  carry=[".wheels"].  Writes $OUT/bench-gpu.json when $OUT is set.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
if [ -d .wheels ]; then "$PY" -m pip install --quiet --no-deps --no-index .wheels/*.whl; fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
"$PY" -m core bench --random-config benchmarks/qwen2.5-1.5b-config.json --dtype bf16 --device cuda \
  --repeats 5 --tokens 64 --json | tee "${OUT:-/tmp}/bench-gpu.json"
