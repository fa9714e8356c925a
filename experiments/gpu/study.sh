#!/usr/bin/env bash
# A declared study on a lent GPU machine, resumable across calls and leases:
#   bash experiments/gpu/study.sh STUDY OUT [ctxlab overrides ...]
# Runs `ctxlab experiment=STUDY` in a run folder outside the working tree
# ($CTXLAB_STUDY_ROOT/STUDY, default /root/studies/STUDY), which survives between the calls of one
# held machine; on a fresh machine it is first seeded from the results committed in
# experiments/results/STUDY (finished arms are then skipped, trained arms whose weights came back
# are re-evaluated). Packs what should come back (results, weights' small files, configs,
# metadata, logs; never checkpoints) into OUT/STUDY-results.tgz, after every arm and at the end.
# SmolLM2 needs its GGUF: stage_smollm2 joins parts that earlier calls copied to $CTXLAB_STAGE.
set -uo pipefail
STUDY=${1:?usage: study.sh STUDY OUT [overrides ...]}
OUT=${2:?usage: study.sh STUDY OUT [overrides ...]}
shift 2
ROOT=${CTXLAB_STUDY_ROOT:-/root/studies}/$STUDY
COMMITTED=experiments/results/$STUDY
mkdir -p "$ROOT" "$OUT"
if [ -d "$COMMITTED/arms" ] && [ ! -e "$ROOT/.seeded" ]; then
  cp -rn "$COMMITTED/arms" "$ROOT/" && touch "$ROOT/.seeded"
fi
pack() {
  (cd "$ROOT" && find . -path ./wandb -prune -o -type f \
      \( -path '*/results/*' -o -name 'config*.yaml' -o -name 'meta*.json' -o -name '*.log' \
         -o -path '*/weights/trainable.safetensors' -o -path '*/weights/meta.json' -o -path '*/csv/*' \
         -o -path '*/compare/*' -o -path '*/wandb/*' \) -print0 |
     tar --null -czf "$OUT/$STUDY-results.tgz.tmp" -T - ) && mv "$OUT/$STUDY-results.tgz.tmp" "$OUT/$STUDY-results.tgz"
  ls -la "$OUT/$STUDY-results.tgz"
}
trap pack EXIT
python3 -m ctxlab.cli experiment="$STUDY" hydra.run.dir="$ROOT" "$@" 2>&1 | tee -a "$ROOT/study.log" |
  grep --line-buffered -v -E '^\s*$|it/s\]|s/it\]|Warning|warn\(' 
