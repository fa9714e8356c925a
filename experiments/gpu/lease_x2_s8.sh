#!/usr/bin/env bash
# Session 8's plan for a 2-GPU lease (nvidia-h200-x2 with needs_h200: the 7B step at 128K needs
# more than an H100's 80 GB; no 4-GPU kind was lent), same rules as lease_x4_next.sh
# (experiments/results moved aside during the lease; each call follows the last at once):
#   call 1  carry [.whl/core]   bash experiments/gpu/lease_x2_s8.sh 1
#           GPU 0: the GPU tests of the kernels (all four selection cases), the selection probe
#           (the default re-scoring against the four-column one, shallow_rescore_cols=4, never
#           timed, and the ieee search), then the kernel benchmark at (64, 64, 8) (target 3b);
#           GPU 1: the kernel benchmark at paper settings: ours with the GPU defaults beside ours
#           with session 7's two faster tiles together (fwd_block_n=128+fwd_stages=2,
#           dq_block_n=128), ours deterministic, dense, S2  -> OUT/kernels.tgz
#   call 2  bash experiments/gpu/lease_x2_s8.sh 2
#           GPU 0: the 7B step S2 vs MS at 64K and 128K, GPU defaults, two warm-up steps (session
#           7's first timed MS step still paid one-off costs); GPU 1: the same at 32K, then MoBA's
#           kernel rows to 128K  -> OUT/finetune.tgz, OUT/moba.tgz
#   call 3  bash experiments/gpu/lease_x2_s8.sh 3
#           cp_bench on 2 GPUs with warm kernels (one untimed step): MS, S2 at 256K; MS at 128K
#           on one GPU (the scaling's baseline)  -> OUT/cp_bench.tgz
#   call 4  carry [.whl/core]   CTXLAB_CALL_SECONDS=400 bash experiments/gpu/lease_x2_s8.sh 4
#           the new GPU defaults (four-column re-scoring, the two faster tiles; adopted from call 1):
#           GPU 0: the GPU tests of the kernels (the bit-for-bit selection test now runs the
#           four-column re-scoring), then the 7B step S2 vs MS at 64K; GPU 1: the kernel benchmark,
#           paper settings, GPU defaults  -> OUT/verify.tgz
set -uo pipefail
CALL=${1:?usage: lease_x2_s8.sh 1|2|3|4}
source "$(dirname "$0")/lease_common.sh" "${CTXLAB_CALL_SECONDS:-560}"
W=/root/s8
mkdir -p "$W/k/probe" "$W/moba" "$W/ft"
stem="ms_attention_$(date -u +%F)_${card}_s8"
TILES="fwd_block_n=128+fwd_stages=2+dq_block_n=128"
case $CALL in
  1)
    (
      CUDA_VISIBLE_DEVICES=0 timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=8 \
        tests/test_ms_triton.py tests/test_ms_select_exact.py > "$W/k/gpu_tests.log" 2>&1
      CUDA_VISIBLE_DEVICES=0 timeout 110 python3 -m ctxlab.kernels.bench.select_probe \
        --lengths 32K,64K,128K,256K --settings paper,sparse --out "$W/k/probe" \
        --variants "shallow;shallow+shallow_rescore_cols=4;shallow+select_precision=ieee+shallow_rescore=false" \
        > "$W/k/probe.log" 2>&1
      CUDA_VISIBLE_DEVICES=0 timeout $(( $(left) - 15 )) python3 -m ctxlab.kernels.bench.run --preset h100_issue14 \
        --cases sparse --ops triton,dense,s2 --out "$W/k" --stem "${stem}_sparse" \
        --time-limit-s $(( $(left) - 45 )) > "$W/k/bench_sparse.log" 2>&1
    ) &
    CUDA_VISIBLE_DEVICES=1 timeout $(( $(left) - 15 )) python3 -m ctxlab.kernels.bench.run --preset h100_issue14 \
      --cases paper --ops "triton,triton:$TILES,triton_det,dense,s2" --out "$W/k" --stem "${stem}_paper" \
      --time-limit-s $(( $(left) - 45 )) > "$W/k/bench_paper.log" 2>&1 &
    wait
    tail -4 "$W/k/gpu_tests.log"; cut -c1-300 "$W/k/probe.log" | tail -30
    grep -A12 '^Summary' "$W/k/${stem}"_*.md 2>/dev/null | cut -c1-400
    grep -h -A6 '^Stages' "$W/k/${stem}"_*.md 2>/dev/null | cut -c1-300
    tar -czf "$OUT/kernels.tgz" -C "$W/k" . ;;
  2)
    CUDA_VISIBLE_DEVICES=0 timeout $(( $(left) - 25 )) python3 -m ctxlab.bench.finetune --out "$W/ft" \
      --tag finetune_7b_s8_defaults --lengths 65536,131072 --variants s2,ms \
      --warmup 2 --steps 3 --long-steps 2 > "$W/ft/log_gpu0.txt" 2>&1 &
    (
      CUDA_VISIBLE_DEVICES=1 timeout 240 python3 -m ctxlab.bench.finetune --out "$W/ft" \
        --tag finetune_7b_s8_defaults_32k --lengths 32768 --variants s2,ms \
        --warmup 2 --steps 3 > "$W/ft/log_gpu1.txt" 2>&1
      CUDA_VISIBLE_DEVICES=1 timeout $(( $(left) - 20 )) bash "$here/moba.sh" "$W/moba" kernels > "$W/moba/moba.log" 2>&1
    ) &
    wait
    for f in "$W"/ft/log_*.txt; do echo "== $f"; tail -14 "$f" | cut -c1-300; done; tail -5 "$W/moba/moba.log"
    tar -czf "$OUT/finetune.tgz" -C "$W/ft" . ; tar -czf "$OUT/moba.tgz" -C "$W/moba" . ;;
  3)
    CTXLAB_CP_WARMUP=1 CTXLAB_CP_TIME_LIMIT=$(( $(left) - 30 )) bash "$here/cp_bench.sh" /root/cp \
      ms@262144x2 s2@262144x2 ms@131072x1
    tar -czf "$OUT/cp_bench.tgz" -C /root/cp . ;;
  4)
    (
      CUDA_VISIBLE_DEVICES=0 timeout 190 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=5 \
        tests/test_ms_triton.py tests/test_ms_select_exact.py > "$W/k/gpu_tests_defaults.log" 2>&1
      CUDA_VISIBLE_DEVICES=0 timeout $(( $(left) - 15 )) python3 -m ctxlab.bench.finetune --out "$W/ft" \
        --tag finetune_7b_s8_new_defaults_64k --lengths 65536 --variants s2,ms \
        --warmup 2 --steps 2 --long-steps 2 > "$W/ft/log_defaults.txt" 2>&1
    ) &
    CUDA_VISIBLE_DEVICES=1 timeout $(( $(left) - 15 )) python3 -m ctxlab.kernels.bench.run --preset h100_issue14 \
      --cases paper --ops triton,triton_det,dense,s2 --out "$W/k" --stem "${stem}_defaults_paper" \
      --time-limit-s $(( $(left) - 40 )) > "$W/k/bench_defaults_paper.log" 2>&1 &
    wait
    tail -3 "$W/k/gpu_tests_defaults.log"; tail -12 "$W/ft/log_defaults.txt" | cut -c1-300
    grep -A8 '^Summary' "$W/k/${stem}"_defaults_paper.md 2>/dev/null | cut -c1-400
    tar -czf "$OUT/verify.tgz" -C "$W" k ft ;;
  *) echo "lease_x2_s8.sh: call must be 1, 2, 3 or 4" >&2; exit 2 ;;
esac
ls -la "$OUT"
