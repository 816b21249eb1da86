#!/usr/bin/env bash
# The GPU checks of one short device session, in the order they pay off (each capped, so one that hangs leaves time
# for the rest; about 6 minutes in all on an H100/H200). Writes its logs to $OUT (or ./gpu-logs).
#   1. the CUDA-only tests: attention with cuDNN first against PyTorch's order, CUDA graphs against eager;
#   2. bench/profile_cuda.py: attention per backend, the step (eager, per backend, compiled), kernels, VAE decode;
#   3. bench/speed.py at 1024², 20 steps, against diffusers fp16 eager: eager rows, then compiled rows.
# The machine has PyTorch but not diffusers: carry its wheels (and importlib_metadata's) in .whl, as
# /work/.library/device/README.md describes; this script installs them to /tmp/site when .whl exists.
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p "${OUT:-gpu-logs}"
OUT=$(cd "${OUT:-gpu-logs}" && pwd)
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_transformer.py tests/test_cuda_graphs.py \
    -k "cuda or gpu" 2>&1 | tail -15 | tee "$OUT/tests.log"
cd bench
timeout 150 python3 profile_cuda.py --runs 10 2>&1 | grep -v -i warn | tee "$OUT/profile.log"
S="python3 speed.py --device cuda --sizes 1024 --steps 20 --parts image --repeats 3"
timeout 150 $S --options default cache-fast cuda-graphs fp8+cuda-graphs 2>&1 | tee "$OUT/eager.log"
timeout 150 $S --compile --options default cache-fast 2>&1 | tee "$OUT/compiled.log"
