#!/usr/bin/env bash
# Session 11's lease (nvidia-h200-x2; on one H200 run each call's GPU 0 and GPU 1 parts one after
# the other). experiments/results moved aside during the lease; calls follow at once.
#   call 1  carry [.whl/core]   bash experiments/gpu/lease_s11.sh 1
#           GPU 0: the GPU tests of the kernels (dq fused into dk/dv among them), then the whole
#           backward ("bwd": ms_attn_bwd) at paper settings 32K-256K, the dq kernel against dq
#           fused into the dk/dv kernels (LaunchConfig.fused_dq) and its tile variants;
#           GPU 1: the same at (64, 64, 8) with 8 kv heads (atomic path) and 32 (reverse index)
#           -> OUT/kernels.tgz
#   call 2  bash experiments/gpu/lease_s11.sh 2
#           GPU 0: the kernel benchmark at paper settings (ours, det, dense, S2) and (64, 64, 8)
#           with the launch defaults of this commit; GPU 1: the 7B step S2 vs MS at 64K and 128K
#           -> OUT/bench.tgz
#   call 3  carry [.whl/core]   bash experiments/gpu/lease_s11.sh 3
#           GPU 0: the GPU tests of the kernels (whole rows in dk/dv among them), then the
#           (64, 64, 8) benchmark, ours with and without whole rows in dk/dv (whole_dkv);
#           GPU 1: the dk/dv stage and the whole backward by variant (whole_dkv, tiles) at paper
#           settings, then the paper benchmark, ours with and without whole_dkv, dense, S2
#           -> OUT/whole.tgz
#   call 4  carry [.whl/core]   bash experiments/gpu/lease_s11.sh 4
#           GPU 0: the GPU tests of the kernels and the selection with the new defaults
#           (whole_dkv); GPU 1: the paper and (64, 64, 8) benchmarks of ours, fast and
#           deterministic, with them  -> OUT/final.tgz
#   call 5  bash experiments/gpu/lease_s11.sh 5   (one H200): --fit from 512K to 4M with the
#           defaults of this session (whole rows in dk/dv)  -> OUT/fit.tgz
set -uo pipefail
CALL=${1:?usage: lease_s11.sh 1|2|3|4|5}
source "$(dirname "$0")/lease_common.sh" "${CTXLAB_CALL_SECONDS:-560}"
W=/root/s11
mkdir -p "$W/k" "$W/ft"
stem="ms_attention_$(date -u +%F)_${card}_s11"
sweep="stage_sweep_$(date -u +%F)_${card}_s11"
fused="base;fused_dq=true;fused_dq=true+sel_block_n=128+sel_warps=8;fused_dq=true+dkv_block_n=128+dkv_warps=8"
case $CALL in
  1)
    (
      CUDA_VISIBLE_DEVICES=0 timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=8 \
        tests/test_ms_triton.py > "$W/k/gpu_tests.log" 2>&1
      CUDA_VISIBLE_DEVICES=0 timeout $(( $(left) - 15 )) python3 -m ctxlab.kernels.bench.stage_sweep \
        --setting paper --lengths 32K,64K,128K,256K --stages bwd --variants "$fused" --out "$W/k" \
        --stem "${sweep}_paper_bwd" --time-limit-s $(( $(left) - 120 )) > "$W/k/sweep_paper.log" 2>&1
    ) &
    (
      CUDA_VISIBLE_DEVICES=1 timeout 200 python3 -m ctxlab.kernels.bench.stage_sweep --setting sparse \
        --lengths 32K,64K,128K,256K --stages bwd --variants "$fused" --out "$W/k" \
        --stem "${sweep}_sparse_bwd" --time-limit-s 120 > "$W/k/sweep_sparse.log" 2>&1
      CUDA_VISIBLE_DEVICES=1 timeout $(( $(left) - 15 )) python3 -m ctxlab.kernels.bench.stage_sweep \
        --setting sparse --kv-heads 32 --lengths 32K,64K,128K --stages bwd \
        --variants "base;fused_dq=true;fused_dq=true+dkv_block_n=128+dkv_warps=8" --out "$W/k" \
        --stem "${sweep}_sparse_kv32_bwd" --time-limit-s $(( $(left) - 90 )) > "$W/k/sweep_kv32.log" 2>&1
    ) &
    wait
    tail -4 "$W/k/gpu_tests.log"; grep -h -A30 '^| case' "$W/k/"stage_sweep_*.md 2>/dev/null
    tar -czf "$OUT/kernels.tgz" -C "$W/k" . ;;
  2)
    (
      CUDA_VISIBLE_DEVICES=0 timeout $(( $(left) - 15 )) python3 -m ctxlab.kernels.bench.run --preset h100_issue14 \
        --cases paper --ops triton,triton_det,dense,s2 --out "$W/k" --stem "${stem}_paper" \
        --time-limit-s $(( $(left) - 200 )) > "$W/k/bench_paper.log" 2>&1
      CUDA_VISIBLE_DEVICES=0 timeout $(( $(left) - 15 )) python3 -m ctxlab.kernels.bench.run --preset h100_issue14 \
        --cases sparse --ops triton,triton_det,s2 --out "$W/k" --stem "${stem}_sparse" \
        --time-limit-s $(( $(left) - 60 )) > "$W/k/bench_sparse.log" 2>&1
    ) &
    CUDA_VISIBLE_DEVICES=1 timeout $(( $(left) - 15 )) python3 -m ctxlab.bench.finetune --out "$W/ft" \
      --tag finetune_7b_s11 --lengths 65536,131072 --variants s2,ms \
      --warmup 2 --steps 2 --long-steps 2 > "$W/ft/log_gpu1.txt" 2>&1 &
    wait
    grep -h -A8 '^Summary' "$W/k/${stem}"_*.md 2>/dev/null | cut -c1-400
    grep -h '^\[bench\]' "$W/ft/"log_gpu*.txt | cut -c1-300
    tar -czf "$OUT/bench.tgz" -C "$W" k ft ;;
  3)
    (
      CUDA_VISIBLE_DEVICES=0 timeout 330 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=8 \
        tests/test_ms_triton.py > "$W/k/gpu_tests_whole.log" 2>&1
      CUDA_VISIBLE_DEVICES=0 timeout $(( $(left) - 15 )) python3 -m ctxlab.kernels.bench.run --preset h100_issue14 \
        --cases sparse --ops triton,triton:whole_dkv=true,s2 --out "$W/k" --stem "${stem}_whole_sparse" \
        --time-limit-s $(( $(left) - 60 )) > "$W/k/bench_whole_sparse.log" 2>&1
    ) &
    (
      CUDA_VISIBLE_DEVICES=1 timeout 170 python3 -m ctxlab.kernels.bench.stage_sweep --setting paper \
        --lengths 64K,128K,256K --stages dkv,bwd --out "$W/k" --stem "${sweep}_paper_whole" \
        --variants "base;whole_dkv=true;whole_dkv=true+sel_block_n=128+sel_warps=8;whole_dkv=true+dkv_block_n=128+dkv_warps=8" \
        --time-limit-s 110 > "$W/k/sweep_whole.log" 2>&1
      CUDA_VISIBLE_DEVICES=1 timeout $(( $(left) - 15 )) python3 -m ctxlab.kernels.bench.run --preset h100_issue14 \
        --cases paper --ops triton,triton:whole_dkv=true,dense,s2 --out "$W/k" --stem "${stem}_whole_paper" \
        --time-limit-s $(( $(left) - 120 )) > "$W/k/bench_whole_paper.log" 2>&1
    ) &
    wait
    tail -3 "$W/k/gpu_tests_whole.log"; grep -h -A14 '^| case' "$W/k/${sweep}_paper_whole.md"
    grep -h -A10 '^Summary' "$W/k/${stem}"_whole_*.md 2>/dev/null | cut -c1-400
    tar -czf "$OUT/whole.tgz" -C "$W/k" . ;;
  4)
    CUDA_VISIBLE_DEVICES=0 timeout 420 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=8 \
      tests/test_ms_triton.py tests/test_ms_select_exact.py > "$W/k/gpu_tests_final.log" 2>&1 &
    (
      CUDA_VISIBLE_DEVICES=1 timeout $(( $(left) - 15 )) python3 -m ctxlab.kernels.bench.run --preset h100_issue14 \
        --cases paper --ops triton,triton_det --out "$W/k" --stem "${stem}_final_paper" \
        --time-limit-s $(( $(left) - 200 )) > "$W/k/bench_final_paper.log" 2>&1
      CUDA_VISIBLE_DEVICES=1 timeout $(( $(left) - 15 )) python3 -m ctxlab.kernels.bench.run --preset h100_issue14 \
        --cases sparse --ops triton,triton_det --out "$W/k" --stem "${stem}_final_sparse" \
        --time-limit-s $(( $(left) - 60 )) > "$W/k/bench_final_sparse.log" 2>&1
    ) &
    wait
    tail -3 "$W/k/gpu_tests_final.log"
    grep -h -A10 '^Summary' "$W/k/${stem}"_final_*.md 2>/dev/null | cut -c1-400
    tar -czf "$OUT/final.tgz" -C "$W/k" . ;;
  5)
    CUDA_VISIBLE_DEVICES=0 timeout $(( $(left) - 15 )) python3 -m ctxlab.kernels.bench.run --preset h100_issue14 \
      --cases paper-L32K --ops triton --fit 524288,4194304 --out "$W/k" --stem "${stem}_fit" \
      --time-limit-s $(( $(left) - 60 )) > "$W/k/bench_fit.log" 2>&1
    grep -h -A8 'fit' "$W/k/${stem}_fit.md" 2>/dev/null | tail -8
    tar -czf "$OUT/fit.tgz" -C "$W/k" . ;;
  *) echo "lease_s11.sh: call must be 1-5" >&2; exit 2 ;;
esac
ls -la "$OUT"
