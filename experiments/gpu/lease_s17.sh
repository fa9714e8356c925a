#!/usr/bin/env bash
# The next lease after session 16 (nvidia-h200, one GPU; experiments/results moved aside during the
# lease; carry [.whl/core]). Not run yet.
#   call 1  bash experiments/gpu/lease_s17.sh 1
#           Nsight Compute of the Gluon dk/dv of the selected keys at paper 64K, with and without
#           dq inside (experiments/gpu/profile_stage.py --stage dkvdq / dkv, GPU_CONFIG), the
#           question of kernels/README.md's session 16: where the fused kernel's ~11 ms beyond its
#           extra GEMM go (the consumers' meeting each step, the dq stores, the TMA reductions);
#           then every GPU test of the kernels in one call (never done in one: sessions 15-16 ran
#           them in parts)  -> OUT/s17a.tgz
#   call 2  bash experiments/gpu/lease_s17.sh 2
#           target 1 at 256K (the selection 10.5% of ours there, session 16; 30.1 ms where 28.7
#           would do): the shallow selection's launch variants at paper 128K and 256K
#           (select_probe, each variant's indices checked against ms_select_torch's)
#           -> OUT/s17b.tgz
set -uo pipefail
CALL=${1:?usage: lease_s17.sh 1|2}
source "$(dirname "$0")/lease_common.sh" "${CTXLAB_CALL_SECONDS:-570}"
case $CALL in
  1)
    R=$OUT/s17a; mkdir -p "$R/ncu"
    ncu --version > "$R/ncu/ncu_version.txt" 2>&1 || echo "no ncu on this machine" >> "$R/ncu/ncu_version.txt"
    for stage in dkv dkvdq; do
      name="paper_64K_${stage}_gluon"
      timeout 120 ncu --clock-control none --kernel-name regex:ms_attn_bwd_dkv_sel_ws_kernel \
        --launch-skip 1 --launch-count 1 --set full -o "$R/ncu/$name" \
        python3 experiments/gpu/profile_stage.py --setting paper --length 64K --stage $stage \
        > "$R/ncu/$name.log" 2>&1
      ncu --import "$R/ncu/$name.ncu-rep" --page details --csv > "$R/ncu/${name}_details.csv" 2>/dev/null
      ncu --import "$R/ncu/$name.ncu-rep" --page raw --csv 2>/dev/null | gzip > "$R/ncu/${name}_raw.csv.gz"
      ncu --import "$R/ncu/$name.ncu-rep" --page source --csv --print-source sass 2>/dev/null \
        | gzip > "$R/ncu/${name}_sass.csv.gz"
      rm -f "$R/ncu/$name.ncu-rep"
    done
    python3 -m ctxlab.kernels.bench.ncu_summary "$R/ncu" --out "$R/ncu/ncu_summary.md" > /dev/null 2>&1
    head -n 40 "$R/ncu/ncu_summary.md"
    timeout $(( $(left) - 20 )) python3 -m pytest -q -m gpu -p no:cacheprovider -rf --durations=10 \
      tests/test_ms_triton.py > "$R/gpu_tests_all.log" 2>&1
    tail -n 6 "$R/gpu_tests_all.log"
    tar -czf "$OUT/s17a.tgz" -C "$OUT" s17a && rm -rf "$R"
    ;;
  2)
    R=$OUT/s17b; mkdir -p "$R"
    V="shallow;shallow+shallow_mask_steps=8;shallow+shallow_mask_steps=32;shallow+shallow_mask_steps=64"
    V="$V;shallow+shallow_sort_rows=2;shallow+shallow_sort_rows=8;shallow+shallow_stages=3"
    V="$V;shallow+shallow_warps=8;shallow+shallow_k=16;shallow+shallow_cap=64;shallow+select_order=kv"
    timeout $(( $(left) - 20 )) python3 -m ctxlab.kernels.bench.select_probe --lengths 128K,256K \
      --settings paper --variants "$V" --out "$R" > "$R/select_probe.log" 2>&1
    cat "$R/select_probe.md"
    tar -czf "$OUT/s17b.tgz" -C "$OUT" s17b && rm -rf "$R"
    ;;
  *) echo "lease_s17.sh: call must be 1 or 2" >&2; exit 2 ;;
esac
