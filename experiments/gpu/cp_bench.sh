#!/usr/bin/env bash
# Context parallelism (issue #18): the Llama 2 7B LoRA+ step (bf16, gradient checkpointing,
# random init; ctxlab.bench.finetune's recipe) with each row split over the GPUs, on a 4-GPU
# machine, in one call of bounded length:
#   source experiments/gpu/device_env.sh && CTXLAB_CP_TIME_LIMIT=420 bash experiments/gpu/cp_bench.sh $OUT [case ...]
# A case is VARIANT@LENGTHxGPUS (variant: dense, s2, ms, ms_causal; GPUS 1 runs one GPU, more run
# torchrun with --context-parallel GPUS). Default: 256K on 4 GPUs, 512K MS on 4 GPUs, the 128K
# one-GPU baselines, then 512K S2 and dense, in that order, as far as the time limit allows.
# Every case is its own process under `timeout` with the time left, so an OOM (recorded as
# "oom"), a crash or a slow case never stops the script; cases that no longer fit in the limit
# are recorded as "not run". Writes $OUT/cp_bench.{json,md} (one table), $OUT/cases/ (each
# case's result and status) and $OUT/logs/ (each case's output).
# Settings (environment): CTXLAB_CP_TIME_LIMIT (seconds for the whole script, default 420),
# CTXLAB_CP_MIN_CASE_S (don't start a case with less time left, default 60), CTXLAB_CP_WARMUP
# (untimed steps, default 0: the timed step then includes one-off costs such as Triton's autotuning,
# visible in the step times), CTXLAB_CP_STEPS (timed steps, default 1), CTXLAB_CP_BASELINE (a
# one-GPU result JSON of ctxlab.bench.finetune for the scaling column when this call ran no
# one-GPU case), CTXLAB_CP_FREE_WAIT_S (before each case, processes still holding the GPUs, as
# a killed case's ranks may, are killed; seconds to wait for the GPUs to be free, default 90; a
# case is "not run" if they are not), CTXLAB_CP_SELECT_IMPL (the MS selection: torch, triton or shallow), CTXLAB_CP_STRATEGY (ddp,
# the default, or fsdp: the weights sharded over every rank beside the split), CTXLAB_CP_OVERRIDES (extra Hydra overrides for every case, e.g. model.mlp_chunk=16384).
set -uo pipefail
OUT=${1:?usage: cp_bench.sh OUT_DIR [VARIANT@LENGTHxGPUS ...]}
shift
CASES=${*:-ms@262144x4 dense@262144x4 s2@262144x4 ms@524288x4 ms@131072x1 s2@131072x1 dense@131072x1 s2@524288x4 dense@524288x4}
LIMIT=${CTXLAB_CP_TIME_LIMIT:-420}
MIN_CASE=${CTXLAB_CP_MIN_CASE_S:-60}
WARMUP=${CTXLAB_CP_WARMUP:-0}
STEPS=${CTXLAB_CP_STEPS:-1}
STRATEGY=${CTXLAB_CP_STRATEGY:-ddp}
case $STRATEGY in ddp|fsdp) ;; *) echo "cp_bench.sh: CTXLAB_CP_STRATEGY must be ddp or fsdp, got $STRATEGY" >&2; exit 2 ;; esac
read -r -a EXTRA <<< "${CTXLAB_CP_OVERRIDES:-}"
START=$(date +%s)
mkdir -p "$OUT/cases" "$OUT/logs"
NGPU=${CTXLAB_CP_NGPU:-$(python3 -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)}  # CTXLAB_CP_NGPU: CPU processes for a test
echo "cp_bench: $NGPU GPUs, limit ${LIMIT}s, cases: $CASES"

status() {  # tag variant length gpus order status note
  python3 - "$@" <<'PY'
import json, sys
from pathlib import Path
out, tag, variant, length, gpus, order, status, note = sys.argv[1:9]
Path(out, "cases", f"{tag}.status.json").write_text(json.dumps({
    "tag": tag, "variant": variant, "seq_len": int(length), "gpus": int(gpus), "order": int(order),
    "status": status, "note": note}))
PY
}

