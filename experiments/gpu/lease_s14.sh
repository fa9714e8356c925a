#!/usr/bin/env bash
# Session 14's lease (nvidia-h200-x2; experiments/results moved aside during the lease):
#   call 1  carry [.whl/core]   bash experiments/gpu/lease_s14.sh 1
#           the warp-specialized Gluon forward (fwd_gluon) on the GPU for the first time.
#           GPU 0: its forward test against the Triton forward first (a hang or a wrong result
#           shows at once), then all GPU tests of the kernels (e3db397's RoPE forward launch and
#           the three +gluon cases among them);
#           GPU 1: forward stage sweep, base (GPU_CONFIG) against fwd_gluon at 128-key steps and 2
#           slots and at 64-key steps and 4 slots, paper settings 32K-256K, then (64, 64, 8)
#           -> OUT/s14/ (logs, sweep rows .jsonl/.json/.md)
#   call 2  carry [.whl/core]   bash experiments/gpu/lease_s14.sh 2
#           fwd_gluon adopted in GPU_CONFIG. GPU 0: all GPU tests of the kernels (every forward
#           without RoPE now the Gluon one), then the kernel benchmark at (64, 64, 8): ours, ours
#           with the Triton forward (fwd_gluon=false), S2; GPU 1: the benchmark at paper settings:
#           ours, ours with the Triton forward, dense, S2  -> OUT/s14b/
#   call 3  carry [.whl/core]   CTXLAB_CALL_SECONDS=480 bash experiments/gpu/lease_s14.sh 3
#           call 2 failed the two head-dim-64 Gluon cases (the accumulator took the scores' wgmma
#           layout, 128 wide, for 64 columns; fixed). GPU 0: the Gluon GPU tests again, then the
#           7B LoRA+ step at 64K and 128K, S2 and MS; GPU 1: the forward's Gluon settings (3 slots,
#           1 or 2 load warps) at paper and (64, 64, 8) 64K-128K, the selection GPU tests call 2's
#           time limit cut, then the deterministic mode at paper settings  -> OUT/s14c/
#   call 4  carry [.whl/core]   CTXLAB_CALL_SECONDS=230 bash experiments/gpu/lease_s14.sh 4
#           the Gluon dq kernel (dq_gluon) for the first time. GPU 0: the Gluon GPU tests (forward
#           and dq against the Triton kernels, bf16 error cases), then the dq stage sweep at paper
#           64K-128K; GPU 1: the dq stage sweep at paper 32K and (64, 64, 8) 32K-128K: base, dq_gluon
#           at 128-key steps and 2 slots, at 64-key steps and 3 slots  -> OUT/s14d.tgz
#   call 5  (inline, the last 160 s of the session's device time) the 7B step, MS at 64K with
#           --launch dq_gluon=true: python3 -m ctxlab.bench.finetune --lengths 65536 --variants ms
#           --warmup 2 --steps 2 --launch dq_gluon=true (one timed step came back: 9.30 s)
set -uo pipefail
CALL=${1:?usage: lease_s14.sh 1|2|3|4}
source "$(dirname "$0")/lease_common.sh" "${CTXLAB_CALL_SECONDS:-570}"
R=$OUT/s14
mkdir -p "$R"
g=fwd_gluon=true
case $CALL in
  1)
    (
      CUDA_VISIBLE_DEVICES=0 timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -x \
        tests/test_ms_triton.py -k gluon > "$R/gpu_tests_gluon.log" 2>&1
      CUDA_VISIBLE_DEVICES=0 timeout $(( $(left) - 20 )) python3 -m pytest -q -m gpu -p no:cacheprovider \
        --durations=8 tests/test_ms_triton.py tests/test_ms_select_exact.py -k "not gluon" > "$R/gpu_tests.log" 2>&1
    ) &
    (
      for setting in paper sparse; do
        CUDA_VISIBLE_DEVICES=1 timeout $(( $(left) / 2 - 10 )) python3 -m ctxlab.kernels.bench.stage_sweep \
          --setting $setting --lengths 32K,64K,128K,256K --stages fwd \
          --variants "base;$g;$g+fwd_block_n=64+gluon_stages=4" \
          --out "$R" --stem "stage_sweep_$(date -u +%F)_${card}_s14_gluon_$setting" > "$R/sweep_$setting.log" 2>&1
      done
    ) &
    wait
    tail -n 3 "$R"/gpu_tests*.log; grep -h -A12 "^| case" "$R"/*.md | head -40
    ;;
  2)
    R=$OUT/s14b; mkdir -p "$R"
    stem="ms_attention_$(date -u +%F)_${card}_s14"
    (
      CUDA_VISIBLE_DEVICES=0 timeout 330 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=8 \
        tests/test_ms_triton.py tests/test_ms_select_exact.py > "$R/gpu_tests.log" 2>&1
      CUDA_VISIBLE_DEVICES=0 timeout $(( $(left) - 15 )) python3 -m ctxlab.kernels.bench.run --preset h100_issue14 \
        --cases sparse --ops triton,triton:fwd_gluon=false,s2 --out "$R" --stem "${stem}_sparse" \
        --time-limit-s $(( $(left) - 60 )) > "$R/bench_sparse.log" 2>&1
    ) &
    CUDA_VISIBLE_DEVICES=1 timeout $(( $(left) - 15 )) python3 -m ctxlab.kernels.bench.run --preset h100_issue14 \
      --cases paper --ops triton,triton:fwd_gluon=false,dense,s2 --out "$R" --stem "${stem}_paper" \
      --time-limit-s $(( $(left) - 60 )) > "$R/bench_paper.log" 2>&1 &
    wait
    tail -n 3 "$R/gpu_tests.log"; grep -h -A10 '^Summary' "$R/${stem}"_*.md 2>/dev/null | cut -c1-400
    ;;
  3)
    R=$OUT/s14c; mkdir -p "$R"
    (
      CUDA_VISIBLE_DEVICES=0 timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider -rf tests/test_ms_triton.py \
        -k "gluon or d64" > "$R/gpu_tests_gluon.log" 2>&1
      CUDA_VISIBLE_DEVICES=0 timeout $(( $(left) - 15 )) python3 -m ctxlab.bench.finetune --out "$R" \
        --tag finetune_llama2_7b_H200_1gpu_$(date -u +%F)_s14_64k_128k --lengths 65536,131072 --variants s2,ms \
        --warmup 2 --steps 2 --long-steps 2 > "$R/finetune_64k_128k.log" 2>&1
    ) &
    (
      for setting in paper sparse; do
        CUDA_VISIBLE_DEVICES=1 timeout 60 python3 -m ctxlab.kernels.bench.stage_sweep \
          --setting $setting --lengths 64K,128K --stages fwd \
          --variants "base;gluon_stages=3;gluon_load_warps=1;gluon_load_warps=2" \
          --out "$R" --stem "stage_sweep_$(date -u +%F)_${card}_s14_gluon_settings_$setting" > "$R/sweep_$setting.log" 2>&1
      done
      CUDA_VISIBLE_DEVICES=1 timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider -rf tests/test_ms_triton.py \
        tests/test_ms_select_exact.py -k "select" > "$R/gpu_tests_select.log" 2>&1
      CUDA_VISIBLE_DEVICES=1 timeout $(( $(left) - 15 )) python3 -m ctxlab.kernels.bench.run --preset h100_issue14 \
        --cases paper --ops triton_det --out "$R" --stem "ms_attention_$(date -u +%F)_${card}_s14_det_paper" \
        --time-limit-s $(( $(left) - 40 )) > "$R/bench_det.log" 2>&1
    ) &
    wait
    tail -n 4 "$R"/gpu_tests_*.log; grep -h '^\[bench\]' "$R"/finetune_*.log | cut -c1-250
    grep -h -A10 '^| case' "$R"/*.md | head -30
    ;;
  4)
    R=$OUT/s14d; mkdir -p "$R"
    V="base;dq_gluon=true;dq_gluon=true+dq_block_n=64+gluon_dq_stages=3"
    (
      CUDA_VISIBLE_DEVICES=0 timeout 110 python3 -m pytest -q -m gpu -p no:cacheprovider -rf tests/test_ms_triton.py \
        -k gluon > "$R/gpu_tests_gluon.log" 2>&1
      CUDA_VISIBLE_DEVICES=0 timeout $(( $(left) - 15 )) python3 -m ctxlab.kernels.bench.stage_sweep --setting paper \
        --lengths 64K,128K --stages dq --variants "$V" --out "$R" \
        --stem "stage_sweep_$(date -u +%F)_${card}_s14_gluon_dq_paper" > "$R/sweep_dq_paper.log" 2>&1
    ) &
    (
      CUDA_VISIBLE_DEVICES=1 timeout 60 python3 -m ctxlab.kernels.bench.stage_sweep --setting paper \
        --lengths 32K --stages dq --variants "$V" --out "$R" \
        --stem "stage_sweep_$(date -u +%F)_${card}_s14_gluon_dq_paper32k" > "$R/sweep_dq_paper32k.log" 2>&1
      CUDA_VISIBLE_DEVICES=1 timeout $(( $(left) - 15 )) python3 -m ctxlab.kernels.bench.stage_sweep --setting sparse \
        --lengths 32K,64K,128K --stages dq --variants "$V" --out "$R" \
        --stem "stage_sweep_$(date -u +%F)_${card}_s14_gluon_dq_sparse" > "$R/sweep_dq_sparse.log" 2>&1
    ) &
    wait
    tail -n 6 "$R/gpu_tests_gluon.log"; grep -h -A12 '^| case' "$R"/*.md
    tar -czf "$OUT/s14d.tgz" -C "$OUT" s14d && rm -rf "$R"
    ;;
  *) echo "lease_s14.sh: call must be 1, 2, 3 or 4" >&2; exit 2 ;;
esac
