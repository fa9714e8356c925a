#!/usr/bin/env bash
# A declared study on a lent GPU machine, resumable across calls and leases:
#   [CTXLAB_STUDY_TIMEOUT=seconds] [CTXLAB_STUDY_ROOT=dir] [CTXLAB_PACK_TAG=name] \
#     bash experiments/gpu/study.sh STUDY OUT [ctxlab overrides ...]
# Runs `ctxlab experiment=STUDY` in a run folder outside the working tree
# ($CTXLAB_STUDY_ROOT/STUDY, default /root/studies/STUDY), which survives between the calls of one
# held machine; on a fresh machine it is first seeded from the results committed in
# experiments/results/STUDY (finished arms are then skipped; arms whose weights came back are
# re-evaluated from them). CTXLAB_STUDY_TIMEOUT stops the study (SIGTERM) in time for packing.
# At the end, each arm changed since the last pack is packed (results, the small weights file,
# configs, metadata, CSV and W&B logs; never checkpoints nor the large weights) as arm-<arm>.tgz,
# the study's own files (compare/, study.log) as study-<tag>.tgz, and these are bundled into as
# few OUT/<tag>-<k>.tar files of at most 15 MiB as they fit (a device call brings back 8 files of
# 16 MiB). experiments/gpu/unpack.sh puts them back into experiments/results/STUDY.
# experiments/gpu/study_shards.sh runs several of these side by side, one GPU each.
set -uo pipefail
STUDY=${1:?usage: study.sh STUDY OUT [overrides ...]}
OUT=${2:?usage: study.sh STUDY OUT [overrides ...]}
shift 2
ROOT=${CTXLAB_STUDY_ROOT:-/root/studies}/$STUDY
TAG=${CTXLAB_PACK_TAG:-$STUDY}
COMMITTED=experiments/results/$STUDY
mkdir -p "$ROOT" "$OUT"
if [ -d "$COMMITTED/arms" ] && [ ! -e "$ROOT/.seeded" ]; then
  cp -rn "$COMMITTED/arms" "$ROOT/" && touch "$ROOT/.seeded"
  find "$ROOT/arms" -mindepth 1 -maxdepth 1 -type d -exec touch {}/.packed \;
fi
pack() {
  local staging=/root/pack/$TAG
  rm -rf "$staging" && mkdir -p "$staging"
  for arm in "$ROOT"/arms/*/; do
    [ -d "$arm" ] || continue
    name=$(basename "$arm")
    if [ -e "$arm/.packed" ] && [ -z "$(find "$arm" -type f -newer "$arm/.packed" -not -path '*/checkpoints/*' | head -1)" ]; then
      continue
    fi
    (cd "$arm" && find . -path ./checkpoints -prune -o -type f \( -path './results/*' -o -name 'config*.yaml' \
        -o -name 'meta*.json' -o \( -path './weights/trainable.safetensors' -size -8M \) -o -path './weights/meta.json' \
        -o -path './plots/*' -o -path './csv/*' -o -path './wandb/*' -o -name 'wandb_id.txt' \) -print0 |
       tar --null -czf "$staging/arm-$name.tgz" -T -) && touch "$arm/.packed"
  done
  (cd "$ROOT" && tar -czf "$staging/study-$TAG.tgz" --exclude=arms --exclude='*.ckpt' .)
  # Bundle into tars of at most 15 MiB (a single larger arm travels alone and says so).
  local k=0 size=0 limit=$((15 * 1024 * 1024)) f s
  for f in "$staging"/study-*.tgz "$staging"/arm-*.tgz; do
    [ -e "$f" ] || continue
    s=$(stat -c %s "$f")
    if [ "$size" -gt 0 ] && [ $((size + s)) -gt "$limit" ]; then k=$((k + 1)); size=0; fi
    [ "$s" -gt "$limit" ] && echo "study.sh: $(basename "$f") is $s bytes, over what a device call brings back" >&2
    tar -rf "$OUT/$TAG-$k.tar" -C "$staging" "$(basename "$f")"
    size=$((size + s))
  done
  ls -la "$OUT"
}
trap pack EXIT
limit=()
[ -n "${CTXLAB_STUDY_TIMEOUT:-}" ] && limit=(timeout --signal=TERM --kill-after=30 "$CTXLAB_STUDY_TIMEOUT")
"${limit[@]}" python3 -m ctxlab.cli experiment="$STUDY" hydra.run.dir="$ROOT" "$@" 2>&1 |
  tr '\r' '\n' | tee -a "$ROOT/study.log" | grep --line-buffered -a -E '^\[ctxlab\]|Error|error|Traceback|^  File'
