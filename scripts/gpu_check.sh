#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run, for a machine with torch, triton and transformers
# (Ray not needed): the CUDA kernel tests, the expert cache's GPU tier, the GPU actors' staging
# through host memory, then the GPU expert-cache benchmark (25% of the experts in GPU memory,
# against LRU-on-demand and all experts on the CPU). Writes tests.txt and expert_cache_gpu.json
# (with its stderr) under ${OUT:-gpu-check}/. Exits 2 where no CUDA device is visible.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python}
"$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device visible')" || exit 2
out=${OUT:-gpu-check}
mkdir -p "$out"
status=0
"$py" -m pytest -q -p no:cacheprovider -rs tests/kernels tests/experts/test_expert_cache_gpu.py \
    tests/cluster/test_actors_direct.py 2>&1 | tee "$out/tests.txt" || status=1
"$py" bench/expert_cache.py --device cuda --fraction 0.25 >"$out/expert_cache_gpu.json" \
    2>"$out/expert_cache_gpu.err" || status=1
tail -n 3 "$out/expert_cache_gpu.err"
exit $status
