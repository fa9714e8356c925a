#!/usr/bin/env bash
# The next lease after session 9 (nvidia-h200-x2 with needs_h200, or two H100s), same rules as
# lease_s9.sh (experiments/results moved aside during the lease; calls follow at once).
# With a 4-GPU kind lent, run lease_x4_next.sh 3 as well (dense 512K and MS 1M split over 4 GPUs).
#   call 1  carry [.whl/core]   bash experiments/gpu/lease_next.sh 1
#           GPU 0: the GPU tests of the kernels with session 9's defaults (rotate_q_once, confined
#           to the dk/dv launch after its timing, never run on a GPU in that form), then the
#           kernel benchmark at paper settings with positions on the selected tokens (--pe
#           selected, ours only); GPU 1: the stage sweep under RoPE (the final rotate_q_once
#           against the in-kernel rotation) and the benchmark at paper settings, pe="pre"
#           -> OUT/kernels.tgz
#   call 2  bash experiments/gpu/lease_next.sh 2
#           GPU 0: the 7B step S2 vs MS at 64K and 128K with the defaults, two warm-ups; GPU 1:
#           the same at 32K  -> OUT/next.tgz
#   call 3  bash experiments/gpu/lease_next.sh 3
#           both GPUs: cp_bench at 256K over 2 GPUs under FSDP2 (CTXLAB_CP_STRATEGY=fsdp, never
#           run on GPUs) for MS and S2  -> OUT/cp.tgz
set -uo pipefail
CALL=${1:?usage: lease_next.sh 1|2|3}
source "$(dirname "$0")/lease_common.sh" "${CTXLAB_CALL_SECONDS:-560}"
W=/root/next
mkdir -p "$W/k" "$W/ft"
stem="ms_attention_$(date -u +%F)_${card}"
case $CALL in
  1)
    (
      CUDA_VISIBLE_DEVICES=0 timeout 330 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=8 \
        tests/test_ms_triton.py tests/test_ms_select_exact.py > "$W/k/gpu_tests.log" 2>&1
      CUDA_VISIBLE_DEVICES=0 timeout $(( $(left) - 15 )) python3 -m ctxlab.kernels.bench.run --preset h100_issue14 \
        --cases paper --pe selected --ops triton --out "$W/k" --stem "${stem}_paper_selected" \
        --time-limit-s $(( $(left) - 60 )) > "$W/k/bench_paper_selected.log" 2>&1
    ) &
    (
      CUDA_VISIBLE_DEVICES=1 timeout 200 python3 -m ctxlab.kernels.bench.stage_sweep --setting paper --pe selected \
        --lengths 64K,128K --out "$W/k" --stem "stage_sweep_$(date -u +%F)_${card}_rope" \
        --variants "base;rotate_q_once=false" > "$W/k/sweep_rope.log" 2>&1
      CUDA_VISIBLE_DEVICES=1 timeout $(( $(left) - 15 )) python3 -m ctxlab.kernels.bench.run --preset h100_issue14 \
        --cases paper --ops triton,triton_det,dense,s2 --out "$W/k" --stem "${stem}_paper" \
        --time-limit-s $(( $(left) - 120 )) > "$W/k/bench_paper.log" 2>&1
    ) &
    wait
    tail -4 "$W/k/gpu_tests.log"; grep -h -A8 '^Summary' "$W/k/${stem}"_*.md 2>/dev/null | cut -c1-400
    grep -h -A6 '^| case' "$W/k/"stage_sweep_*_rope.md 2>/dev/null
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
  *) echo "lease_next.sh: call must be 1, 2 or 3" >&2; exit 2 ;;
esac
ls -la "$OUT"
