#!/usr/bin/env bash
# The lease of session 20 (nvidia-h200, one GPU; experiments/results moved aside during the lease;
# carry [.whl/core]).
#   call 1  bash experiments/gpu/lease_s20.sh 1
#           the Gluon dk/dv of the selected keys as persistent programs (gluon_dkv_persistent: one
#           program per SM whose load warpgroup copies the next chunk's k and v rows while the
#           consumers finish the current one): the dk/dv stage, base against persistent, paper 64K
#           (32 kv heads, the 7B's shape), paper 64K-128K (8), (64, 64, 8) 32K-64K; then the Gluon
#           GPU match tests (the persistent partial sums must equal the default's bits)
#           -> OUT/s20a.tgz
#           (ran on bf666bb: persistent 1.3-3.4% faster in all 5 cases; 3 match tests passed)
#   call 2  bash experiments/gpu/lease_s20.sh 2
#           the two persistent bf16 error cases (whole forward and backward against PyTorch's
#           error); target 4 with it: the 7B LoRA+ step at 64K, S2 and MS (persistent dk/dv, the
#           selection's counts unspecialized) in one process, 2 warm-ups + 2 timed steps and one
#           profiled step each; then the whole backward, base against persistent, paper 32K-128K
#           and (64, 64, 8) 32K  -> OUT/s20b.tgz
#           (ran on 584be87: the 2 bf16 cases failed in the tests' interpreter config, fixed in
#           the next commit; 7B 64K S2 9.028, MS 9.107 s (0.99x), MS's GPU idle 91 ms against 25;
#           backward 0.6-3.9% faster with persistent)
#   call 3  bash experiments/gpu/lease_s20.sh 3
#           the new defaults (persistent dk/dv; the selection's flagged items listed on the device, no
#           host sync): GPU tests (the selection under sync debug mode "error", the Gluon dk/dv bf16
#           cases, the paper-settings match test); where MS attention's forward + backward still
#           syncs (sync debug mode "warn", paper 64K, 32 kv heads); target 4: the 7B LoRA+ step at
#           64K, S2 and MS, 2 warm-ups + 2 timed + 1 profiled each; target 3b: the kernel benchmark
#           at (64, 64, 8) 32K, S2 beside ours  -> OUT/s20c.tgz
#           (ran on d69f4d5: 5 of 9 tests passed, the fused cases refused by the config check (the
#           persistent default) and the paper match test's base with them; the no-sync test compared
#           with ms_select_torch on random floats (now with the fused selection); 0 syncs in MS
#           attention forward + backward; 7B 64K S2 9.043, MS 9.129 s (0.99x), MS idle 23 ms; 3b
#           0.88x)
#   call 4  bash experiments/gpu/lease_s20.sh 4
#           after call 3's fixes (the persistent dk/dv yields to fused dq; the tests' one-shot base):
#           the same GPU tests again, and the fused bf16 cases; target 4 at 128K: the 7B LoRA+
#           step, S2 and MS, 2 warm-ups + 2 timed steps each  -> OUT/s20d.tgz
#           (ran on 16d4ef8: 8 tests passed, the 9th (paper match) cut by the 150 s; 7B 128K
#           S2 22.589, MS 18.421 s: 1.23x)
#   call 5  bash experiments/gpu/lease_s20.sh 5   (written for the next lease, not run)
#           the paper-settings Gluon match test on the final config (call 4 cut it); Nsight Compute
#           of the persistent dk/dv beside the one-shot kernel at paper 64K with 32 kv heads (where
#           the consumers wait now that the keys come early; how long their reductions hold the
#           tensor pipe idle)  -> OUT/s20e.tgz
set -uo pipefail
CALL=${1:?usage: lease_s20.sh 1-5}
source "$(dirname "$0")/lease_common.sh" "${CTXLAB_CALL_SECONDS:-570}"
day=$(date -u +%F)
# The GPU tests of the new defaults (calls 3 and 4), within 150 s, into LOG.
#   default_tests LOG
default_tests() {
  timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rf tests/test_ms_triton.py \
    -k "never_syncs or (bf16_error and gluondkv) or (gluon_kernels_match and paper)" > "$1" 2>&1
  tail -n 3 "$1"
}
case $CALL in
  1)
    R=$OUT/s20a; mkdir -p "$R"
    sweep_cases "$R" dkv "base;gluon_dkv_persistent=true" "stage_sweep_${day}_${card}_s20_dkv_persistent" 100 \
      "paper 32 64K" "paper 8 64K,128K" "sparse 8 32K,64K"
    grep -h -A8 '^| case' "$R"/*.md
    timeout $(( $(left) - 15 )) python3 -m pytest -q -m gpu -p no:cacheprovider -rf tests/test_ms_triton.py \
      -k "gluon_kernels_match" > "$R/gpu_tests_persistent.log" 2>&1
    tail -n 4 "$R/gpu_tests_persistent.log"
    tar -czf "$OUT/s20a.tgz" -C "$OUT" s20a && rm -rf "$R"
    ;;
  2)
    R=$OUT/s20b; mkdir -p "$R"
    timeout 90 python3 -m pytest -q -m gpu -p no:cacheprovider -rf tests/test_ms_triton.py \
      -k "bf16_error and persistent" > "$R/gpu_tests_persistent_bf16.log" 2>&1
    tail -n 2 "$R/gpu_tests_persistent_bf16.log"
    timeout 360 python3 -m ctxlab.bench.finetune --out "$R" --profile --launch gluon_dkv_persistent=true \
      --tag finetune_llama2_7b_H200_1gpu_${day}_s20_64k_persistent --lengths 65536 --variants s2,ms \
      --warmup 2 --steps 2 --long-steps 2 > "$R/finetune_64k_persistent.log" 2>&1
    grep -h '^\[bench\]' "$R"/finetune_*.log | cut -c1-200
    grep -h -A14 '^Profiled step' "$R"/*.md | cut -c1-300
    sweep_cases "$R" bwd "base;gluon_dkv_persistent=true" "stage_sweep_${day}_${card}_s20_bwd_persistent" \
      $(( ($(left) - 20) / 2 )) "paper 8 32K,64K,128K" "sparse 8 32K"
    grep -h -A8 '^| case' "$R"/*.md
    tar -czf "$OUT/s20b.tgz" -C "$OUT" s20b && rm -rf "$R"
    ;;
  3)
    R=$OUT/s20c; mkdir -p "$R"
    default_tests "$R/gpu_tests_defaults.log"
    timeout 90 python3 - > "$R/sync_probe.log" 2>&1 <<'PY'
import traceback, warnings
import torch
from ctxlab.kernels.ms_attention import ms_attention
q, k, v = (torch.randn(1, 65536, 32, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
opts = dict(region=16, budget=512, merge=64, backend="triton")
ms_attention(q, k, v, **opts).sum().backward()  # compiled outside the probe
torch.cuda.synchronize()
torch.cuda.set_sync_debug_mode("warn")
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    ms_attention(q, k, v, **opts).sum().backward()
torch.cuda.set_sync_debug_mode("default")
print(f"syncs in MS attention forward + backward (paper 64K, 32 kv heads): {len(seen)}")
for w in seen[:8]:
    print("-", str(w.message)[:200], f"({w.filename}:{w.lineno})")
PY
    cat "$R/sync_probe.log" | head -12
    timeout 330 python3 -m ctxlab.bench.finetune --out "$R" --profile \
      --tag finetune_llama2_7b_H200_1gpu_${day}_s20_64k_defaults --lengths 65536 --variants s2,ms \
      --warmup 2 --steps 2 --long-steps 2 > "$R/finetune_64k_defaults.log" 2>&1
    grep -h '^\[bench\]' "$R"/finetune_*.log | cut -c1-200
    grep -h '^Profiled step' "$R"/*.md | cut -c1-300
    stem="ms_attention_${day}_${card}_s20"
    timeout $(( $(left) - 15 )) python3 -m ctxlab.kernels.bench.run --preset h100_issue14 \
      --cases sparse-L32K --ops triton,s2 --out "$R" --stem "${stem}_sparse32k" \
      --time-limit-s $(( $(left) - 40 )) > "$R/bench_sparse32k.log" 2>&1
    grep -h -A10 '^Summary' "$R/${stem}"_*.md 2>/dev/null | cut -c1-400
    tar -czf "$OUT/s20c.tgz" -C "$OUT" s20c && rm -rf "$R"
    ;;
  4)
    R=$OUT/s20d; mkdir -p "$R"
    default_tests "$R/gpu_tests_defaults2.log"
    timeout $(( $(left) - 20 )) python3 -m ctxlab.bench.finetune --out "$R" \
      --tag finetune_llama2_7b_H200_1gpu_${day}_s20_128k_defaults --lengths 131072 --variants s2,ms \
      --warmup 2 --steps 2 --long-steps 2 > "$R/finetune_128k_defaults.log" 2>&1
    grep -h '^\[bench\]' "$R"/finetune_*.log | cut -c1-200
    tar -czf "$OUT/s20d.tgz" -C "$OUT" s20d && rm -rf "$R"
    ;;
  5)
    R=$OUT/s20e; mkdir -p "$R/ncu"
    timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rf tests/test_ms_triton.py \
      -k "gluon_kernels_match and paper" > "$R/gpu_tests_match_paper.log" 2>&1
    tail -n 3 "$R/gpu_tests_match_paper.log"
    ncu_stage "$R/ncu" paper_64K_kv32_dkv_persistent ms_attn_bwd_dkv_sel_persistent_kernel 1 1 150 \
      --setting paper --length 64K --kv-heads 32 --stage dkv
    ncu_stage "$R/ncu" paper_64K_kv32_dkv_oneshot ms_attn_bwd_dkv_sel_ws_kernel 1 1 150 \
      --setting paper --length 64K --kv-heads 32 --stage dkv --launch gluon_dkv_persistent=false
    python3 -m ctxlab.kernels.bench.ncu_summary "$R/ncu" --out "$R/ncu/ncu_summary.md" > /dev/null 2>&1
    head -n 8 "$R/ncu/ncu_summary.md"
    tar -czf "$OUT/s20e.tgz" -C "$OUT" s20e && rm -rf "$R"
    ;;
esac
