#!/usr/bin/env bash
# Session 12's lease (nvidia-h200-x2; on one H200 run each call's GPU 0 and GPU 1 parts one after
# the other). experiments/results moved aside during the lease; calls follow at once.
#   call 1  carry [.whl/core]   bash experiments/gpu/lease_s12.sh 1
#           GPU 0: the GPU tests of the kernels (the own-segment dk/dv kernel on TMA descriptors
#           and warp-specialized among them), then the dk/dv stage and the whole backward at
#           (64, 64, 8) by variant; GPU 1: the same at paper settings 32K-256K
#           (base; dkv_tma; dkv_tma + dkv_ws; with 3 stages)  -> OUT/tma.tgz
#   call 2  bash experiments/gpu/lease_s12.sh 2   (an uncommitted ab_base_triton_kernels.py at the
#           root: the kernels before the change under test)
#           GPU 0: forward, dq, dk/dv stages at paper settings 32K-256K, this tree's kernels (and
#           with fwd_rescale=8) then the base's, then the kernel benchmark (ours, ours with
#           fwd_rescale=8, dense, S2); GPU 1: the same A/B at
#           (64, 64, 8), then the GPU tests of the kernels  -> OUT/ab.tgz
#           (Ran with fwd_rescale, since removed: the base side then failed, its host passing
#           RESCALE to kernels without it; call 3 repeats the A/B.)
#   call 3  bash experiments/gpu/lease_s12.sh 3   (ab_base_triton_kernels.py as for call 2)
#           GPU 0: the A/B at paper settings, then dense causal attention through MS's own
#           kernels (setting "prefix": n <= T, the dense prefix alone) 32K-128K by stage, then
#           dense SDPA at the same lengths; GPU 1: the A/B at (64, 64, 8), then the GPU tests
#           -> OUT/ab3.tgz
#   call 4  carry [.whl/core]   bash experiments/gpu/lease_s12.sh 4
#           GPU 0: the forward stage at paper settings 32K-256K, selected keys by index against
#           gathered copies (fwd_gather), then the GPU tests of the kernels; GPU 1: the same at
#           (64, 64, 8), then at paper settings with RoPE on the fly (pe=selected) 64K-128K
#           -> OUT/gather.tgz
#           (fwd_gather since removed: the forward with it was 1.4-3.0x slower, its gather
#           included; a call 5 that timed the gather alone found no device time left.)
set -uo pipefail
CALL=${1:?usage: lease_s12.sh 1|2|3|4}
source "$(dirname "$0")/lease_common.sh" "${CTXLAB_CALL_SECONDS:-560}"
W=/root/s12
mkdir -p "$W/k" "$W/ft"
stem="ms_attention_$(date -u +%F)_${card}_s12"
sweep="stage_sweep_$(date -u +%F)_${card}_s12"
tma="base;dkv_tma=true;dkv_tma=true+dkv_ws=true;dkv_tma=true+dkv_ws=true+dkv_stages=3"
case $CALL in
  1)
    (
      CUDA_VISIBLE_DEVICES=0 timeout 330 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=8 \
        tests/test_ms_triton.py > "$W/k/gpu_tests.log" 2>&1
      CUDA_VISIBLE_DEVICES=0 timeout $(( $(left) - 15 )) python3 -m ctxlab.kernels.bench.stage_sweep \
        --setting sparse --lengths 32K,64K,128K,256K --stages dkv,bwd --variants "$tma" --out "$W/k" \
        --stem "${sweep}_sparse_tma" --time-limit-s $(( $(left) - 60 )) > "$W/k/sweep_sparse.log" 2>&1
    ) &
    CUDA_VISIBLE_DEVICES=1 timeout $(( $(left) - 15 )) python3 -m ctxlab.kernels.bench.stage_sweep \
      --setting paper --lengths 32K,64K,128K,256K --stages dkv,bwd --variants "$tma" --out "$W/k" \
      --stem "${sweep}_paper_tma" --time-limit-s $(( $(left) - 60 )) > "$W/k/sweep_paper.log" 2>&1 &
    wait
    tail -4 "$W/k/gpu_tests.log"; grep -h -A30 '^| case' "$W/k/"stage_sweep_*.md 2>/dev/null
    tail -3 "$W/k/"sweep_*.log
    tar -czf "$OUT/tma.tgz" -C "$W/k" . ;;
  2|3)
    # the base: a second overlay whose ctxlab.kernels is this tree's kernels/ with the base's file
    base=/root/ab_base
    rm -rf "$base" && mkdir -p "$base" && cp -r "$CTXLAB_OVERLAY/." "$base/" && rm -f "$base/ctxlab/kernels"
    cp -r kernels "$base/ctxlab/kernels" && cp ab_base_triton_kernels.py "$base/ctxlab/kernels/ms_attention/triton_kernels.py"
    tag=ab; [ "$CALL" = 3 ] && tag=ab3
    ab() {  # ab GPU SETTING: this tree, then the base, one after the other on one GPU
      for side in new base; do
        pp=$PYTHONPATH; [ $side = base ] && pp=$base
        variants="base"; [ $side = new ] && [ "$CALL" = 2 ] && variants="base;fwd_rescale=8"
        CUDA_VISIBLE_DEVICES=$1 PYTHONPATH=$pp timeout 200 python3 -m ctxlab.kernels.bench.stage_sweep \
          --setting $2 --lengths 32K,64K,128K,256K --stages fwd,dq,dkv --variants "$variants" --out "$W/k" \
          --stem "${sweep}_$2_${tag}_$side" --time-limit-s 150 > "$W/k/sweep_$2_${tag}_$side.log" 2>&1
      done
    }
    (
      ab 0 paper
      if [ "$CALL" = 3 ]; then
        CUDA_VISIBLE_DEVICES=0 timeout 150 python3 -m ctxlab.kernels.bench.stage_sweep --setting prefix \
          --lengths 32K,64K,128K --stages fwd,dq,dkv --out "$W/k" --stem "${sweep}_prefix" \
          --time-limit-s 100 > "$W/k/sweep_prefix.log" 2>&1
        CUDA_VISIBLE_DEVICES=0 timeout $(( $(left) - 15 )) python3 -m ctxlab.kernels.bench.run --preset h100_issue14 \
          --cases paper-L32K,paper-L64K,paper-L128K --ops dense --out "$W/k" --stem "${stem}_dense" \
          --time-limit-s $(( $(left) - 40 )) > "$W/k/bench_dense.log" 2>&1
      else
        CUDA_VISIBLE_DEVICES=0 timeout $(( $(left) - 15 )) python3 -m ctxlab.kernels.bench.run --preset h100_issue14 \
          --cases paper --ops triton,triton:fwd_rescale=8,dense,s2 --out "$W/k" --stem "${stem}_paper" \
          --time-limit-s $(( $(left) - 60 )) > "$W/k/bench_paper.log" 2>&1
      fi
    ) &
    (
      ab 1 sparse
      CUDA_VISIBLE_DEVICES=1 timeout $(( $(left) - 15 )) python3 -m pytest -q -m gpu -p no:cacheprovider \
        --durations=5 tests/test_ms_triton.py > "$W/k/gpu_tests_${tag}.log" 2>&1
    ) &
    wait
    tail -n 4 "$W/k/gpu_tests_${tag}.log"; grep -h -A10 '^| case' "$W/k/"stage_sweep_*.md 2>/dev/null
    grep -h -A8 '^Summary' "$W/k/${stem}"_*.md 2>/dev/null | cut -c1-400
    tar -czf "$OUT/${tag}.tgz" -C "$W/k" . ;;
  4)
    g="base;fwd_gather=true"
    (
      CUDA_VISIBLE_DEVICES=0 timeout 150 python3 -m ctxlab.kernels.bench.stage_sweep --setting paper \
        --lengths 32K,64K,128K,256K --stages fwd --variants "$g" --out "$W/k" --stem "${sweep}_paper_gather" \
        --time-limit-s 110 > "$W/k/sweep_paper_gather.log" 2>&1
      CUDA_VISIBLE_DEVICES=0 timeout $(( $(left) - 15 )) python3 -m pytest -q -m gpu -p no:cacheprovider \
        --durations=5 tests/test_ms_triton.py > "$W/k/gpu_tests_gather.log" 2>&1
    ) &
    (
      CUDA_VISIBLE_DEVICES=1 timeout 150 python3 -m ctxlab.kernels.bench.stage_sweep --setting sparse \
        --lengths 32K,64K,128K,256K --stages fwd --variants "$g" --out "$W/k" --stem "${sweep}_sparse_gather" \
        --time-limit-s 110 > "$W/k/sweep_sparse_gather.log" 2>&1
      CUDA_VISIBLE_DEVICES=1 timeout 150 python3 -m ctxlab.kernels.bench.stage_sweep --setting paper --pe selected \
        --lengths 64K,128K --stages fwd --variants "$g" --out "$W/k" --stem "${sweep}_paper_rope_gather" \
        --time-limit-s 100 > "$W/k/sweep_rope_gather.log" 2>&1
    ) &
    wait
    tail -n 4 "$W/k/gpu_tests_gather.log"; grep -h -A10 '^| case' "$W/k/"stage_sweep_*gather.md 2>/dev/null
    tar -czf "$OUT/gather.tgz" -C "$W/k" . ;;
  *) echo "lease_s12.sh: call must be 1-4" >&2; exit 2 ;;
esac
ls -la "$OUT"
