#!/usr/bin/env bash
# The next lease after session 17 (nvidia-h200, one GPU; experiments/results moved aside during
# the lease; carry [.whl/core]). Calls 1-2 ran on 2787ead, 3-4 on the commit that added them.
#   call 1  bash experiments/gpu/lease_s18.sh 1
#           dq inside the Gluon dk/dv after session 17's change (the padding places' zeroing of
#           dS^T only in chunks that hold any: no byte permutes in the sm_90 code, compiled, not run
#           on a GPU): the GPU tests of the Gluon kernels and the fused bf16 error cases first; then
#           Nsight Compute of the fused kernel at paper 64K (beside session 17's 36.68 ms and 9.74 G
#           instructions); then the whole backward, base (GPU_CONFIG) against fused dq at 232 and
#           240 consumer registers, paper 32K-128K  -> OUT/s18a.tgz
#   call 2  bash experiments/gpu/lease_s18.sh 2
#           target 4 with session 17's selection (16 of 64, the retry): the 7B LoRA+ step at 64K
#           and 128K, MS and S2 in one process; then the (64, 64, 8) benchmark with the retry
#           -> OUT/s18b.tgz
#   call 3  bash experiments/gpu/lease_s18.sh 3
#           dq inside the Gluon dk/dv without a select or a multiply in the steps (the padding
#           zeroing a branch on shared memory, dq summed unscaled and scaled once): the fused GPU
#           tests; Nsight Compute of the fused kernel at paper 64K; the backward, base against fused
#           dq at 232 and 240 registers, paper 32K-128K with 8 kv heads and 64K-128K with 32 (the
#           7B's shape), (64, 64, 8) 32K  -> OUT/s18c.tgz
#   call 4  bash experiments/gpu/lease_s18.sh 4
#           (call 3 showed the fused backward no faster, so the 7B step with it was dropped) target 5
#           under the session-17 selection: the longest length that fits, 512K-4M, paper settings,
#           forward + backward with the selection  -> OUT/s18d.tgz
#   call 5  bash experiments/gpu/lease_s18.sh 5
#           the kernel benchmark at the 7B's head shape (32 query and 32 kv heads), paper 64K and
#           128K, MS against S2: target 4's attention alone  -> OUT/s18e.tgz
#   call 6  bash experiments/gpu/lease_s18.sh 6
#           target 3b's case: Nsight Compute of the dk/dv stage (the Gluon kernel of the selected
#           keys and the own-segment Triton kernel) and of dq at (64, 64, 8) 32K  -> OUT/s18f.tgz
set -uo pipefail
CALL=${1:?usage: lease_s18.sh 1-6}
source "$(dirname "$0")/lease_common.sh" "${CTXLAB_CALL_SECONDS:-570}"
day=$(date -u +%F)
case $CALL in
  1)
    R=$OUT/s18a; mkdir -p "$R/ncu"
    timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider -rf tests/test_ms_triton.py \
      -k "gluon_kernels_match or fused" > "$R/gpu_tests_fused.log" 2>&1
    tail -n 4 "$R/gpu_tests_fused.log"
    ncu_stage "$R/ncu" paper_64K_dkvdq_gluon ms_attn_bwd_dkv_sel_ws_kernel 1 1 100 \
      --setting paper --length 64K --stage dkvdq
    python3 -m ctxlab.kernels.bench.ncu_summary "$R/ncu" --out "$R/ncu/ncu_summary.md" > /dev/null 2>&1
    head -n 4 "$R/ncu/ncu_summary.md"
    V="base;fused_dq=true;fused_dq=true+gluon_dkv_consumer_regs=240"
    timeout $(( $(left) - 20 )) python3 -m ctxlab.kernels.bench.stage_sweep --setting paper \
      --lengths 32K,64K,128K --stages bwd --variants "$V" --out "$R" \
      --stem "stage_sweep_${day}_${card}_s18_fused_dq_paper" > "$R/sweep_fused_paper.log" 2>&1
    grep -h -A8 '^| case' "$R"/*.md
    tar -czf "$OUT/s18a.tgz" -C "$OUT" s18a && rm -rf "$R"
    ;;
  2)
    R=$OUT/s18b; mkdir -p "$R"
    timeout 420 python3 -m ctxlab.bench.finetune --out "$R" \
      --tag finetune_llama2_7b_H200_1gpu_${day}_s18_64k_128k --lengths 65536,131072 --variants s2,ms \
      --warmup 2 --steps 2 --long-steps 2 > "$R/finetune_64k_128k.log" 2>&1
    grep -h '^\[bench\]' "$R"/finetune_*.log | cut -c1-250
    stem="ms_attention_${day}_${card}_s18"
    timeout $(( $(left) - 15 )) python3 -m ctxlab.kernels.bench.run --preset h100_issue14 \
      --cases sparse --ops triton,s2 --out "$R" --stem "${stem}_sparse" \
      --time-limit-s $(( $(left) - 60 )) > "$R/bench_sparse.log" 2>&1
    grep -h -A10 '^Summary' "$R/${stem}"_*.md 2>/dev/null | cut -c1-400
    tar -czf "$OUT/s18b.tgz" -C "$OUT" s18b && rm -rf "$R"
    ;;
  3)
    R=$OUT/s18c; mkdir -p "$R/ncu"
    timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider -rf tests/test_ms_triton.py \
      -k "gluon_kernels_match or fused" > "$R/gpu_tests_fused.log" 2>&1
    tail -n 4 "$R/gpu_tests_fused.log"
    ncu_stage "$R/ncu" paper_64K_dkvdq_gluon ms_attn_bwd_dkv_sel_ws_kernel 1 1 100 \
      --setting paper --length 64K --stage dkvdq
    python3 -m ctxlab.kernels.bench.ncu_summary "$R/ncu" --out "$R/ncu/ncu_summary.md" > /dev/null 2>&1
    head -n 4 "$R/ncu/ncu_summary.md"
    V="base;fused_dq=true;fused_dq=true+gluon_dkv_consumer_regs=240"
    timeout 150 python3 -m ctxlab.kernels.bench.stage_sweep --setting paper \
      --lengths 32K,64K,128K --stages bwd --variants "$V" --out "$R" \
      --stem "stage_sweep_${day}_${card}_s18_fused_dq2_paper" > "$R/sweep_fused_paper.log" 2>&1
    timeout 100 python3 -m ctxlab.kernels.bench.stage_sweep --setting paper --kv-heads 32 \
      --lengths 64K,128K --stages bwd --variants "$V" --out "$R" \
      --stem "stage_sweep_${day}_${card}_s18_fused_dq2_paper_kv32" > "$R/sweep_fused_kv32.log" 2>&1
    timeout $(( $(left) - 15 )) python3 -m ctxlab.kernels.bench.stage_sweep --setting sparse \
      --lengths 32K,64K --stages bwd --variants "base;fused_dq=true" --out "$R" \
      --stem "stage_sweep_${day}_${card}_s18_fused_dq2_sparse" > "$R/sweep_fused_sparse.log" 2>&1
    grep -h -A12 '^| case' "$R"/*.md
    tar -czf "$OUT/s18c.tgz" -C "$OUT" s18c && rm -rf "$R"
    ;;
  4)
    R=$OUT/s18d; mkdir -p "$R"
    timeout $(( $(left) - 15 )) python3 -m ctxlab.kernels.bench.run --preset h100_issue14 \
      --cases paper-L32K --ops triton --fit 524288,4194304 --out "$R" --stem "ms_attention_${day}_${card}_s18_fit" \
      --time-limit-s $(( $(left) - 60 )) > "$R/bench_fit.log" 2>&1
    grep -h -A8 'fit' "$R"/*_fit.md 2>/dev/null | tail -8
    tar -czf "$OUT/s18d.tgz" -C "$OUT" s18d && rm -rf "$R"
    ;;
  5)
    R=$OUT/s18e; mkdir -p "$R"
    timeout $(( $(left) - 15 )) python3 -m ctxlab.kernels.bench.run --preset h100 \
      --cases paper-L64K-kv32,paper-L128K-kv32 --ops triton,s2 --out "$R" \
      --stem "ms_attention_${day}_${card}_s18_paper_kv32" --time-limit-s $(( $(left) - 60 )) \
      > "$R/bench_kv32.log" 2>&1
    grep -h -A6 '^Summary' "$R"/*.md 2>/dev/null | cut -c1-400
    tar -czf "$OUT/s18e.tgz" -C "$OUT" s18e && rm -rf "$R"
    ;;
  6)
    R=$OUT/s18f; mkdir -p "$R/ncu"
    # the dk/dv stage launches the selected keys' kernel, then the own segment's
    ncu_stage "$R/ncu" sparse_32K_dkv ms_attn_bwd_dkv 2 2 120 --setting sparse --length 32K --stage dkv
    ncu_stage "$R/ncu" sparse_32K_dq ms_attn_bwd_dq 1 1 120 --setting sparse --length 32K --stage dq
    python3 -m ctxlab.kernels.bench.ncu_summary "$R/ncu" --out "$R/ncu/ncu_summary.md" > /dev/null 2>&1
    grep -h "^- [0-9]" "$R/ncu/ncu_summary.md" | cut -c1-300
    tar -czf "$OUT/s18f.tgz" -C "$OUT" s18f && rm -rf "$R"
    ;;
  *) echo "lease_s18.sh: call must be 1-6" >&2; exit 2 ;;
esac
