#!/usr/bin/env bash
# The lease of session 20 (nvidia-h200, one GPU; experiments/results moved aside during the lease;
# carry [.whl/core]).
#   call 1  bash experiments/gpu/lease_s20.sh 1
#           the Gluon dk/dv of the selected keys as persistent programs (gluon_dkv_persistent: one
#           program per SM whose load warpgroup copies the next chunk's k and v rows while the
#           consumers finish the current one): the dk/dv stage, base against persistent, paper 64K
#           (32 kv heads, the 7B's shape), paper 64K-128K (8), (64, 64, 8) 32K-64K; then the Gluon
#           GPU match tests (the persistent partial sums must equal the default's bits)
#           -> OUT/s20a.tgz
#   call 2  bash experiments/gpu/lease_s20.sh 2
#           the two persistent bf16 error cases (whole forward and backward against PyTorch's
#           error); target 4 with it: the 7B LoRA+ step at 64K, S2 and MS (persistent dk/dv, the
#           selection's counts unspecialized) in one process, 2 warm-ups + 2 timed steps and one
#           profiled step each; then the whole backward, base against persistent, paper 32K-128K
#           and (64, 64, 8) 32K  -> OUT/s20b.tgz
set -uo pipefail
CALL=${1:?usage: lease_s20.sh 1-2}
source "$(dirname "$0")/lease_common.sh" "${CTXLAB_CALL_SECONDS:-570}"
day=$(date -u +%F)
case $CALL in
  1)
    R=$OUT/s20a; mkdir -p "$R"
    sweep_cases "$R" dkv "base;gluon_dkv_persistent=true" "stage_sweep_${day}_${card}_s20_dkv_persistent" 100 \
      "paper 32 64K" "paper 8 64K,128K" "sparse 8 32K,64K"
    grep -h -A8 '^| case' "$R"/*.md
    timeout $(( $(left) - 15 )) python3 -m pytest -q -m gpu -p no:cacheprovider -rf tests/test_ms_triton.py \
      -k "gluon_kernels_match" > "$R/gpu_tests_persistent.log" 2>&1
    tail -n 4 "$R/gpu_tests_persistent.log"
    tar -czf "$OUT/s20a.tgz" -C "$OUT" s20a && rm -rf "$R"
    ;;
  2)
    R=$OUT/s20b; mkdir -p "$R"
    timeout 90 python3 -m pytest -q -m gpu -p no:cacheprovider -rf tests/test_ms_triton.py \
      -k "bf16_error and persistent" > "$R/gpu_tests_persistent_bf16.log" 2>&1
    tail -n 2 "$R/gpu_tests_persistent_bf16.log"
    timeout 360 python3 -m ctxlab.bench.finetune --out "$R" --profile --launch gluon_dkv_persistent=true \
      --tag finetune_llama2_7b_H200_1gpu_${day}_s20_64k_persistent --lengths 65536 --variants s2,ms \
      --warmup 2 --steps 2 --long-steps 2 > "$R/finetune_64k_persistent.log" 2>&1
    grep -h '^\[bench\]' "$R"/finetune_*.log | cut -c1-200
    grep -h -A14 '^Profiled step' "$R"/*.md | cut -c1-300
    sweep_cases "$R" bwd "base;gluon_dkv_persistent=true" "stage_sweep_${day}_${card}_s20_bwd_persistent" \
      $(( ($(left) - 20) / 2 )) "paper 8 32K,64K,128K" "sparse 8 32K"
    grep -h -A8 '^| case' "$R"/*.md
    tar -czf "$OUT/s20b.tgz" -C "$OUT" s20b && rm -rf "$R"
    ;;
esac
