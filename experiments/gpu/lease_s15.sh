#!/usr/bin/env bash
# Session 15's lease (experiments/results moved aside during the lease; carry [.whl/core]):
#   call 1  bash experiments/gpu/lease_s15.sh 1      (nvidia-h200: one GPU, the only kind lent)
#           the Gluon dk/dv of the selected keys (dkv_gluon) on the GPU for the first time: the
#           Gluon GPU tests (its kernels against the Triton ones, the +gluondkv bf16 error cases),
#           then the dk/dv stage sweep at paper settings and at (64, 64, 8), 32K-256K: base
#           (GPU_CONFIG), dkv_gluon at 2 and 3 slots; then the Gluon dq at 64-key steps
#           (gluon_dq_block_n) at paper 64K-128K  -> OUT/s15a.tgz
#   call 2  bash experiments/gpu/lease_s15.sh 2      (nvidia-h200)
#           call 1: dkv_gluon no faster than the Triton dk/dv (paper -2..+1%, (64, 64, 8) 1-6%
#           slower), so it stays off, and 64-key Gluon dq steps no gain. The kernel benchmark with
#           the Gluon forward and dq (GPU_CONFIG), never timed together: paper settings (ours,
#           dense, S2), then (64, 64, 8) (ours, S2)  -> OUT/s15b.tgz
#   call 3  bash experiments/gpu/lease_s15.sh 3      (nvidia-h200)
#           all GPU tests of the kernels (bwd_dkv's launch refactored), then the 7B LoRA+ step at
#           64K and 128K, S2 and MS  -> OUT/s15c.tgz
#   (inline) the four selection GPU tests, then the deterministic mode at paper settings; the dk/dv
#           stage on the partial path, Triton and Gluon; Nsight Compute of both dk/dv kernels at paper
#           64K (the commands are in kernels/README.md, session 15)
#   call 4  bash experiments/gpu/lease_s15.sh 4      (nvidia-h200; NOT run: the next lease's first)
#           gluon_split_waits: the Gluon GPU tests, then dq and dk/dv stage sweeps at paper and
#           (64, 64, 8), 32K-256K: base, split waits (Gluon dq), Gluon dk/dv with split waits
#           -> OUT/s15f.tgz
set -uo pipefail
CALL=${1:?usage: lease_s15.sh 1|2|3|4}
source "$(dirname "$0")/lease_common.sh" "${CTXLAB_CALL_SECONDS:-570}"
day=$(date -u +%F)
case $CALL in
  1)
    R=$OUT/s15a; mkdir -p "$R"
    V="base;dkv_gluon=true;dkv_gluon=true+gluon_dkv_stages=3"
    timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rf tests/test_ms_triton.py \
      -k gluon > "$R/gpu_tests_gluon.log" 2>&1
    tail -n 6 "$R/gpu_tests_gluon.log"
    for setting in paper sparse; do
      timeout $(( $(left) / 2 - 30 )) python3 -m ctxlab.kernels.bench.stage_sweep --setting $setting \
        --lengths 32K,64K,128K,256K --stages dkv --variants "$V" --out "$R" \
        --stem "stage_sweep_${day}_${card}_s15_gluon_dkv_$setting" > "$R/sweep_dkv_$setting.log" 2>&1
    done
    timeout $(( $(left) - 15 )) python3 -m ctxlab.kernels.bench.stage_sweep --setting paper \
      --lengths 64K,128K --stages dq --variants "base;gluon_dq_block_n=64+gluon_dq_stages=3" --out "$R" \
      --stem "stage_sweep_${day}_${card}_s15_gluon_dq64_paper" > "$R/sweep_dq64_paper.log" 2>&1
    grep -h -A12 '^| case' "$R"/*.md; tail -n 3 "$R"/sweep_*.log
    tar -czf "$OUT/s15a.tgz" -C "$OUT" s15a && rm -rf "$R"
    ;;
  2)
    R=$OUT/s15b; mkdir -p "$R"
    stem="ms_attention_${day}_${card}_s15"
    timeout $(( $(left) / 2 + 60 )) python3 -m ctxlab.kernels.bench.run --preset h100_issue14 \
      --cases paper --ops triton,dense,s2 --out "$R" --stem "${stem}_paper" \
      --time-limit-s $(( $(left) / 2 + 30 )) > "$R/bench_paper.log" 2>&1
    timeout $(( $(left) - 15 )) python3 -m ctxlab.kernels.bench.run --preset h100_issue14 \
      --cases sparse --ops triton,s2 --out "$R" --stem "${stem}_sparse" \
      --time-limit-s $(( $(left) - 40 )) > "$R/bench_sparse.log" 2>&1
    grep -h -A10 '^Summary' "$R/${stem}"_*.md 2>/dev/null | cut -c1-400; tail -n 2 "$R"/bench_*.log
    tar -czf "$OUT/s15b.tgz" -C "$OUT" s15b && rm -rf "$R"
    ;;
  3)
    R=$OUT/s15c; mkdir -p "$R"
    timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --durations=8 tests/test_ms_triton.py \
      > "$R/gpu_tests.log" 2>&1
    tail -n 4 "$R/gpu_tests.log"
    timeout $(( $(left) - 15 )) python3 -m ctxlab.bench.finetune --out "$R" \
      --tag finetune_llama2_7b_H200_1gpu_${day}_s15_64k_128k --lengths 65536,131072 --variants s2,ms \
      --warmup 2 --steps 2 --long-steps 2 > "$R/finetune_64k_128k.log" 2>&1
    grep -h '^\[bench\]' "$R"/finetune_*.log | cut -c1-250
    tar -czf "$OUT/s15c.tgz" -C "$OUT" s15c && rm -rf "$R"
    ;;
  4)
    # Not run in session 15 (its device time was spent): the next lease's first call.
    R=$OUT/s15f; mkdir -p "$R"
    timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rf tests/test_ms_triton.py \
      -k gluon > "$R/gpu_tests_gluon.log" 2>&1
    tail -n 6 "$R/gpu_tests_gluon.log"
    for setting in paper sparse; do
      timeout $(( $(left) / 2 - 20 )) python3 -m ctxlab.kernels.bench.stage_sweep --setting $setting \
        --lengths 32K,64K,128K,256K --stages dq,dkv \
        --variants "base;gluon_split_waits=true;dkv_gluon=true+gluon_split_waits=true" --out "$R" \
        --stem "stage_sweep_${day}_${card}_split_waits_$setting" > "$R/sweep_split_$setting.log" 2>&1
    done
    grep -h -A14 '^| case' "$R"/*.md
    tar -czf "$OUT/s15f.tgz" -C "$OUT" s15f && rm -rf "$R"
    ;;
  *) echo "lease_s15.sh: call must be 1, 2, 3 or 4" >&2; exit 2 ;;
esac
