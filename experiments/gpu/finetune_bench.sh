#!/usr/bin/env bash
# The 7B fine-tuning benchmark of the README (issue #6 / #8) on a GPU machine:
#   source experiments/gpu/device_env.sh   # only where the image lacks ctxlab's packages
#   bash experiments/gpu/finetune_bench.sh OUT_DIR [stage ...]
# Stages: short (16K-64K, one GPU), long (128K, one GPU; an OOM case is retried with
# model.mlp_chunk=16384), long_ms (128K MS alone), base (32K and 64K on one GPU: the
# multi-GPU baseline), ddp and fsdp (32K and 64K, dense/s2/ms on every visible GPU; scaling
# efficiency against base.json, else short.json, of the same OUT, or of $CTXLAB_BASELINE).
# Default: short long ddp fsdp. Each stage writes <OUT>/<stage>.json and .md.
set -uo pipefail
OUT=${1:?usage: finetune_bench.sh OUT_DIR [stage ...]}
shift
STAGES=${*:-short long ddp fsdp}
baseline() {  # the one-GPU file the multi-GPU stages compare against
  for f in "$OUT/base.json" "$OUT/short.json" "${CTXLAB_BASELINE:-}"; do
    [ -n "$f" ] && [ -f "$f" ] && { echo --baseline "$f"; return; }
  done
}
mkdir -p "$OUT"
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")
B=(python3 -m ctxlab.bench.finetune --out "$OUT")
DIST=(python3 -m torch.distributed.run --standalone --nproc_per_node "$NGPU" -m ctxlab.bench.finetune --out "$OUT")
for stage in $STAGES; do
  echo "== stage $stage"
  case $stage in
    short) CUDA_VISIBLE_DEVICES=0 "${B[@]}" --tag short --lengths 16384,32768,65536 --variants dense,s2,ms,ms_sparse \
             --steps 2 --long-from 32768 --long-steps 1 ;;
    long)  CUDA_VISIBLE_DEVICES=0 "${B[@]}" --tag long --lengths 131072 --variants ms,ms_sparse,s2 --long-steps 1
           CUDA_VISIBLE_DEVICES=0 "${B[@]}" --tag long_dense --lengths 131072 --variants dense --warmup 0 --long-steps 1
           if grep -q '"status": "oom"' "$OUT/long.json" "$OUT/long_dense.json"; then
             CUDA_VISIBLE_DEVICES=0 "${B[@]}" --tag long_mlpchunk --lengths 131072 --variants ms,s2 --long-steps 1 \
               -- model.mlp_chunk=16384
           fi ;;
    long_ms) CUDA_VISIBLE_DEVICES=0 "${B[@]}" --tag long_ms --lengths 131072 --variants ms --warmup 0 --long-steps 1 ;;
    base)  CUDA_VISIBLE_DEVICES=0 "${B[@]}" --tag base --lengths 32768,65536 --variants dense,s2,ms --steps 1 ;;
    ddp|fsdp) "${DIST[@]}" --tag "$stage" --lengths 32768,65536 --variants dense,s2,ms --steps 1 \
             --strategy "$stage" $(baseline) ;;
    *) echo "unknown stage $stage (short, long, long_ms, base, ddp, fsdp)" >&2; exit 2 ;;
  esac
done
