#!/usr/bin/env bash
# One prepared command for a lent GPU: the benchmark figures on Qwen2.5-1.5B-shaped random weights
# in bf16, plus absolute sampling throughput at batch 1 and 64. No weights are downloaded.
#
# The GPU machine has its own CUDA PyTorch and transformers but no peft and no registry access:
# prepare here with  `.venv/bin/pip download --no-deps -d .wheels peft==0.21.2`  (ignored by git),
# then run this with  carry=[".wheels"].  Writes $OUT/static-decode-gpu.json and $OUT/bench-gpu.json
# when $OUT is set (else under /tmp); a part that fails does not stop the next, but fails the script.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
RESULTS=${OUT:-/tmp}
export PYTHONUNBUFFERED=1
if [ -d .wheels ]; then "$PY" -m pip install --quiet --no-deps --no-index .wheels/*.whl; fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
status=0
# The interactive path: batch-1 steered decoding, the eager loop (dynamic KV cache) against the static
# KV cache with a compiled step (CUDA graphs), and the logits of the two along the same tokens. A few
# minutes, most of them compiling.
"$PY" -m benchmarks.static_decode --random-config benchmarks/qwen2.5-1.5b-config.json --dtype bf16 \
  --device cuda --tokens 128 --repeats 3 --json | tee "$RESULTS/static-decode-gpu.json" || status=1
"$PY" -m core bench --random-config benchmarks/qwen2.5-1.5b-config.json --dtype bf16 --device cuda \
  --repeats 5 --tokens 64 --json | tee "$RESULTS/bench-gpu.json" || status=1
exit "$status"
