#!/usr/bin/env bash
# A 4-GPU lease in three consecutive calls (session 6, 2026-11-27): the shallow MS selection
# measured (issue 14), MoBA's GPU rows (issue 15), then context parallelism (issue 18). Same rules
# as lease_x4.sh: experiments/results moved aside during the lease (the tree travels small), each
# call follows the last at once (the machine is released after 30 s idle), each writes a few
# tarballs into OUT.
#   call 1  carry [.whl/core]   bash experiments/gpu/lease_x4_s6.sh 1
#           GPU 0: the MS kernels' GPU tests (shallow selection included), then the selection probe
#           (shallow launch variants at 128K and 256K); GPU 1 and 2: the kernel benchmark (paper and
#           sparse settings, 32K-256K, dense / S2 / gather / ours, the shallow selection configured);
#           GPU 3: experiments/gpu/moba.sh's test and kernels stages  -> OUT/kernels.tgz, OUT/moba.tgz
#   call 2  bash experiments/gpu/lease_x4_s6.sh 2
#           GPU 0: the 7B LoRA+ step, S2 vs MS at 64K and 128K (MS with the shallow selection when
#           call 1's GPU tests passed, else torch's); GPU 1: the same at 32K and MS with torch's
#           selection at 64K (the selection's share); GPU 2: moba.sh's finetune stage (7B rows)
#           -> OUT/finetune.tgz
#   call 3  bash experiments/gpu/lease_x4_s6.sh 3
#           experiments/gpu/cp_bench.sh on the 4 GPUs -> OUT/cp_bench.tgz
set -uo pipefail
CALL=${1:?usage: lease_x4_s6.sh 1|2|3}
source "$(dirname "$0")/lease_common.sh" 560
W=/root/s6
mkdir -p "$W/k" "$W/moba" "$W/ft"
stem="ms_attention_$(date -u +%F)_${card}"
select_impl() {  # shallow when call 1's GPU tests of the kernels passed
  if grep -qE '[0-9]+ passed' "$W/k/gpu_tests.log" 2>/dev/null && ! grep -qE '[0-9]+ (failed|error)' "$W/k/gpu_tests.log"; then
    echo shallow; else echo torch; fi
}
case $CALL in
  1)
    (
      CUDA_VISIBLE_DEVICES=0 timeout 220 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=8 \
        tests/test_ms_triton.py tests/test_ms_select_exact.py > "$W/k/gpu_tests.log" 2>&1
      CUDA_VISIBLE_DEVICES=0 timeout $(( $(left) - 25 )) python3 -m ctxlab.kernels.bench.select_probe \
        --lengths 128K,256K --settings paper,sparse --out "$W/k" \
        --variants "base;shallow;shallow+shallow_cap=64;shallow+select_precision=tf32x3;shallow+shallow_block_j=128;shallow+shallow_warps=4;shallow+shallow_k=16+shallow_block_j=32+shallow_cap=64" \
        > "$W/k/probe.log" 2>&1
    ) &
    for g in 1 2; do
      setting=$([ $g = 1 ] && echo paper || echo sparse)
      CUDA_VISIBLE_DEVICES=$g timeout $(( $(left) - 20 )) python3 -m ctxlab.kernels.bench.run --preset h100_issue14 \
        --cases "$setting" --ops gather,triton,dense,s2 --select-impl shallow --out "$W/k" --stem "${stem}_$setting" \
        --time-limit-s $(( $(left) - 120 )) > "$W/k/bench_$setting.log" 2>&1 &
    done
    CUDA_VISIBLE_DEVICES=3 timeout $(( $(left) - 20 )) bash "$here/moba.sh" "$W/moba" test kernels > "$W/moba/moba.log" 2>&1 &
    wait
    tail -4 "$W/k/gpu_tests.log"; tail -3 "$W/k/probe.log"; tail -3 "$W/k/bench_paper.log" "$W/k/bench_sparse.log"
    grep -A14 '^Summary' "$W/k/${stem}_paper.md" "$W/k/${stem}_sparse.md" 2>/dev/null
    tail -8 "$W/moba/moba.log"
    tar -czf "$OUT/kernels.tgz" -C "$W/k" . ; tar -czf "$OUT/moba.tgz" -C "$W/moba" . ;;
  2)
    impl=$(select_impl); echo "MS selection: $impl"
    CUDA_VISIBLE_DEVICES=0 timeout $(( $(left) - 25 )) python3 -m ctxlab.bench.finetune --out "$W/ft" \
      --tag finetune_7b_ms_vs_s2_"$impl" --lengths 65536,131072 --variants s2,ms --select-impl "$impl" \
      --warmup 1 --steps 1 --long-steps 1 > "$W/ft/log_gpu0.txt" 2>&1 &
    ( CUDA_VISIBLE_DEVICES=1 timeout 200 python3 -m ctxlab.bench.finetune --out "$W/ft" --tag finetune_7b_32k_"$impl" \
        --lengths 32768 --variants s2,ms --select-impl "$impl" --warmup 1 --steps 2 > "$W/ft/log_gpu1a.txt" 2>&1
      CUDA_VISIBLE_DEVICES=1 timeout $(( $(left) - 25 )) python3 -m ctxlab.bench.finetune --out "$W/ft" \
        --tag finetune_7b_ms_torch_select --lengths 65536 --variants ms --select-impl torch \
        --warmup 1 --steps 1 --long-steps 1 > "$W/ft/log_gpu1b.txt" 2>&1 ) &
    # MoBA's 7B rows (moba.sh's finetune stage), beside dense, S2 and MS.
    CUDA_VISIBLE_DEVICES=2 timeout $(( $(left) - 25 )) bash "$here/moba.sh" "$W/moba" finetune > "$W/moba/finetune.log" 2>&1 &
    wait
    for f in "$W"/ft/log_*.txt; do echo "== $f"; tail -12 "$f"; done
    tar -czf "$OUT/finetune.tgz" -C "$W/ft" . ; tar -czf "$OUT/moba.tgz" -C "$W/moba" . ;;
  3)
    CTXLAB_CP_SELECT_IMPL=$(select_impl) CTXLAB_CP_TIME_LIMIT=$(( $(left) - 30 )) bash "$here/cp_bench.sh" /root/cp
    tar -czf "$OUT/cp_bench.tgz" -C /root/cp . ;;
  *) echo "lease_x4_s6.sh: call must be 1, 2 or 3" >&2; exit 2 ;;
esac
ls -la "$OUT"
