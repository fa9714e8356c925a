#!/usr/bin/env bash
# The next lease after session 12 (nvidia-h200-x2, or one H200: run each call's GPU 0 and GPU 1
# parts one after the other), same rules as lease_s12.sh (experiments/results moved aside during
# the lease; calls follow at once). Session 13 ran calls 1, 4 and 2 (64K) side by side on four GPUs
# (lease_s13.sh) and adopted region_constexpr with 2 forward stages; what is left here is call 3
# (cp_bench under FSDP2, never run on GPUs). Calls 1 and 4 stay as the recipe to re-time and
# re-profile the defaults after a kernel change (call 4's profiles summarize with
# python -m ctxlab.kernels.bench.ncu_summary DIR).
#   call 4  carry [.whl/core]   bash experiments/gpu/lease_next.sh 4
#           Nsight Compute (if it reads counters on the machine: checked first) of one forward,
#           one dq and one dk/dv launch at paper settings 64K and of the same kernels over
#           contiguous keys (setting prefix), experiments/gpu/profile_stage.py  -> OUT/ncu.tgz
#   call 1  carry [.whl/core]   bash experiments/gpu/lease_next.sh 1
#           GPU 0: the GPU tests of the kernels, then the kernel benchmark at paper settings
#           (ours, ours with region_constexpr, det, dense, S2); GPU 1: the stage sweep at paper
#           settings (CTXLAB_SWEEP_VARIANTS, by default "base;region_constexpr=true": session 12's
#           untimed change against the default), then the benchmark at (64, 64, 8), the same ops
#           -> OUT/kernels.tgz
#   call 2  bash experiments/gpu/lease_next.sh 2
#           GPU 0: the 7B step S2 vs MS at 64K and 128K with the defaults of the day, two
#           warm-ups; GPU 1: the same at 32K
#           -> OUT/next.tgz
#   call 3  bash experiments/gpu/lease_next.sh 3
#           both GPUs: cp_bench at 256K over 2 GPUs under FSDP2 (CTXLAB_CP_STRATEGY=fsdp, never
#           run on GPUs) for MS and S2  -> OUT/cp.tgz
set -uo pipefail
CALL=${1:?usage: lease_next.sh 1|2|3|4}
source "$(dirname "$0")/lease_common.sh" "${CTXLAB_CALL_SECONDS:-560}"
W=/root/next
mkdir -p "$W/k" "$W/ft"
stem="ms_attention_$(date -u +%F)_${card}"
case $CALL in
  1)
    (
      CUDA_VISIBLE_DEVICES=0 timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=8 \
        tests/test_ms_triton.py tests/test_ms_select_exact.py > "$W/k/gpu_tests.log" 2>&1
      CUDA_VISIBLE_DEVICES=0 timeout $(( $(left) - 15 )) python3 -m ctxlab.kernels.bench.run --preset h100_issue14 \
        --cases paper --ops triton,triton:region_constexpr=true,triton_det,dense,s2 --out "$W/k" --stem "${stem}_paper" \
        --time-limit-s $(( $(left) - 100 )) > "$W/k/bench_paper.log" 2>&1
    ) &
    (
      CUDA_VISIBLE_DEVICES=1 timeout 200 python3 -m ctxlab.kernels.bench.stage_sweep --setting paper \
        --lengths 64K,128K,256K --out "$W/k" --stem "stage_sweep_$(date -u +%F)_${card}_next" \
        --variants "${CTXLAB_SWEEP_VARIANTS:-base;region_constexpr=true}" > "$W/k/sweep.log" 2>&1
      CUDA_VISIBLE_DEVICES=1 timeout $(( $(left) - 15 )) python3 -m ctxlab.kernels.bench.run --preset h100_issue14 \
        --cases sparse --ops triton,triton:region_constexpr=true,triton_det,s2 --out "$W/k" --stem "${stem}_sparse" \
        --time-limit-s $(( $(left) - 90 )) > "$W/k/bench_sparse.log" 2>&1
    ) &
    wait
    tail -4 "$W/k/gpu_tests.log"; grep -h -A8 '^Summary' "$W/k/${stem}"_*.md 2>/dev/null | cut -c1-400
    grep -h -A8 '^| case' "$W/k/"stage_sweep_*_next.md 2>/dev/null
    tar -czf "$OUT/kernels.tgz" -C "$W/k" . ;;
  2)
    # S2 and MS at 64K and 128K take about 400 s with two warm-ups (session 9: 330 s was short)
    CUDA_VISIBLE_DEVICES=0 timeout $(( $(left) - 15 )) python3 -m ctxlab.bench.finetune --out "$W/ft" \
      --tag finetune_7b_next --lengths 65536,131072 --variants s2,ms \
      --warmup 2 --steps 2 --long-steps 2 > "$W/ft/log_gpu0.txt" 2>&1 &
    CUDA_VISIBLE_DEVICES=1 timeout $(( $(left) - 15 )) python3 -m ctxlab.bench.finetune --out "$W/ft" \
      --tag finetune_7b_next_32k --lengths 32768 --variants s2,ms --warmup 2 --steps 3 \
      > "$W/ft/log_gpu1.txt" 2>&1 &
    wait
    grep -h '^\[bench\]' "$W/ft/"log_gpu*.txt | cut -c1-300
    tar -czf "$OUT/next.tgz" -C "$W" ft ;;
  3)
    CTXLAB_CP_STRATEGY=fsdp CTXLAB_CP_WARMUP=1 CTXLAB_CP_TIME_LIMIT=$(( $(left) - 30 )) \
      bash "$here/cp_bench.sh" "$W/cp" ms@262144x2 s2@262144x2
    tar -czf "$OUT/cp.tgz" -C "$W" cp ;;
  4)
    mkdir -p "$W/ncu"
    ncu --version > "$W/ncu/ncu_version.txt" 2>&1 || echo "no ncu on this machine" >> "$W/ncu/ncu_version.txt"
    for setting in paper prefix; do
      for stage in fwd dq dkv; do
        [ "$(left)" -lt 60 ] && break 2
        kernel=regex:ms_attn_fwd_kernel; skip=1
        [ $stage = dq ] && kernel=regex:ms_attn_bwd_dq_kernel && skip=0
        [ $stage = dkv ] && kernel=regex:ms_attn_bwd_dkv && skip=0
        CUDA_VISIBLE_DEVICES=0 timeout $(( $(left) - 20 )) ncu --clock-control none --kernel-name "$kernel" \
          --launch-skip $skip --launch-count 2 --set full -o "$W/ncu/${setting}_64K_${stage}" \
          python3 experiments/gpu/profile_stage.py --setting $setting --length 64K --stage $stage \
          > "$W/ncu/${setting}_64K_${stage}.log" 2>&1
        ncu --import "$W/ncu/${setting}_64K_${stage}.ncu-rep" --page details --csv \
          > "$W/ncu/${setting}_64K_${stage}_details.csv" 2>/dev/null
      done
    done
    cat "$W/ncu/ncu_version.txt"; tail -n 2 "$W/ncu/"*.log
    tar -czf "$OUT/ncu.tgz" -C "$W" ncu ;;
  *) echo "lease_next.sh: call must be 1, 2, 3 or 4" >&2; exit 2 ;;
esac
ls -la "$OUT"
