#!/usr/bin/env bash
# The next 4-GPU lease (after session 7's, lease_x2_s7.sh), three consecutive calls, same rules
# (experiments/results moved aside during the lease; each call follows the last at once; name
# nvidia-h200-x4: the 7B step at 128K and MS at 512K need more than an H100's 80 GB):
#   call 1  carry [.whl/core]   bash experiments/gpu/lease_x4_next.sh 1
#           GPU 0: the GPU tests of the kernels (all four selection cases, bit for bit against the
#           ieee selection; session 7 reached two before its limit), then the probe: the default
#           re-scoring against the four-column one (shallow_rescore_cols=4, never timed) and the
#           ieee search; GPU 1, 2: the kernel benchmark, paper and sparse, GPU defaults; GPU 3: the
#           same paper benchmark with shallow_rescore_cols=4 and the two faster tiles of session 7
#           (fwd_block_n=128+fwd_stages=2, dq_block_n=128) together  -> OUT/kernels.tgz
#   call 2  bash experiments/gpu/lease_x4_next.sh 2
#           GPU 0: the 7B step S2 vs MS at 64K and 128K, GPU defaults, two warm-up steps (session 7's
#           first timed MS step still paid one-off costs); GPU 1: the same at 32K; GPU 2: MoBA's kernel
#           rows to 128K (64K and 128K ran out of memory in session 6; fixed, never re-run)  -> OUT/finetune.tgz
#   call 3  bash experiments/gpu/lease_x4_next.sh 3
#           cp_bench on 4 GPUs with warm kernels (one untimed step): MS at 256K, dense at 512K (over
#           169 s a step in session 7), then MS at 1M (the longest, if it fits)  -> OUT/cp_bench.tgz
set -uo pipefail
CALL=${1:?usage: lease_x4_next.sh 1|2|3}
source "$(dirname "$0")/lease_common.sh" 560
W=/root/next
mkdir -p "$W/k" "$W/moba" "$W/ft" "$W/k/probe"
stem="ms_attention_$(date -u +%F)_${card}"
case $CALL in
  1)
    (
      CUDA_VISIBLE_DEVICES=0 timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=8 \
        tests/test_ms_triton.py tests/test_ms_select_exact.py > "$W/k/gpu_tests.log" 2>&1
      CUDA_VISIBLE_DEVICES=0 timeout $(( $(left) - 25 )) python3 -m ctxlab.kernels.bench.select_probe \
        --lengths 32K,64K,128K,256K --settings paper,sparse --out "$W/k/probe" \
        --variants "shallow;shallow+shallow_rescore_cols=4;shallow+select_precision=ieee+shallow_rescore=false" \
        > "$W/k/probe.log" 2>&1
    ) &
    for g in 1 2; do
      setting=$([ $g = 1 ] && echo paper || echo sparse)
      CUDA_VISIBLE_DEVICES=$g timeout $(( $(left) - 20 )) python3 -m ctxlab.kernels.bench.run --preset h100_issue14 \
        --cases "$setting" --ops gather,triton,dense,s2 --out "$W/k" --stem "${stem}_$setting" \
        --time-limit-s $(( $(left) - 120 )) > "$W/k/bench_$setting.log" 2>&1 &
    done
    CUDA_VISIBLE_DEVICES=3 timeout $(( $(left) - 20 )) python3 -m ctxlab.kernels.bench.run --preset h100_issue14 \
      --cases paper --ops gather,triton,dense,s2 --out "$W/k" --stem "${stem}_paper_tuned" \
      --launch "shallow_rescore_cols=4+fwd_block_n=128+fwd_stages=2+dq_block_n=128" \
      --time-limit-s $(( $(left) - 120 )) > "$W/k/bench_paper_tuned.log" 2>&1 &
    wait
    tail -4 "$W/k/gpu_tests.log"; grep -A12 '^Summary' "$W/k/${stem}"_*.md 2>/dev/null
    tar -czf "$OUT/kernels.tgz" -C "$W/k" . ;;
  2)
    CUDA_VISIBLE_DEVICES=0 timeout $(( $(left) - 25 )) python3 -m ctxlab.bench.finetune --out "$W/ft" \
      --tag finetune_7b_defaults --lengths 65536,131072 --variants s2,ms \
      --warmup 2 --steps 3 --long-steps 2 > "$W/ft/log_gpu0.txt" 2>&1 &
    CUDA_VISIBLE_DEVICES=1 timeout $(( $(left) - 25 )) python3 -m ctxlab.bench.finetune --out "$W/ft" \
      --tag finetune_7b_defaults_32k --lengths 32768 --variants s2,ms \
      --warmup 2 --steps 3 > "$W/ft/log_gpu1.txt" 2>&1 &
    CUDA_VISIBLE_DEVICES=2 timeout $(( $(left) - 20 )) bash "$here/moba.sh" "$W/moba" kernels > "$W/moba/moba.log" 2>&1 &
    wait
    for f in "$W"/ft/log_*.txt; do echo "== $f"; tail -12 "$f"; done
    tar -czf "$OUT/finetune.tgz" -C "$W/ft" . ; tar -czf "$OUT/moba.tgz" -C "$W/moba" . ;;
  3)
    CTXLAB_CP_WARMUP=1 CTXLAB_CP_TIME_LIMIT=$(( $(left) - 30 )) bash "$here/cp_bench.sh" /root/cp \
      ms@262144x4 dense@524288x4 ms@1048576x4
    tar -czf "$OUT/cp_bench.tgz" -C /root/cp . ;;
  *) echo "lease_x4_next.sh: call must be 1, 2 or 3" >&2; exit 2 ;;
esac
ls -la "$OUT"
