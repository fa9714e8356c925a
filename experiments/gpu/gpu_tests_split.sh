#!/usr/bin/env bash
# The GPU tests of the kernels split over three GPUs (nvidia-h200-x4 or -x2 with the third part
# after the first), for a short call at the end of a lease (session 13: 27 passed in 12 s once the
# machine's Triton cache was warm). carry [.whl/core]; logs in OUT/t0.log, t1.log, t2.log.
source experiments/gpu/device_env.sh >/dev/null 2>&1
mkdir -p "$OUT"
CUDA_VISIBLE_DEVICES=0 timeout 230 python3 -m pytest -v -m gpu -p no:cacheprovider tests/test_ms_triton.py \
  -k "select_matches_torch" > "$OUT/t0.log" 2>&1 &
CUDA_VISIBLE_DEVICES=1 timeout 230 python3 -m pytest -v -m gpu -p no:cacheprovider tests/test_ms_triton.py \
  -k "not select_matches_torch" > "$OUT/t1.log" 2>&1 &
CUDA_VISIBLE_DEVICES=2 timeout 230 python3 -m pytest -v -m gpu -p no:cacheprovider tests/test_ms_select_exact.py \
  > "$OUT/t2.log" 2>&1 &
wait; tail -n 2 "$OUT"/t*.log; grep -h -E "PASSED|FAILED" "$OUT"/t*.log | wc -l
