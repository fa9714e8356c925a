#!/usr/bin/env bash
# The next 4-GPU lease (after lease_x4_s6.sh's of 2026-11-27), three consecutive calls, same rules
# (experiments/results moved aside during the lease; each call follows the last at once):
#   call 1  carry [.whl/core]   bash experiments/gpu/lease_x4_next.sh 1
#           GPU 0: the GPU tests of the kernels and MoBA (the tf32x3 contract and the re-scored
#           search included, never run yet), then the selection probe with the re-scored variants;
#           GPU 1, 2: the kernel benchmark, paper and sparse, with tf32x3 search + float32 ranking;
#           GPU 3: MoBA's kernel rows again (64K and 128K ran out of memory in session 6 through
#           Dynamo's recompile limit, fixed since)  -> OUT/kernels.tgz, OUT/moba.tgz
#   call 2  bash experiments/gpu/lease_x4_next.sh 2
#           GPU 0: the 7B step S2 vs MS at 64K and 128K with the re-scored selection; GPU 1: the
#           same with the plain shallow selection (same machine, for the ratio)  -> OUT/finetune.tgz
#   call 3  bash experiments/gpu/lease_x4_next.sh 3
#           cp_bench on 4 GPUs: MS at 256K and 512K with attend_rows (each rank its own rows), then
#           S2 and dense at 512K (not reached in session 6)  -> OUT/cp_bench.tgz
set -uo pipefail
CALL=${1:?usage: lease_x4_next.sh 1|2|3}
source "$(dirname "$0")/lease_common.sh" 560
W=/root/next
mkdir -p "$W/k" "$W/moba" "$W/ft"
card=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
stem="ms_attention_$(date -u +%F)_${card}"
RESCORED="select_precision=tf32x3+shallow_rescore=true"
case $CALL in
  1)
    (
      CUDA_VISIBLE_DEVICES=0 timeout 260 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=8 \
        tests/test_ms_triton.py tests/test_ms_select_exact.py tests/test_moba.py > "$W/k/gpu_tests.log" 2>&1
      CUDA_VISIBLE_DEVICES=0 timeout $(( $(left) - 25 )) python3 -m ctxlab.kernels.bench.select_probe \
        --lengths 128K,256K --settings paper,sparse --out "$W/k" \
        --variants "shallow;shallow+select_precision=tf32x3;shallow+$RESCORED;shallow+select_precision=tf32+shallow_rescore=true" \
        > "$W/k/probe.log" 2>&1
    ) &
    for g in 1 2; do
      setting=$([ $g = 1 ] && echo paper || echo sparse)
      CUDA_VISIBLE_DEVICES=$g timeout $(( $(left) - 20 )) python3 -m ctxlab.kernels.bench.run --preset h100_issue14 \
        --cases "$setting" --ops gather,triton,dense,s2 --select-impl shallow --launch "$RESCORED" --out "$W/k" \
        --stem "${stem}_rescored_$setting" --time-limit-s $(( $(left) - 120 )) > "$W/k/bench_$setting.log" 2>&1 &
    done
    CUDA_VISIBLE_DEVICES=3 timeout $(( $(left) - 20 )) bash "$here/moba.sh" "$W/moba" kernels > "$W/moba/moba.log" 2>&1 &
    wait
    tail -4 "$W/k/gpu_tests.log"; grep -A12 '^Summary' "$W/k/${stem}"_rescored_*.md 2>/dev/null
    tar -czf "$OUT/kernels.tgz" -C "$W/k" . ; tar -czf "$OUT/moba.tgz" -C "$W/moba" . ;;
  2)
    CUDA_VISIBLE_DEVICES=0 timeout $(( $(left) - 25 )) python3 -m ctxlab.bench.finetune --out "$W/ft" \
      --tag finetune_7b_rescored --lengths 65536,131072 --variants s2,ms --select-impl shallow \
      --launch "$RESCORED" --warmup 1 --steps 1 --long-steps 1 > "$W/ft/log_gpu0.txt" 2>&1 &
    CUDA_VISIBLE_DEVICES=1 timeout $(( $(left) - 25 )) python3 -m ctxlab.bench.finetune --out "$W/ft" \
      --tag finetune_7b_shallow --lengths 65536,131072 --variants s2,ms --select-impl shallow \
      --warmup 1 --steps 1 --long-steps 1 > "$W/ft/log_gpu1.txt" 2>&1 &
    wait
    for f in "$W"/ft/log_*.txt; do echo "== $f"; tail -12 "$f"; done
    tar -czf "$OUT/finetune.tgz" -C "$W/ft" . ;;
  3)
    CTXLAB_CP_SELECT_IMPL=shallow CTXLAB_CP_TIME_LIMIT=$(( $(left) - 30 )) bash "$here/cp_bench.sh" /root/cp \
      ms@262144x4 ms@524288x4 s2@524288x4 dense@524288x4 ms@131072x1
    tar -czf "$OUT/cp_bench.tgz" -C /root/cp . ;;
  *) echo "lease_x4_next.sh: call must be 1, 2 or 3" >&2; exit 2 ;;
esac
ls -la "$OUT"