free_gpus() {  # kill what a killed case left running on the GPUs; wait (CTXLAB_CP_FREE_WAIT_S, 90) till free
  # (2026-11-27: a 512K case killed at the time limit left its ranks holding 92 GiB per GPU, and
  # the next call's two cases ran out of memory beside them.) Prints the holders if any remain.
  command -v nvidia-smi > /dev/null || return 0
  local pids=""
  for _ in $(seq "${CTXLAB_CP_FREE_WAIT_S:-90}"); do
    pids=$(nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null | tr -d ' ' | sort -u | xargs)
    [ -z "$pids" ] && return 0
    kill -9 $pids 2> /dev/null
    sleep 1
  done
  echo "$pids"
  return 1
}

order=0
for case in $CASES; do
  order=$((order + 1))
  variant=${case%@*}; rest=${case#*@}; length=${rest%x*}; gpus=${rest#*x}
  tag=$(printf '%02d_%s_%s_%sgpu' "$order" "$variant" "$length" "$gpus")
  left=$((LIMIT - ($(date +%s) - START)))
  if [ "$left" -lt "$MIN_CASE" ]; then
    echo "== $case: not run (${left}s left of ${LIMIT}s)"
    status "$OUT" "$tag" "$variant" "$length" "$gpus" "$order" "not run" "time limit (${left}s left)"
    continue
  fi
  if [ "$gpus" -gt "$NGPU" ]; then
    status "$OUT" "$tag" "$variant" "$length" "$gpus" "$order" "not run" "$NGPU GPUs here"
    continue
  fi
  if ! held=$(free_gpus); then
    echo "== $case: not run (the GPUs are still held by processes $held)"
    status "$OUT" "$tag" "$variant" "$length" "$gpus" "$order" "not run" "GPUs held by processes $held"
    continue
  fi
  args=(--out "$OUT/cases" --tag "$tag" --lengths "$length" --variants "$variant" ${CTXLAB_CP_SELECT_IMPL:+--select-impl "$CTXLAB_CP_SELECT_IMPL"}
        --warmup "$WARMUP" --steps "$STEPS" --long-steps "$STEPS")
  if [ "$gpus" -eq 1 ]; then
    cmd=(env CUDA_VISIBLE_DEVICES=0 python3 -m ctxlab.bench.finetune "${args[@]}")
  else
    cmd=(python3 -m torch.distributed.run --standalone --nproc_per_node "$gpus" -m ctxlab.bench.finetune
         "${args[@]}" --strategy "$STRATEGY" --context-parallel "$gpus")
  fi
  [ "${#EXTRA[@]}" -gt 0 ] && cmd+=(-- "${EXTRA[@]}")
  echo "== $case (${left}s left): ${cmd[*]}"
  t0=$(date +%s)
  timeout -k 20 "$left" "${cmd[@]}" > "$OUT/logs/$tag.log" 2>&1
  rc=$?
  took=$(($(date +%s) - t0))
  if [ $rc -eq 0 ] && [ -f "$OUT/cases/$tag.json" ]; then
    if grep -q '"status": "oom"' "$OUT/cases/$tag.json"; then
      status "$OUT" "$tag" "$variant" "$length" "$gpus" "$order" "oom" "${took}s"
    else
      status "$OUT" "$tag" "$variant" "$length" "$gpus" "$order" "ok" ""
    fi
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    status "$OUT" "$tag" "$variant" "$length" "$gpus" "$order" "timeout" "killed after ${took}s (time limit)"
  elif grep -qiE 'OutOfMemoryError|out of memory' "$OUT/logs/$tag.log"; then
    status "$OUT" "$tag" "$variant" "$length" "$gpus" "$order" "oom" "${took}s"
  else
    note=$(grep -E '[A-Za-z_.]*(Error|Exception): ' "$OUT/logs/$tag.log" | grep -v ChildFailedError |
           sed 's/^\[rank[0-9]*\]: //' | tail -1 | cut -c1-240)
    status "$OUT" "$tag" "$variant" "$length" "$gpus" "$order" "error" "rc=$rc: $note"
  fi
  echo "   rc=$rc after ${took}s"
  tail -3 "$OUT/logs/$tag.log"
done

baseline=()
[ -n "${CTXLAB_CP_BASELINE:-}" ] && baseline=(--baseline "$CTXLAB_CP_BASELINE")
python3 -m ctxlab.bench.context_parallel "$OUT" "${baseline[@]}"
