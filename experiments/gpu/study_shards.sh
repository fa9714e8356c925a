#!/usr/bin/env bash
# A declared study's arms side by side on the GPUs of one machine, each shard a study.sh run
# (its own run folder /root/studies/shard<i>, its own GPU, its own bundles OUT/<study>-s<i>-<k>.tar):
#   [CTXLAB_STUDY_TIMEOUT=seconds] bash experiments/gpu/study_shards.sh STUDY OUT \
#       GPU:arm[,arm...] [GPU:arm[,arm...] ...] [-- ctxlab overrides for every arm]
# A shard runs its arms in the order given; several shards may share a GPU (small models). The
# shard folders survive between the calls of one held machine, so the same command in the next
# call resumes every shard (finished arms skipped, evaluations resumed from their finished cells).
# Each shard's full log is in its bundle (study-<tag>.tgz: study.log); its progress lines are
# printed here at the end. CTXLAB_SHARD_BASE numbers this command's shards from that index on
# (default 0), so two commands of one call can run disjoint shards that a later call resumes as one.
set -uo pipefail
STUDY=${1:?usage: study_shards.sh STUDY OUT GPU:arm[,arm...] ... [-- overrides]}
OUT=${2:?usage: study_shards.sh STUDY OUT GPU:arm[,arm...] ... [-- overrides]}
shift 2
shards=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do shards+=("$1"); shift; done
[ $# -gt 0 ] && shift
here=$(cd "$(dirname "$0")" && pwd)
# Once, before the shards: what every arm shares and would otherwise build at the same moment in
# several processes into one cache folder (a model converted to a checkpoint folder, the
# tokenized splits).
python3 - "experiment=$STUDY" "$@" <<'PY' || { echo "study_shards.sh: preparing the data failed" >&2; exit 1; }
import sys

from hydra import initialize_config_dir
from hydra.utils import instantiate

from ctxlab.cli import config_dir
from ctxlab.config import compose_job

with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
    cfg = compose_job([a for a in sys.argv[1:] if not a.startswith(("study", "hydra"))])
instantiate(cfg.data).prepare_data()
print("study_shards.sh: data prepared", flush=True)
PY
pids=()
base=${CTXLAB_SHARD_BASE:-0}
for j in "${!shards[@]}"; do
  i=$((base + j))
  spec=${shards[$j]}
  gpu=${spec%%:*}
  only=$(python3 -c 'import json, sys; print("study.only=" + json.dumps(sys.argv[1].split(",")))' "${spec#*:}")
  mkdir -p /root/studies
  CUDA_VISIBLE_DEVICES=$gpu CTXLAB_STUDY_ROOT=/root/studies/shard$i CTXLAB_PACK_TAG="$STUDY-s$i" \
    bash "$here/study.sh" "$STUDY" "$OUT" "$only" "$@" > "/root/studies/shard$i.out" 2>&1 &
  pids+=($!)
  echo "shard $i on GPU $gpu: ${spec#*:} (pid ${pids[-1]})"
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
for j in "${!shards[@]}"; do
  i=$((base + j))
  echo "=== shard $i (${shards[$j]}) ==="
  grep -a -E '^\[ctxlab\] (\[|ppl|passkey|scale search: chose|study finished|evaluation)|Error|Traceback' "/root/studies/shard$i.out" | tail -40
done
exit $rc
