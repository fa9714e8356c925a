#!/usr/bin/env bash
# A declared study on a lent GPU machine, resumable across calls and leases:
#   [CTXLAB_STUDY_TIMEOUT=seconds] bash experiments/gpu/study.sh STUDY OUT [ctxlab overrides ...]
# Runs `ctxlab experiment=STUDY` in a run folder outside the working tree
# ($CTXLAB_STUDY_ROOT/STUDY, default /root/studies/STUDY), which survives between the calls of one
# held machine; on a fresh machine it is first seeded from the results committed in
# experiments/results/STUDY (finished arms are then skipped; arms whose weights came back are
# re-evaluated from them). CTXLAB_STUDY_TIMEOUT stops the study (SIGTERM) in time for packing.
# At the end, each arm changed since the last pack goes into OUT/arm-<arm>.tgz (results, the small
# weights file, configs, metadata, CSV and W&B logs; never checkpoints nor the large weights), and
# the study's own files (compare/, study.log) into OUT/study.tgz: files of at most a few MB each,
# within what a device call brings back.
set -uo pipefail
STUDY=${1:?usage: study.sh STUDY OUT [overrides ...]}
OUT=${2:?usage: study.sh STUDY OUT [overrides ...]}
shift 2
ROOT=${CTXLAB_STUDY_ROOT:-/root/studies}/$STUDY
COMMITTED=experiments/results/$STUDY
mkdir -p "$ROOT" "$OUT"
if [ -d "$COMMITTED/arms" ] && [ ! -e "$ROOT/.seeded" ]; then
  cp -rn "$COMMITTED/arms" "$ROOT/" && touch "$ROOT/.seeded"
  find "$ROOT/arms" -mindepth 1 -maxdepth 1 -type d -exec touch {}/.packed \;
fi
pack() {
  for arm in "$ROOT"/arms/*/; do
    [ -d "$arm" ] || continue
    name=$(basename "$arm")
    if [ -e "$arm/.packed" ] && [ -z "$(find "$arm" -type f -newer "$arm/.packed" -not -path '*/checkpoints/*' | head -1)" ]; then
      continue
    fi
    (cd "$arm" && find . -path ./checkpoints -prune -o -type f \( -path './results/*' -o -name 'config*.yaml' \
        -o -name 'meta*.json' -o -path './weights/trainable.safetensors' -o -path './weights/meta.json' \
        -o -path './csv/*' -o -path './wandb/*' -o -name 'wandb_id.txt' \) -print0 |
       tar --null -czf "$OUT/arm-$name.tgz" -T -) && touch "$arm/.packed"
  done
  (cd "$ROOT" && tar -czf "$OUT/study.tgz" --exclude=arms --exclude='*.ckpt' .)
  ls -la "$OUT"
}
trap pack EXIT
limit=()
[ -n "${CTXLAB_STUDY_TIMEOUT:-}" ] && limit=(timeout --signal=TERM --kill-after=30 "$CTXLAB_STUDY_TIMEOUT")
"${limit[@]}" python3 -m ctxlab.cli experiment="$STUDY" hydra.run.dir="$ROOT" "$@" 2>&1 |
  tr '\r' '\n' | tee -a "$ROOT/study.log" | grep --line-buffered -a -E '^\[ctxlab\]|Error|error|Traceback|^  File'
