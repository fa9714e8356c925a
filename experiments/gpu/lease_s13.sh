#!/usr/bin/env bash
# Session 13's lease (nvidia-h200-x4; same rules as lease_s12.sh: experiments/results moved aside
# during the lease, calls follow at once). One full call does the next lease's calls 1, 4 and part
# of 2 side by side, one GPU each:
#   call 1  carry [.whl/core]   bash experiments/gpu/lease_s13.sh 1
#           GPU 0: the GPU tests of the kernels (with region_constexpr's two cases), then the kernel
#           benchmark at paper settings (ours, ours with region_constexpr, det, dense, S2);
#           GPU 1: the stage sweep at paper settings, base against region_constexpr=true, then the
#           benchmark at (64, 64, 8) (ours, region_constexpr, det, S2);
#           GPU 2: Nsight Compute (if it reads counters here: checked first) of forward, dq and
#           dk/dv at paper 64K and over contiguous keys (prefix), then paper forward and dq with
#           region_constexpr; without ncu, the stage sweep at (64, 64, 8) instead;
#           GPU 3: the 7B LoRA+ step at 64K, S2 and MS (defaults), then MS with region_constexpr
#           -> OUT/kernels.tgz, OUT/ncu.tgz, OUT/ft.tgz
#   call 2  carry [.whl/core]   bash experiments/gpu/lease_s13.sh 2
#           call 1's profile found ptxas serializing the forward's wgmma with region_constexpr at
#           w = 16 (C7515); selected_one_loop avoids it. GPU 0: the GPU tests (all, 480 s);
#           GPU 1 and 3: forward and dq stage sweep at paper settings (32K-64K, 128K-256K), GPU 2
#           at (64, 64, 8), 32K-256K: base, region_constexpr, selected_one_loop, both, and
#           region_constexpr with 2 forward stages  -> OUT/kernels2.tgz
#   call 3  carry [.whl/core]   bash experiments/gpu/lease_s13.sh 3
#           the adopted defaults (region_constexpr, 2 forward stages). GPU 0: the GPU tests, then
#           the 7B step at 32K; GPU 1, 2: the kernel benchmark at paper settings and at (64, 64, 8);
#           GPU 3: the 7B step S2 vs MS at 64K and 128K  -> OUT/kernels3.tgz, OUT/ft3.tgz
set -uo pipefail
CALL=${1:?usage: lease_s13.sh 1|2|3}
source "$(dirname "$0")/lease_common.sh" "${CTXLAB_CALL_SECONDS:-565}"
W=/root/s13
mkdir -p "$W/k" "$W/ncu" "$W/ft"
stem="ms_attention_$(date -u +%F)_${card}"
rc=region_constexpr=true
case $CALL in
  1)
    (
      CUDA_VISIBLE_DEVICES=0 timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=8 \
        tests/test_ms_triton.py tests/test_ms_select_exact.py > "$W/k/gpu_tests.log" 2>&1
      CUDA_VISIBLE_DEVICES=0 timeout $(( $(left) - 15 )) python3 -m ctxlab.kernels.bench.run --preset h100_issue14 \
        --cases paper --ops triton,triton:$rc,triton_det,dense,s2 --out "$W/k" --stem "${stem}_s13_paper" \
        --time-limit-s $(( $(left) - 100 )) > "$W/k/bench_paper.log" 2>&1
    ) &
    (
      CUDA_VISIBLE_DEVICES=1 timeout 200 python3 -m ctxlab.kernels.bench.stage_sweep --setting paper \
        --lengths 64K,128K,256K --out "$W/k" --stem "stage_sweep_$(date -u +%F)_${card}_s13_paper" \
        --variants "base;$rc" > "$W/k/sweep_paper.log" 2>&1
      CUDA_VISIBLE_DEVICES=1 timeout $(( $(left) - 15 )) python3 -m ctxlab.kernels.bench.run --preset h100_issue14 \
        --cases sparse --ops triton,triton:$rc,triton_det,s2 --out "$W/k" --stem "${stem}_s13_sparse" \
        --time-limit-s $(( $(left) - 90 )) > "$W/k/bench_sparse.log" 2>&1
    ) &
    (
      if ncu --version > "$W/ncu/ncu_version.txt" 2>&1; then
        for spec in "paper fwd" "paper dq" "paper dkv" "prefix fwd" "prefix dq" "prefix dkv" "paper fwd $rc" "paper dq $rc"; do
          set -- $spec; setting=$1 stage=$2 launch=${3:-}
          [ "$(left)" -lt 50 ] && break
          name="${setting}_64K_${stage}${launch:+_rc}"
          kernel=regex:ms_attn_fwd_kernel; skip=1; count=1
          [ $stage = dq ] && kernel=regex:ms_attn_bwd_dq_kernel && skip=0
          [ $stage = dkv ] && kernel=regex:ms_attn_bwd_dkv && skip=0 && count=2
          CUDA_VISIBLE_DEVICES=2 timeout $(( $(left) - 20 )) ncu --clock-control none --kernel-name "$kernel" \
            --launch-skip $skip --launch-count $count --set full -o "$W/ncu/$name" \
            python3 experiments/gpu/profile_stage.py --setting $setting --length 64K --stage $stage \
            --launch "$launch" > "$W/ncu/$name.log" 2>&1
          ncu --import "$W/ncu/$name.ncu-rep" --page details --csv > "$W/ncu/${name}_details.csv" 2>/dev/null
          ncu --import "$W/ncu/$name.ncu-rep" --page source --csv --print-source sass > "$W/ncu/${name}_sass.csv" 2>/dev/null
        done
      else
        echo "no ncu on this machine" >> "$W/ncu/ncu_version.txt"
        CUDA_VISIBLE_DEVICES=2 timeout $(( $(left) - 20 )) python3 -m ctxlab.kernels.bench.stage_sweep --setting sparse \
          --lengths 32K,64K,128K --out "$W/k" --stem "stage_sweep_$(date -u +%F)_${card}_s13_sparse" \
          --variants "base;$rc" > "$W/k/sweep_sparse.log" 2>&1
      fi
    ) &
    (
      CUDA_VISIBLE_DEVICES=3 timeout 300 python3 -m ctxlab.bench.finetune --out "$W/ft" \
        --tag finetune_7b_s13_64k --lengths 65536 --variants s2,ms --warmup 2 --steps 3 > "$W/ft/log_default.txt" 2>&1
      CUDA_VISIBLE_DEVICES=3 timeout $(( $(left) - 15 )) python3 -m ctxlab.bench.finetune --out "$W/ft" \
        --tag finetune_7b_s13_64k_rc --lengths 65536 --variants ms --warmup 2 --steps 3 --launch $rc \
        > "$W/ft/log_rc.txt" 2>&1
    ) &
    wait
    tail -3 "$W/k/gpu_tests.log"; grep -h -A8 '^Summary' "$W/k/${stem}"_*.md 2>/dev/null | cut -c1-400
    grep -h -A8 '^| case' "$W/k/"stage_sweep_*.md 2>/dev/null
    cat "$W/ncu/ncu_version.txt"; tail -qn 1 "$W/ncu/"*.log 2>/dev/null
    grep -h '^\[bench\]' "$W/ft/"log_*.txt | cut -c1-300
    tar -czf "$OUT/kernels.tgz" -C "$W/k" . ; tar -czf "$OUT/ncu.tgz" -C "$W" ncu; tar -czf "$OUT/ft.tgz" -C "$W" ft ;;
  2)
    V="base;$rc;selected_one_loop=true;$rc+selected_one_loop=true;$rc+fwd_stages=2"
    CUDA_VISIBLE_DEVICES=0 timeout 480 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=8 \
      tests/test_ms_triton.py tests/test_ms_select_exact.py > "$W/k/gpu_tests2.log" 2>&1 &
    for spec in "1 paper 32K,64K" "3 paper 128K,256K" "2 sparse 32K,64K,128K,256K"; do
      set -- $spec
      CUDA_VISIBLE_DEVICES=$1 timeout $(( $(left) - 20 )) python3 -m ctxlab.kernels.bench.stage_sweep --setting $2 \
        --lengths $3 --stages fwd,dq --out "$W/k" --stem "stage_sweep_$(date -u +%F)_${card}_s13_loop_$2_gpu$1" \
        --variants "$V" --time-limit-s $(( $(left) - 120 )) > "$W/k/sweep_loop_$2_gpu$1.log" 2>&1 &
    done
    wait
    tail -3 "$W/k/gpu_tests2.log"; grep -h -A30 '^| case' "$W/k/"stage_sweep_*_s13_loop_*.md 2>/dev/null
    tar -czf "$OUT/kernels2.tgz" -C "$W/k" . ;;
  3)
    mkdir -p "$W/k3" "$W/ft3"
    (
      CUDA_VISIBLE_DEVICES=0 timeout 330 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=8 \
        tests/test_ms_triton.py tests/test_ms_select_exact.py > "$W/k3/gpu_tests3.log" 2>&1
      CUDA_VISIBLE_DEVICES=0 timeout $(( $(left) - 15 )) python3 -m ctxlab.bench.finetune --out "$W/ft3" \
        --tag finetune_7b_s13_32k --lengths 32768 --variants s2,ms --warmup 2 --steps 3 > "$W/ft3/log_32k.txt" 2>&1
    ) &
    CUDA_VISIBLE_DEVICES=1 timeout $(( $(left) - 15 )) python3 -m ctxlab.kernels.bench.run --preset h100_issue14 \
      --cases paper --ops triton,triton_det,dense,s2 --out "$W/k3" --stem "${stem}_s13_final_paper" \
      --time-limit-s $(( $(left) - 100 )) > "$W/k3/bench_paper.log" 2>&1 &
    CUDA_VISIBLE_DEVICES=2 timeout $(( $(left) - 15 )) python3 -m ctxlab.kernels.bench.run --preset h100_issue14 \
      --cases sparse --ops triton,triton_det,s2 --out "$W/k3" --stem "${stem}_s13_final_sparse" \
      --time-limit-s $(( $(left) - 90 )) > "$W/k3/bench_sparse.log" 2>&1 &
    CUDA_VISIBLE_DEVICES=3 timeout $(( $(left) - 15 )) python3 -m ctxlab.bench.finetune --out "$W/ft3" \
      --tag finetune_7b_s13_64k_128k --lengths 65536,131072 --variants s2,ms \
      --warmup 2 --steps 2 --long-steps 2 > "$W/ft3/log_64k_128k.txt" 2>&1 &
    wait
    tail -3 "$W/k3/gpu_tests3.log"; grep -h -A8 '^Summary' "$W/k3/${stem}"_*.md 2>/dev/null | cut -c1-400
    grep -h '^\[bench\]' "$W/ft3/"log_*.txt | cut -c1-250
    tar -czf "$OUT/kernels3.tgz" -C "$W/k3" . ; tar -czf "$OUT/ft3.tgz" -C "$W" ft3 ;;
  *) echo "lease_s13.sh: call must be 1, 2 or 3" >&2; exit 2 ;;
esac
ls -la "$OUT"
