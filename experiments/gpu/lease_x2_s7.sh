#!/usr/bin/env bash
# Session 7's plan for a 2-GPU lease (nvidia-h200-x2; no 4-GPU kind was lent), same rules as
# lease_x4_next.sh (experiments/results moved aside during the lease; calls follow at once):
#   call 1  carry [.whl/core]   bash experiments/gpu/lease_x2_s7.sh 1
#           GPU 0: the GPU tests of the kernels and MoBA (the tf32x3 contract and the re-scored
#           search, never run on a GPU), then the selection probe with the re-scored variants;
#           GPU 1: the kernel benchmark, paper then sparse, tf32x3 search + float32 re-scoring
#           -> OUT/kernels.tgz
#   call 2  bash experiments/gpu/lease_x2_s7.sh 2
#           GPU 0: the 7B step S2 vs MS at 64K and 128K with the re-scored selection; GPU 1: the
#           same with the exact float32 shallow selection  -> OUT/finetune.tgz
#   call 3  bash experiments/gpu/lease_x2_s7.sh 3
#           cp_bench on 2 GPUs: MS, S2 and dense at 256K with attend_rows (each rank its own rows)
#           -> OUT/cp_bench.tgz
#   cp4     carry [.whl/core]   bash experiments/gpu/lease_x2_s7.sh cp4   (nvidia-h200-x4, lent later)
#           cp_bench on 4 GPUs: MS at 256K with attend_rows, then S2, MS and dense at 512K
#   final   carry [.whl/core]   CTXLAB_CALL_SECONDS=420 bash experiments/gpu/lease_x2_s7.sh final
#           GPU 0: the GPU tests of the kernels, the probe (ieee vs the default re-scored tf32
#           search), the kernel benchmark (paper); GPU 1: the 7B step S2 vs MS (GPU defaults) at
#           64K and 128K, then tile variants of the attention stages at paper 64K/128K  -> OUT/final.tgz
set -uo pipefail
CALL=${1:?usage: lease_x2_s7.sh 1|2|3}
source "$(dirname "$0")/lease_common.sh" "${CTXLAB_CALL_SECONDS:-540}"
W=/root/s7
mkdir -p "$W/k" "$W/ft"
stem="ms_attention_$(date -u +%F)_${card}_s7"
RESCORED="select_precision=tf32x3+shallow_rescore=true"
case $CALL in
  1)
    (
      CUDA_VISIBLE_DEVICES=0 timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=8 \
        tests/test_ms_triton.py tests/test_ms_select_exact.py tests/test_moba.py > "$W/k/gpu_tests.log" 2>&1
      CUDA_VISIBLE_DEVICES=0 timeout $(( $(left) - 25 )) python3 -m ctxlab.kernels.bench.select_probe \
        --lengths 64K,128K,256K --settings paper,sparse --out "$W/k" \
        --variants "shallow;shallow+select_precision=tf32x3;shallow+$RESCORED;shallow+select_precision=tf32+shallow_rescore=true" \
        > "$W/k/probe.log" 2>&1
    ) &
    (
      for setting in paper sparse; do
        if [ $setting = paper ]; then budget=$(( ($(left) - 40) / 2 + 40 )); else budget=$(( $(left) - 40 )); fi
        CUDA_VISIBLE_DEVICES=1 timeout $(( budget + 15 )) python3 -m ctxlab.kernels.bench.run --preset h100_issue14 \
          --cases "$setting" --ops gather,triton,dense,s2 --select-impl shallow --launch "$RESCORED" --out "$W/k" \
          --stem "${stem}_rescored_$setting" --time-limit-s "$budget" > "$W/k/bench_$setting.log" 2>&1
      done
    ) &
    wait
    tail -4 "$W/k/gpu_tests.log"; tail -30 "$W/k/probe.log"; grep -A14 '^Summary' "$W/k/${stem}"_rescored_*.md 2>/dev/null
    tar -czf "$OUT/kernels.tgz" -C "$W/k" . ;;
  2)
    for g in 0 1; do
      if [ $g = 0 ]; then tag=finetune_7b_s7_rescored; launch=(--launch "$RESCORED"); else tag=finetune_7b_s7_shallow; launch=(); fi
      CUDA_VISIBLE_DEVICES=$g timeout $(( $(left) - 25 )) python3 -m ctxlab.bench.finetune --out "$W/ft" \
        --tag "$tag" --lengths 65536,131072 --variants s2,ms --select-impl shallow "${launch[@]}" \
        --warmup 1 --steps 2 --long-steps 1 > "$W/ft/log_gpu$g.txt" 2>&1 &
    done
    wait
    for f in "$W"/ft/log_*.txt; do echo "== $f"; tail -12 "$f"; done
    tar -czf "$OUT/finetune.tgz" -C "$W/ft" . ;;
  3)
    CTXLAB_CP_SELECT_IMPL=shallow CTXLAB_CP_TIME_LIMIT=$(( $(left) - 30 )) bash "$here/cp_bench.sh" /root/cp \
      ms@262144x2 s2@262144x2 dense@262144x2 ms@131072x1
    tar -czf "$OUT/cp_bench.tgz" -C /root/cp . ;;
  cp4)  # on nvidia-h200-x4, when a 4-GPU kind was lent during the session
    CTXLAB_CP_SELECT_IMPL=shallow CTXLAB_CP_TIME_LIMIT=$(( $(left) - 30 )) bash "$here/cp_bench.sh" /root/cp \
      ms@262144x4 s2@524288x4 ms@524288x4 dense@524288x4
    tar -czf "$OUT/cp_bench.tgz" -C /root/cp . ;;
  final)  # the code of commit 77ffa1e on (re-scoring as the ieee dot sums; GPU default tf32 + re-scoring)
    (
      CUDA_VISIBLE_DEVICES=0 timeout 170 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=5 \
        tests/test_ms_triton.py tests/test_ms_select_exact.py > "$W/k/gpu_tests_final.log" 2>&1
      mkdir -p "$W/k/probe_final"
      CUDA_VISIBLE_DEVICES=0 timeout 90 python3 -m ctxlab.kernels.bench.select_probe \
        --lengths 32K,64K,128K,256K --settings paper,sparse --out "$W/k/probe_final" \
        --variants "shallow+select_precision=ieee+shallow_rescore=false;shallow" > "$W/k/probe_final.log" 2>&1
      CUDA_VISIBLE_DEVICES=0 timeout $(( $(left) - 20 )) python3 -m ctxlab.kernels.bench.run --preset h100_issue14 \
        --cases paper --ops gather,triton,dense,s2 --out "$W/k" --stem "${stem}_final_paper" \
        --time-limit-s $(( $(left) - 60 )) > "$W/k/bench_final_paper.log" 2>&1
    ) &
    (
      CUDA_VISIBLE_DEVICES=1 timeout $(( $(left) - 90 )) python3 -m ctxlab.bench.finetune --out "$W/ft" \
        --tag finetune_7b_s7_default --lengths 65536,131072 --variants s2,ms \
        --warmup 1 --steps 3 --long-steps 2 > "$W/ft/log_gpu1.txt" 2>&1
      CUDA_VISIBLE_DEVICES=1 timeout $(( $(left) - 15 )) python3 -m ctxlab.kernels.bench.run --preset h100_issue14 \
        --cases paper-L64K,paper-L128K --out "$W/k" --stem "${stem}_final_tiles" --time-limit-s $(( $(left) - 40 )) \
        --ops "gather,triton,triton:sel_warps=8,triton:sel_block_m=128+sel_warps=8,triton:fwd_block_n=128+fwd_stages=2,triton:dq_block_n=128,triton:sel_stages=3" \
        > "$W/k/bench_final_tiles.log" 2>&1
    ) &
    wait
    tail -3 "$W/k/gpu_tests_final.log"; cat "$W/k/probe_final.log" | cut -c1-400; tail -12 "$W/ft/log_gpu1.txt"
    grep -A14 '^Summary' "$W/k/${stem}"_final_*.md 2>/dev/null | cut -c1-300
    tar -czf "$OUT/final.tgz" -C "$W" k ft ;;
  *) echo "lease_x2_s7.sh: call must be 1, 2, 3, cp4 or final" >&2; exit 2 ;;
esac
ls -la "$OUT"
