#!/usr/bin/env bash
# Session 10's lease (nvidia-h200-x2), calls one right after another where the code allows (the
# machine is given back after 30 s idle); experiments/results moved out of the tree while it runs.
#   call 1  carry [.whl/core]   bash experiments/gpu/lease_s10.sh 1
#           GPU 0: the selection probe at paper settings 64K-256K and (64, 64, 8) 128K-256K: the
#             shallow selection with its second pass by prefix sums (the default) against bit
#             masks (shallow_mask_steps) and launch variants (stages, registers, warps), each
#             checked against ms_select_torch; then the GPU tests of the kernels.
#           GPU 1: the benchmark at (64, 64, 8) with 8 and 32 kv heads, 32K-128K (ours, det, S2):
#             its stage lines time dk/dv by atomics, partial sums and the reverse index, which
#             "auto" picks for w = 64 on the strength of an H100 measurement of session 3.
#           -> OUT/probe.tgz
#   call 2  bash experiments/gpu/lease_s10.sh 2   (after call 1's choices are committed)
#           GPU 0: the selection probe at 128K-256K (the new default against its neighbours);
#             the benchmark at paper settings, 32K-256K (ours, det, dense, S2); then under RoPE on
#             the fly (pe="selected", ours only; rotate_q_once in its final form).
#           GPU 1: the GPU tests with the new defaults; then the benchmark at (64, 64, 8), 8 kv
#             heads, 32K-256K (ours, det, S2).  -> OUT/bench.tgz
#   (as run: only one H200 was lent for call 2, so it ran as 2a (probe, GPU tests, (64, 64, 8))
#   and 2b (paper settings, pe="pre" then pe="selected"), one after the other on GPU 0)
#   call 3  bash experiments/gpu/lease_s10.sh 3   (one GPU): the GPU tests, then the 7B step at 64K
#   call 4  bash experiments/gpu/lease_s10.sh 4   (one GPU, fresh machine): --fit from 256K to 4M
# (After the lease the calls were rewritten over shared helpers, same commands; the probes'
# time limits, 240, 60 and 90 s as run, are now 240 s each.)
set -uo pipefail
CALL=${1:?usage: lease_s10.sh 1|2|2a|2b|3|4}
source "$(dirname "$0")/lease_common.sh" "${CTXLAB_CALL_SECONDS:-560}"
W=/root/s10
mkdir -p "$W/k"
day=$(date -u +%F)
stem="ms_attention_${day}_${card}_s10"
gpu_tests() {  # GPU, log name
  CUDA_VISIBLE_DEVICES=$1 timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=8 \
    tests/test_ms_triton.py tests/test_ms_select_exact.py > "$W/k/$2" 2>&1
  tail -3 "$W/k/$2"
}
bench() {  # GPU, name, seconds kept back by the timeout and by --time-limit-s, then run's arguments
  local gpu=$1 name=$2 back=$3 limit=$4
  shift 4
  CUDA_VISIBLE_DEVICES=$gpu timeout $(( $(left) - back )) python3 -m ctxlab.kernels.bench.run --preset h100_issue14 \
    --out "$W/k" --stem "${stem}_$name" --time-limit-s $(( $(left) - limit )) "$@" > "$W/k/bench_$name.log" 2>&1
}
m="shallow+shallow_mask_steps"
probe() {  # GPU, log name, lengths, settings, variants
  CUDA_VISIBLE_DEVICES=$1 timeout 240 python3 -m ctxlab.kernels.bench.select_probe --lengths "$3" \
    --settings "$4" --out "$W/k" --variants "$5" > "$W/k/$2" 2>&1
}
probe_call2() {  # GPU: the new default against its neighbours
  probe "$1" probe_call2.log 128K,256K paper \
    "shallow;${m}=64;${m}=8;${m}=16+shallow_stages=1;${m}=16+shallow_warps=8+shallow_maxnreg=128"
}
paper() { bench "$1" paper "$2" "$3" --cases paper --ops triton,triton_det,dense,s2; }
paper_selected() { bench "$1" paper_selected 15 60 --cases paper --pe selected --ops triton; }
sparse() { bench "$1" sparse 15 90 --cases sparse --ops triton,triton_det,s2; }
summaries() { grep -h -A8 '^Summary' "$W/k/${stem}"_*.md 2>/dev/null | cut -c1-400; }
case $CALL in
  1)
    (
      probe 0 probe_paper.log 64K,128K,256K paper "shallow;${m}=64;${m}=16;${m}=64+shallow_stages=2;\
${m}=64+shallow_stages=2+shallow_maxnreg=128;${m}=64+shallow_stages=1+shallow_maxnreg=128;\
${m}=64+shallow_warps=4+shallow_stages=2;shallow+shallow_stages=2+shallow_maxnreg=128"
      probe 0 probe_sparse.log 128K,256K sparse "shallow;${m}=64;${m}=16"
      gpu_tests 0 gpu_tests_call1.log
    ) &
    bench 1 sparse_kv 15 90 --preset h100 --cases sparse-L32K,sparse-L64K,sparse-L128K --ops triton,triton_det,s2 &
    wait
    cut -c1-900 "$W/k/select_probe.jsonl"
    grep -h -A8 '^Stages' "$W/k/${stem}_sparse_kv.md" 2>/dev/null
    tar -czf "$OUT/probe.tgz" -C "$W" k ;;
  2)
    ( probe_call2 0; paper 0 150 200; paper_selected 0 ) &
    ( gpu_tests 1 gpu_tests_call2.log; sparse 1 ) &
    wait
    summaries
    cut -c1-600 "$W/k/select_probe.jsonl"
    tar -czf "$OUT/bench.tgz" -C "$W" k ;;
  2a)  # call 2 on one GPU (only nvidia-h200 was lent), first half: probe, GPU tests, (64, 64, 8)
    probe_call2 0
    gpu_tests 0 gpu_tests_call2.log
    sparse 0
    summaries
    cut -c1-700 "$W/k/select_probe.jsonl"
    tar -czf "$OUT/bench_a.tgz" -C "$W" k ;;
  2b)  # second half: the paper benchmark, then under RoPE on the fly
    paper 0 100 160
    paper_selected 0
    summaries
    tar -czf "$OUT/bench_b.tgz" -C "$W" k ;;
  3)  # the GPU tests again (2a's select test refused the ieee config: masks without re-scoring,
      # now ignored), then the 7B LoRA+ step, S2 against MS at 64K with the new defaults
    gpu_tests 0 gpu_tests_call3.log
    mkdir -p "$W/ft"
    CUDA_VISIBLE_DEVICES=0 timeout $(( $(left) - 15 )) python3 -m ctxlab.bench.finetune --out "$W/ft" \
      --tag finetune_7b_s10 --lengths 65536 --variants s2,ms --warmup 2 --steps 2 > "$W/ft/log.txt" 2>&1
    grep -h '^\[bench\]' "$W/ft/log.txt" | cut -c1-300
    tar -czf "$OUT/call3.tgz" -C "$W" k ft ;;
  4)  # the longest length with the new selection (--fit, target 5), after one paper case at 32K
    bench 0 fit 15 60 --cases paper-L32K --ops triton --fit 262144,4194304
    grep -h -A8 'fit' "$W/k/${stem}_fit.md" 2>/dev/null | tail -8
    tar -czf "$OUT/fit.tgz" -C "$W" k ;;
  *) echo "lease_s10.sh: call must be 1, 2, 2a, 2b, 3 or 4" >&2; exit 2 ;;
esac
ls -la "$OUT"
