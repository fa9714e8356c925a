#!/usr/bin/env bash
# Issue 14's kernel measurements on one GPU, in one call (after `source experiments/gpu/device_env.sh`):
#   bash experiments/gpu/kernels_issue14.sh OUT [SECONDS]
# 1. the GPU tests of the MS kernels at real sizes (outputs and every gradient against the PyTorch
#    path, tie-heavy selections, deterministic mode's bits);
# 2. the kernel benchmark, dense / S2 / gather / ours / ours deterministic side by side at
#    32K-256K (preset h100_issue14), then the longest length whose forward + backward fits
#    (doubling from 256K), all within SECONDS (default 480) in total.
# Everything lands in OUT/kernels.tgz (the test log, the benchmark's JSON and Markdown).
set -uo pipefail
OUT=${1:?usage: kernels_issue14.sh OUT [SECONDS]}
BUDGET=${2:-480}
DIR=$OUT/kernels_work
mkdir -p "$DIR"
t0=$(date +%s)
card=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
stem="ms_attention_$(date -u +%F)_${card}"
timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=5 \
  tests/test_ms_triton.py tests/test_ms_select_exact.py > "$DIR/gpu_tests_${stem}.log" 2>&1
echo "gpu tests: rc=$? ($(tail -1 "$DIR/gpu_tests_${stem}.log"))"
left=$((BUDGET - ($(date +%s) - t0)))
# Cases start only while there is time for one more (a 256K case with every op takes about a minute).
timeout $((left > 30 ? left - 10 : 20)) python3 -m ctxlab.kernels.bench.run --preset h100_issue14 \
  --ops gather,triton,triton_det,dense,s2 --out "$DIR" --stem "$stem" \
  --time-limit-s $((left > 150 ? left - 150 : 1)) --fit 262144,4194304 > "$DIR/bench_${stem}.log" 2>&1
echo "bench: rc=$?"
tail -5 "$DIR/bench_${stem}.log"
grep -A20 '^Summary' "$DIR/$stem.md" 2>/dev/null | head -16
tar -czf "$OUT/kernels.tgz" -C "$DIR" . && rm -rf "$DIR"
