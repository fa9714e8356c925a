#!/usr/bin/env bash
# Session 13's last short call (nvidia-h200): the adopted defaults (region size compiled in, 2
# forward stages) against the previous ones (run-time region, 3 stages) under RoPE on the fly
# (pe="selected"), forward and dq at paper settings; carry [.whl/core]  -> OUT/*.md, OUT/*.json
source experiments/gpu/device_env.sh >/dev/null 2>&1
mkdir -p "$OUT"
timeout 140 python3 -m ctxlab.kernels.bench.stage_sweep --setting paper --pe selected --lengths 64K,128K \
  --stages fwd,dq --variants "base;region_constexpr=false+fwd_stages=3" --out "$OUT" \
  --stem "stage_sweep_$(date -u +%F)_H200_s13_rope" --time-limit-s 100 > "$OUT/sweep_rope.log" 2>&1
grep -h -A8 '^| case' "$OUT"/*.md; tail -n 3 "$OUT/sweep_rope.log"
