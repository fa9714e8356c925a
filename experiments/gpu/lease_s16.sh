#!/usr/bin/env bash
# Session 16's lease (experiments/results moved aside during the lease; carry [.whl/core]):
#   call 1  bash experiments/gpu/lease_s15.sh 4      (nvidia-h200: one GPU, the only kind lent)
#           gluon_split_waits timed: no gain (dq -2..+5%, dk/dv -1..+3%), so it stays off; the
#           Gluon GPU tests, 10 of 11 passed before their 150 s limit  -> OUT/s15f.tgz
#   call 2  bash experiments/gpu/lease_s16.sh 2      (nvidia-h200)
#           dq inside the Gluon dk/dv kernel (FUSED_DQ: dS k per step, added by TMA reductions),
#           first run on a GPU: its GPU tests (the Gluon kernels against the Triton ones, the
#           +gluondkv+fused bf16 error cases), then the whole backward by variant at paper settings
#           and (64, 64, 8), 32K-256K: base (GPU_CONFIG: the Gluon dq kernel, the Triton dk/dv),
#           the Gluon dk/dv with fused dq at 232 and 240 consumer registers  -> OUT/s16b.tgz
#   call 3  bash experiments/gpu/lease_s16.sh 3      (nvidia-h200)
#           call 2: all 7 tests passed, but the fused backward 10-13% slower than base at 240
#           registers, 26-35% at 232 (spills: 244 and 440 bytes). The lse and delta rows through
#           the ring (gluon_dkv_row_stats: no spills with fused dq): the whole backward at paper and
#           (64, 64, 8) settings, 32K-128K, base against the Gluon dk/dv (row stats) without and
#           with fused dq, at 232 and 240 registers  -> OUT/s16c.tgz
#   call 4  bash experiments/gpu/lease_s16.sh 4      (nvidia-h200)
#           call 3: row stats made the Gluon dk/dv 2-4% faster than base at paper settings (the
#           backward), even at (64, 64, 8); fused dq now even with base (spills gone), not faster.
#           The dq GEMM issued right behind dv and dk (gluon_dq_early): the GPU tests of the Gluon
#           kernels, the backward sweep again (paper and (64, 64, 8), 32K-128K), then the kernel
#           benchmark at each setting's fastest variant (stage_sweep --pick), then the 7B LoRA+ step
#           at 64K with the paper setting's pick  -> OUT/s16d.tgz
set -uo pipefail
CALL=${1:?usage: lease_s16.sh 2|3|4}
source "$(dirname "$0")/lease_common.sh" "${CTXLAB_CALL_SECONDS:-570}"
day=$(date -u +%F)
case $CALL in
  2)
    R=$OUT/s16b; mkdir -p "$R"
    timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider -rf tests/test_ms_triton.py \
      -k "gluon_kernels_match or fused" > "$R/gpu_tests_fused.log" 2>&1
    tail -n 8 "$R/gpu_tests_fused.log"
    V="base;dkv_gluon=true+fused_dq=true;dkv_gluon=true+fused_dq=true+gluon_dkv_consumer_regs=240"
    for setting in paper sparse; do
      timeout $(( $(left) / 2 - 20 )) python3 -m ctxlab.kernels.bench.stage_sweep --setting $setting \
        --lengths 32K,64K,128K,256K --stages bwd --variants "$V" --out "$R" \
        --stem "stage_sweep_${day}_${card}_s16_fused_dq_$setting" > "$R/sweep_fused_$setting.log" 2>&1
    done
    grep -h -A14 '^| case' "$R"/*.md; tail -n 3 "$R"/sweep_*.log
    tar -czf "$OUT/s16b.tgz" -C "$OUT" s16b && rm -rf "$R"
    ;;
  3)
    R=$OUT/s16c; mkdir -p "$R"
    timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rf tests/test_ms_triton.py \
      -k "gluon_kernels_match" > "$R/gpu_tests_rowstats.log" 2>&1
    tail -n 3 "$R/gpu_tests_rowstats.log"
    G="dkv_gluon=true+gluon_dkv_row_stats=true"
    V="base;$G;$G+fused_dq=true;$G+fused_dq=true+gluon_dkv_consumer_regs=240"
    for setting in paper sparse; do
      timeout $(( $(left) / 2 - 20 )) python3 -m ctxlab.kernels.bench.stage_sweep --setting $setting \
        --lengths 32K,64K,128K --stages bwd --variants "$V" --out "$R" \
        --stem "stage_sweep_${day}_${card}_s16_row_stats_$setting" > "$R/sweep_rowstats_$setting.log" 2>&1
    done
    grep -h -A18 '^| case' "$R"/*.md; tail -n 2 "$R"/sweep_*.log
    tar -czf "$OUT/s16c.tgz" -C "$OUT" s16c && rm -rf "$R"
    ;;
  4)
    R=$OUT/s16d; mkdir -p "$R"
    timeout 140 python3 -m pytest -q -m gpu -p no:cacheprovider -rf tests/test_ms_triton.py \
      -k "gluon_kernels_match" > "$R/gpu_tests_early.log" 2>&1
    tail -n 3 "$R/gpu_tests_early.log"
    G="dkv_gluon=true+gluon_dkv_row_stats=true"
    V="base;$G;$G+fused_dq=true+gluon_dq_early=true;$G+fused_dq=true+gluon_dq_early=true+gluon_dkv_consumer_regs=240"
    pick=()
    for setting in paper sparse; do
      stem="stage_sweep_${day}_${card}_s16_dq_early_$setting"
      timeout 75 python3 -m ctxlab.kernels.bench.stage_sweep --setting $setting \
        --lengths 32K,64K,128K --stages bwd --variants "$V" --out "$R" --stem "$stem" \
        > "$R/sweep_early_$setting.log" 2>&1
      pick+=("$(python3 -m ctxlab.kernels.bench.stage_sweep --pick "$R/$stem.json")")
    done
    echo "picked: paper '${pick[0]}', sparse '${pick[1]}'" | tee "$R/picked.txt"
    stem="ms_attention_${day}_${card}_s16"
    timeout 150 python3 -m ctxlab.kernels.bench.run --preset h100_issue14 --cases paper \
      --ops triton,dense,s2 --launch "${pick[0]}" --out "$R" --stem "${stem}_paper" \
      --time-limit-s 120 > "$R/bench_paper.log" 2>&1
    timeout 90 python3 -m ctxlab.kernels.bench.run --preset h100_issue14 --cases sparse \
      --ops triton,s2 --launch "${pick[1]}" --out "$R" --stem "${stem}_sparse" \
      --time-limit-s 70 > "$R/bench_sparse.log" 2>&1
    grep -h -A10 '^Summary' "$R/${stem}"_*.md 2>/dev/null | cut -c1-400
    if (( $(left) > 150 )); then
      timeout $(( $(left) - 15 )) python3 -m ctxlab.bench.finetune --out "$R" --launch "${pick[0]}" \
        --tag finetune_llama2_7b_H200_1gpu_${day}_s16_64k --lengths 65536 --variants s2,ms \
        --warmup 2 --steps 2 --long-steps 2 > "$R/finetune_64k.log" 2>&1
      grep -h '^\[bench\]' "$R"/finetune_*.log | cut -c1-250
    fi
    grep -h -A18 '^| case' "$R"/stage_sweep_*.md
    tar -czf "$OUT/s16d.tgz" -C "$OUT" s16d && rm -rf "$R"
    ;;
  *) echo "lease_s16.sh: call must be 2, 3 or 4" >&2; exit 2 ;;
esac
