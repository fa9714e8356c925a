#!/usr/bin/env bash
# The next 4-GPU lease's plan (after lease_x4.sh's of 2026-11-27), in three consecutive calls:
# issue 18's context-parallel 7B step, the SmolLM2 study's unfinished cells, and issue 16's
# lm-eval run on fine-tuned SmolLM2 arms. Same rules as lease_x4.sh (experiments/results moved
# aside during the lease; the calls follow each other at once):
#   call 1  carry [.whl/core, .stage/p1]     bash experiments/gpu/lease_x4_next.sh 1
#           overlay; GGUF part 1 kept; experiments/gpu/cp_bench.sh on the 4 GPUs (the 7B shape
#           needs only the image's transformers and peft) -> OUT/cp_bench.tgz
#   call 2  carry [.whl/hfcore2, .stage/p2]  bash experiments/gpu/lease_x4_next.sh 2
#           the GGUF joined; the study's unfinished arms, one shard per GPU
#   call 3  carry [.whl/lmeval]              bash experiments/gpu/lease_x4_next.sh 3
#           the shards resumed, then lm-eval's NIAH tasks on the arms trained in this lease (their
#           whole weights/ is on this machine only) -> OUT/lm_eval.tgz
# .whl/lmeval: `make gpu-wheels-lmeval`. Then, here: experiments/gpu/unpack.sh study_smollm2_16k
# OUT/*.tar, and ctxlab-report.
set -uo pipefail
CALL=${1:?usage: lease_x4_next.sh 1|2|3}
: "${OUT:?OUT must be set (the output folder of the device call)}"
here=$(cd "$(dirname "$0")" && pwd)
start=$(date +%s)
left() { echo $(( ${CTXLAB_CALL_SECONDS:-560} - ($(date +%s) - start) )); }
source "$here/device_env.sh" || exit 1
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
# Unfinished in lease 3 (2026-11-27): dense + PI and the no-offset ablation beyond 64K, the
# no-growth ablation's 256K passkeys, the causal-MS evaluations' passkeys (both MS arms).
SHARDS=("0:ms_paper+crd" "1:ms_causal+crd" "2:dense+pi,crd_no_offset" "3:crd_no_growth")
case $CALL in
  1)
    bash "$here/stage_smollm2.sh" keep
    CTXLAB_CP_TIME_LIMIT=$(( $(left) - 30 )) bash "$here/cp_bench.sh" /root/cp
    tar -czf "$OUT/cp_bench.tgz" -C /root/cp . ;;
  2)
    bash "$here/stage_smollm2.sh" join || exit 1
    CTXLAB_STUDY_TIMEOUT=$(( $(left) - 40 )) bash "$here/study_shards.sh" study_smollm2_16k "$OUT" \
      "${SHARDS[@]}" -- logger=csv ;;
  3)
    CTXLAB_STUDY_TIMEOUT=$(( $(left) - 200 )) bash "$here/study_shards.sh" study_smollm2_16k "$OUT" \
      "${SHARDS[@]}" -- logger=csv
    arms=$(ls -d /root/studies/shard*/study_smollm2_16k/arms/*/ 2>/dev/null | while read -r a; do
             [ -f "$a/weights/trainable_large.safetensors" ] && [ -f "$a/results/summary.json" ] && echo "$a"; done | head -2)
    # shellcheck disable=SC2086
    [ -n "$arms" ] && CTXLAB_NIAH_LENGTHS="[4096,16384,65536]" CTXLAB_NIAH_TRIALS=5 \
      timeout 150 bash "$here/lm_eval_smollm2.sh" /root/lme $arms
    tar -czf "$OUT/lm_eval.tgz" -C /root/lme . 2>/dev/null ;;
  *) echo "lease_x4_next.sh: call must be 1, 2 or 3" >&2; exit 2 ;;
esac
ls -la "$OUT"
