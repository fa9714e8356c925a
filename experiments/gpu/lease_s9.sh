#!/usr/bin/env bash
# Session 9's lease (nvidia-h200-x2 with needs_h200), calls one right after another (the machine
# is given back after 30 s idle); experiments/results moved out of the tree while it runs.
#   call 1  carry [.whl/core]   bash experiments/gpu/lease_s9.sh 1
#           GPU 1: the stage sweeps at paper settings, 64K-256K (kernels/bench/stage_sweep.py):
#             A  forward + dq, the halves (two dots of D/2) against whole rows (whole_qk: one dot),
#             B  forward tiles and stages over A's pick, C  dq tiles and stages over A's pick;
#           GPU 0: the GPU tests of the kernels (the RoPE key step of session 8, never run on a
#             GPU), then D: the dk/dv kernels' tiles and stages.
#           -> the picks merged into /root/s9/launch.txt (the fastest variant of each sweep,
#              checked against the base at every length), OUT/sweeps.tgz
#   call 2  bash experiments/gpu/lease_s9.sh 2
#           GPU 0: the kernel benchmark at paper settings with call 1's pick (triton, det, dense,
#             S2) and the longest length that fits (--fit, target 5);
#           GPU 1: the 7B LoRA+ step, S2 against MS at 64K and 128K with the pick, two warm-ups;
#             then the benchmark at paper settings with positions on the selected tokens
#             (--pe selected, ours only: never timed)  -> OUT/bench.tgz
#   call 3  bash experiments/gpu/lease_s9.sh 3
#           GPU 0: the benchmark at (64, 64, 8) with the pick; GPU 1: the 7B step at 32K
#           -> OUT/sparse.tgz
#   (as run: call 2's 7B job was cut by its 330 s limit before MS at 128K, so call 3 ran MS at
#   128K alone on GPU 1 beside the (64, 64, 8) benchmark, and a fourth call the 7B step at 32K
#   beside a stage sweep under RoPE on the fly (pe="selected": "E_rope"); see kernels/README.md)
#   call 4  carry [.whl/core]   bash experiments/gpu/lease_s9.sh 4   (a second lease, fresh machine)
#           GPU 0: the GPU tests with the adopted defaults; GPU 1: the selection's item order
#           (select_probe, shallow against shallow+select_order=kv, 64K-256K) and the stages
#           under RoPE on the fly (dk summed in the keys' rotated frame; q rotated once per launch
#           against in every program: rotate_q_once)
#   (as run: a last call of that lease ran the paper benchmark under pe="selected", ours only,
#   with --launch rotate_q_once=true: kernels/bench/results/*_s9_paper_selected_rotq.*; then
#   rotate_q_once was confined to the dk/dv launch, where all of its gain was, and adopted)
set -uo pipefail
CALL=${1:?usage: lease_s9.sh 1|2|3|4}
source "$(dirname "$0")/lease_common.sh" "${CTXLAB_CALL_SECONDS:-560}"
W=/root/s9
mkdir -p "$W/sweep" "$W/k" "$W/ft"
day=$(date -u +%F)
sweep() {  # GPU, stem, time limit (s), then stage_sweep's own arguments
  local gpu=$1 stem=$2 limit=$3
  shift 3
  CUDA_VISIBLE_DEVICES=$gpu timeout "$limit" python3 -m ctxlab.kernels.bench.stage_sweep --setting paper \
    --lengths 64K,128K,256K --out "$W/sweep" --stem "stage_sweep_${day}_${card}_s9_$stem" "$@" \
    > "$W/sweep/$stem.log" 2>&1
  grep -h -A20 '^| case' "$W/sweep/stage_sweep_${day}_${card}_s9_$stem.md" 2>/dev/null
}
picked() {  # the launch settings of the sweeps given, merged
  local files=()
  for stem in "$@"; do
    f="$W/sweep/stage_sweep_${day}_${card}_s9_$stem.json"
    [ -f "$f" ] && files+=("$f")
  done
  [ ${#files[@]} -gt 0 ] && python3 -m ctxlab.kernels.bench.stage_sweep --pick "$(IFS=,; echo "${files[*]}")"
}
case $CALL in
  1)
    (
      sweep 1 A_whole 200 --stages fwd,dq --variants "base;whole_qk=true"
      whole=$(picked A_whole)
      echo "A picks: '${whole}'"
      sweep 1 B_fwd 150 --stages fwd --launch "$whole" --variants \
        "base;fwd_stages=3;fwd_block_n=64+fwd_stages=3;fwd_block_n=64+fwd_stages=4;fwd_block_m=64+fwd_block_n=64+fwd_warps=4+fwd_stages=3"
      sweep 1 C_dq $(( $(left) - 20 )) --stages dq --launch "$whole" --variants \
        "base;dq_stages=3;dq_block_n=64+dq_stages=3;dq_block_m=64+dq_block_n=64+dq_warps=4+dq_stages=3"
    ) &
    CUDA_VISIBLE_DEVICES=0 timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=8 \
      tests/test_ms_triton.py tests/test_ms_select_exact.py > "$W/sweep/gpu_tests.log" 2>&1
    tail -4 "$W/sweep/gpu_tests.log"
    sweep 0 D_dkv $(( $(left) - 25 )) --stages dkv --variants \
      "base;sel_stages=3;sel_block_m=32;sel_block_m=128+sel_warps=8;sel_block_n=128+sel_warps=8;dkv_block_n=128+dkv_warps=8;dkv_stages=3"
    wait
    picked A_whole B_fwd C_dq D_dkv > "$W/launch.txt"
    echo "launch picked: '$(cat "$W/launch.txt")'"
    tar -czf "$OUT/sweeps.tgz" -C "$W" sweep launch.txt ;;
  2)
    launch=$(cat "$W/launch.txt" 2>/dev/null || true)
    echo "launch: '$launch'"
    CUDA_VISIBLE_DEVICES=0 timeout $(( $(left) - 15 )) python3 -m ctxlab.kernels.bench.run --preset h100_issue14 \
      --cases paper --ops triton,triton_det,dense,s2 --launch "$launch" --out "$W/k" \
      --stem "ms_attention_${day}_${card}_s9_paper" --fit 262144,4194304 \
      --time-limit-s $(( $(left) - 200 )) > "$W/k/bench_paper.log" 2>&1 &
    (
      CUDA_VISIBLE_DEVICES=1 timeout 330 python3 -m ctxlab.bench.finetune --out "$W/ft" \
        --tag "finetune_llama2_7b_H200_1gpu_${day}_s9_64k_128k" --lengths 65536,131072 --variants s2,ms \
        --launch "$launch" --warmup 2 --steps 2 --long-steps 2 > "$W/ft/log_64k_128k.txt" 2>&1
      tail -8 "$W/ft/log_64k_128k.txt" | cut -c1-300
      CUDA_VISIBLE_DEVICES=1 timeout $(( $(left) - 15 )) python3 -m ctxlab.kernels.bench.run --preset h100_issue14 \
        --cases paper --pe selected --ops triton --launch "$launch" --out "$W/k" \
        --stem "ms_attention_${day}_${card}_s9_paper_selected" --time-limit-s $(( $(left) - 60 )) \
        > "$W/k/bench_paper_selected.log" 2>&1
    ) &
    wait
    grep -h -A8 '^Summary' "$W/k/"*_s9_paper*.md 2>/dev/null | cut -c1-400
    grep -h -A10 '^Longest' "$W/k/"*_s9_paper.md 2>/dev/null
    tar -czf "$OUT/bench.tgz" -C "$W" k ft launch.txt ;;
  3)
    launch=$(cat "$W/launch.txt" 2>/dev/null || true)
    echo "launch: '$launch'"
    CUDA_VISIBLE_DEVICES=0 timeout $(( $(left) - 15 )) python3 -m ctxlab.kernels.bench.run --preset h100_issue14 \
      --cases sparse --ops triton,s2 --launch "$launch" --out "$W/k" \
      --stem "ms_attention_${day}_${card}_s9_sparse" --time-limit-s $(( $(left) - 90 )) \
      > "$W/k/bench_sparse.log" 2>&1 &
    CUDA_VISIBLE_DEVICES=1 timeout $(( $(left) - 15 )) python3 -m ctxlab.bench.finetune --out "$W/ft" \
      --tag "finetune_llama2_7b_H200_1gpu_${day}_s9_32k" --lengths 32768 --variants s2,ms \
      --launch "$launch" --warmup 2 --steps 3 > "$W/ft/log_32k.txt" 2>&1 &
    wait
    grep -h -A8 '^Summary' "$W/k/"*_s9_sparse.md 2>/dev/null | cut -c1-400
    tail -6 "$W/ft/log_32k.txt" | cut -c1-300
    tar -czf "$OUT/sparse.tgz" -C "$W" k ft launch.txt ;;
  4)
    # A second machine (fresh): the GPU tests with the new defaults (whole rows, three forward
    # stages; dk of the selected keys summed in the rotated frame under RoPE), and the item order
    # of the selection kernels (select_order) timed and checked against torch's indices.
    CUDA_VISIBLE_DEVICES=0 timeout 330 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=8 \
      tests/test_ms_triton.py tests/test_ms_select_exact.py > "$W/sweep/gpu_tests_call4.log" 2>&1 &
    (
      CUDA_VISIBLE_DEVICES=1 timeout 240 python3 -m ctxlab.kernels.bench.select_probe --lengths 64K,128K,256K \
        --settings paper,sparse --variants "shallow;shallow+select_order=kv" --out "$W/sweep" \
        > "$W/sweep/select_probe.log" 2>&1
      cut -c1-600 "$W/sweep/select_probe.jsonl"
      CUDA_VISIBLE_DEVICES=1 timeout $(( $(left) - 20 )) python3 -m ctxlab.kernels.bench.stage_sweep --setting paper \
        --pe selected --lengths 64K,128K --out "$W/sweep" --stem "stage_sweep_${day}_${card}_s9_F_rope" \
        --variants "base;rotate_q_once=true" > "$W/sweep/F_rope.log" 2>&1
      grep -h -A6 '^| case' "$W/sweep/stage_sweep_${day}_${card}_s9_F_rope.md"
    ) &
    wait
    tail -12 "$W/sweep/gpu_tests_call4.log"
    tar -czf "$OUT/call4.tgz" -C "$W" sweep ;;
  *) echo "lease_s9.sh: call must be 1, 2, 3 or 4" >&2; exit 2 ;;
esac
ls -la "$OUT"
