#!/usr/bin/env bash
# The lease of session 21 (nvidia-h200, one GPU; experiments/results moved aside during the lease;
# carry [.whl/core]).
#   call 1  bash experiments/gpu/lease_s21.sh 1
#           the fused dq finished by the dq kernel (fused_dq_finish: the Gluon dk/dv of the
#           selected keys adds their dS k by TMA reductions, the own-segment Triton kernel none, and
#           the Gluon dq kernel runs the own segment's steps only and adds the buffer): GPU tests
#           (the Gluon match tests, which now also finish a fused dq by both dq kernels; the fused
#           bf16 error cases, one with the own segment's atomics); the whole backward, base against
#           fused (232 and 240 registers), paper 64K (32 kv heads, the 7B's shape), paper 64K-128K
#           (8), (64, 64, 8) 32K; the old fused path (the own segment's dq by atomics) at paper 64K
#           with 32 kv heads  -> OUT/s21a.tgz
#           (ran on 2f92f50: paper 64K kv32 backward 51.32 -> 47.72 ms with 240 registers (fused
#           232: 49.51; the own segment's dq by atomics: 54.58); kv8 64K 50.15 -> 47.12, 128K
#           104.71 -> 101.00; (64, 64, 8) 32K 14.12 -> 14.30; 6 GPU tests passed, 2 cut by 200 s)
#   call 2  bash experiments/gpu/lease_s21.sh 2 LAUNCH
#           target 4 with LAUNCH (the best of call 1, e.g. fused_dq=true+gluon_dkv_consumer_regs=240):
#           the 7B LoRA+ step at 64K, S2 and MS in one process, 2 warm-ups + 2 timed steps and one
#           profiled step each  -> OUT/s21b.tgz
#           (ran on 2f92f50 with fused_dq=true+gluon_dkv_consumer_regs=240: S2 9.054, MS 9.025 s a
#           step (1.003x); MS attention backward 1,733 ms a step against 1,828)
#   call 3  bash experiments/gpu/lease_s21.sh 3
#           the new GPU default (fused dq where a block has >= 1024 rows, 240 registers, finished by
#           the dq kernel): GPU tests (the default at a paper-sized block, the fused bf16 cases, the
#           paper-settings match test); target 4 at 128K (2 warm-ups + 2 timed steps each)
#           -> OUT/s21c.tgz
#           (ran on ba4f0a8: 7 GPU tests passed; 7B 128K S2 22.356, MS 17.994 s: 1.24x)
#   call 4  bash experiments/gpu/lease_s21.sh 4
#           target 4 at 64K again on the default (3 timed steps each), then the kernel benchmark's
#           paper cases at 64K-128K with dense and S2 (target 2: ours + sel against the bound), as
#           time allows  -> OUT/s21d.tgz
#           (ran on ba4f0a8: 7B 64K S2 8.926, MS 8.894 s (1.004x; every MS step faster); ours + sel
#           66.1 / 139.0 ms at paper 64K / 128K, 1.35 / 1.34x the bound, 0.93 / 1.68x S2)
#   call 5  bash experiments/gpu/lease_s21.sh 5
#           target 2 at 256K: the kernel benchmark's paper case with dense and S2  -> OUT/s21e.tgz
#           (ran on ba4f0a8's kernels: ours + sel 289.6 ms, 1.36x the bound, 3.13x S2)
#   call 6  bash experiments/gpu/lease_s21.sh 6   (written for the next lease, not run)
#           Nsight Compute of the whole default backward at paper 64K with 32 kv heads (the fused
#           Gluon dk/dv at 240 registers, the own-segment Triton dk/dv, the dq kernel finishing dq:
#           where the fused kernel's dq time goes, and what the two own-segment launches cost); then
#           target 4 at 64K with 5 timed steps each (the margin was 0.3-0.4% in two runs of 2-3)
#           -> OUT/s21f.tgz
#   call 7  bash experiments/gpu/lease_s21.sh 7   (written for the next lease, not run)
#           target 5 on the new default: the longest length that fits, 512K-4M, paper settings
#           (the fused path's float32 dq buffer is twice q's bytes; where it does not fit the dq
#           kernel runs instead: the lengths must be session 18's, 2M in 96.9 GiB)  -> OUT/s21g.tgz
set -uo pipefail
CALL=${1:?usage: lease_s21.sh 1-7 [LAUNCH]}
LAUNCH=${2:-}
source "$(dirname "$0")/lease_common.sh" "${CTXLAB_CALL_SECONDS:-570}"
day=$(date -u +%F)
case $CALL in
  1)
    R=$OUT/s21a; mkdir -p "$R"
    timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider -rf tests/test_ms_triton.py \
      -k "gluon_kernels_match or (bf16_error and fused)" > "$R/gpu_tests_finish.log" 2>&1
    tail -n 4 "$R/gpu_tests_finish.log"
    base="base;fused_dq=true;fused_dq=true+gluon_dkv_consumer_regs=240"
    sweep_cases "$R" bwd "$base;fused_dq=true+fused_dq_finish=false" "stage_sweep_${day}_${card}_s21_bwd_finish" 100 \
      "paper 32 64K"
    sweep_cases "$R" bwd "$base" "stage_sweep_${day}_${card}_s21_bwd_finish" \
      $(( ($(left) - 20) / 2 )) "paper 8 64K,128K" "sparse 8 32K"
    grep -h -A8 '^| case' "$R"/*.md
    tar -czf "$OUT/s21a.tgz" -C "$OUT" s21a && rm -rf "$R"
    ;;
  2)
    R=$OUT/s21b; mkdir -p "$R"
    timeout $(( $(left) - 20 )) python3 -m ctxlab.bench.finetune --out "$R" --profile ${LAUNCH:+--launch "$LAUNCH"} \
      --tag finetune_llama2_7b_H200_1gpu_${day}_s21_64k --lengths 65536 --variants s2,ms \
      --warmup 2 --steps 2 --long-steps 2 > "$R/finetune_64k.log" 2>&1
    grep -h '^\[bench\]' "$R"/finetune_*.log | cut -c1-200
    grep -h -A14 '^Profiled step' "$R"/*.md | cut -c1-300
    tar -czf "$OUT/s21b.tgz" -C "$OUT" s21b && rm -rf "$R"
    ;;
  3)
    R=$OUT/s21c; mkdir -p "$R"
    timeout 170 python3 -m pytest -q -m gpu -p no:cacheprovider -rf tests/test_ms_triton.py \
      -k "(bf16_error and (default or fused)) or (gluon_kernels_match and paper)" > "$R/gpu_tests_defaults.log" 2>&1
    tail -n 4 "$R/gpu_tests_defaults.log"
    timeout $(( $(left) - 20 )) python3 -m ctxlab.bench.finetune --out "$R" ${LAUNCH:+--launch "$LAUNCH"} \
      --tag finetune_llama2_7b_H200_1gpu_${day}_s21_128k --lengths 131072 --variants s2,ms \
      --warmup 2 --steps 2 --long-steps 2 > "$R/finetune_128k.log" 2>&1
    grep -h '^\[bench\]' "$R"/finetune_*.log | cut -c1-200
    tar -czf "$OUT/s21c.tgz" -C "$OUT" s21c && rm -rf "$R"
    ;;
  4)
    R=$OUT/s21d; mkdir -p "$R"
    timeout 240 python3 -m ctxlab.bench.finetune --out "$R" ${LAUNCH:+--launch "$LAUNCH"} \
      --tag finetune_llama2_7b_H200_1gpu_${day}_s21_64k_defaults --lengths 65536 --variants s2,ms \
      --warmup 2 --steps 3 --long-steps 3 > "$R/finetune_64k_defaults.log" 2>&1
    grep -h '^\[bench\]' "$R"/finetune_*.log | cut -c1-200
    stem="ms_attention_${day}_${card}_s21"
    timeout $(( $(left) - 15 )) python3 -m ctxlab.kernels.bench.run --preset h100_issue14 \
      --cases paper-L64K,paper-L128K --ops triton,dense,s2 ${LAUNCH:+--launch "$LAUNCH"} --out "$R" \
      --stem "${stem}_paper" --time-limit-s $(( $(left) - 60 )) > "$R/bench_paper.log" 2>&1
    grep -h -A10 '^Summary' "$R/${stem}"_*.md 2>/dev/null | cut -c1-400
    tar -czf "$OUT/s21d.tgz" -C "$OUT" s21d && rm -rf "$R"
    ;;
  5)
    R=$OUT/s21e; mkdir -p "$R"
    stem="ms_attention_${day}_${card}_s21"
    timeout $(( $(left) - 15 )) python3 -m ctxlab.kernels.bench.run --preset h100_issue14 \
      --cases paper-L256K --ops triton,dense,s2 --out "$R" --stem "${stem}_paper256k" \
      > "$R/bench_paper256k.log" 2>&1
    grep -h -A6 '^Summary' "$R/${stem}"_*.md 2>/dev/null | cut -c1-400
    tar -czf "$OUT/s21e.tgz" -C "$OUT" s21e && rm -rf "$R"
    ;;
  6)
    R=$OUT/s21f; mkdir -p "$R/ncu"
    ncu_stage "$R/ncu" paper_64K_kv32_bwd 'ms_attn_bwd_dkv_sel_ws_kernel|ms_attn_bwd_dkv_kernel|ms_attn_bwd_dq_ws_kernel' \
      3 3 200 --setting paper --length 64K --kv-heads 32 --stage bwd
    python3 -m ctxlab.kernels.bench.ncu_summary "$R/ncu" --out "$R/ncu/ncu_summary.md" > /dev/null 2>&1
    grep -h "Duration" "$R/ncu/ncu_summary.md" | cut -c1-200
    timeout $(( $(left) - 20 )) python3 -m ctxlab.bench.finetune --out "$R" \
      --tag finetune_llama2_7b_H200_1gpu_${day}_s21_64k_5steps --lengths 65536 --variants s2,ms \
      --warmup 2 --steps 5 --long-steps 5 > "$R/finetune_64k_5steps.log" 2>&1
    grep -h '^\[bench\]' "$R"/finetune_*.log | cut -c1-200
    tar -czf "$OUT/s21f.tgz" -C "$OUT" s21f && rm -rf "$R"
    ;;
  7)
    R=$OUT/s21g; mkdir -p "$R"
    timeout $(( $(left) - 15 )) python3 -m ctxlab.kernels.bench.run --preset h100_issue14 \
      --cases paper-L32K --ops triton --fit 524288,4194304 --out "$R" --stem "ms_attention_${day}_${card}_s21_fit" \
      --time-limit-s $(( $(left) - 60 )) > "$R/bench_fit.log" 2>&1
    grep -h -A8 'fit' "$R"/*_fit.md 2>/dev/null | tail -8
    tar -czf "$OUT/s21g.tgz" -C "$OUT" s21g && rm -rf "$R"
    ;;
esac
