#!/usr/bin/env bash
# lm-eval on fine-tuned SmolLM2 arms of study_smollm2_16k, on a lent GPU machine (no registry):
#   here, before the device call:  make gpu-wheels gpu-wheels-extra gpu-wheels-lmeval
#   on the device (.whl carried):  bash experiments/gpu/lm_eval_smollm2.sh OUT ARM_DIR [ARM_DIR ...]
# Each ARM_DIR is a study arm's run folder with its whole weights/ (both files: the SmolLM2 arms
# train the embeddings, which lie in weights/trainable_large.safetensors), e.g.
# /root/studies/study_smollm2_16k/arms/ms_paper+crd on the machine that trained it. The model is
# built from the arm's config.yaml (SmolLM2 from the packaged GGUF, converted once), its trained
# weights loaded, evaluated with dense attention (the paper's inference) and, where the arm's
# grid searched one, its chosen inference scale. Runs ctxlab's NIAH tasks (RULER's single,
# multikey, multivalue with book text as haystack) through ctxlab-lm-eval and writes
# OUT/lm_eval/<arm>/ (lm-eval's results and samples JSON) and OUT/lm_eval/<arm>.log.
# CTXLAB_NIAH_LENGTHS (default [4096,8192,16384,32768,65536]) and CTXLAB_NIAH_TRIALS (default 10)
# size the grid.
set -uo pipefail
OUT=${1:?usage: lm_eval_smollm2.sh OUT ARM_DIR [ARM_DIR ...]}
shift
source experiments/gpu/device_env.sh
LENGTHS=${CTXLAB_NIAH_LENGTHS:-[4096,8192,16384,32768,65536]}
TRIALS=${CTXLAB_NIAH_TRIALS:-10}
mkdir -p "$OUT/lm_eval"
status=0
for arm in "$@"; do
  name=$(basename "$arm")
  scale=$(python3 -c 'import json,sys; s=json.load(open(sys.argv[1])); print(",eval_scale=auto" if s.get("scale_search") else "")' \
    "$arm/results/summary.json" 2>/dev/null)
  python3 -m ctxlab.lm_eval --model ctxlab --model_args "run=$arm,attention=dense,device=cuda$scale" \
    --tasks ctxlab_niah --metadata "{\"max_seq_lengths\": $LENGTHS, \"trials\": $TRIALS}" \
    --output_path "$OUT/lm_eval/$name" --log_samples 2>&1 | tr '\r' '\n' | tee "$OUT/lm_eval/$name.log" |
    grep --line-buffered -a -E '^\||Error|Traceback|ctxlab model'
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "lm_eval_smollm2.sh: $name failed (exit $rc)" >&2; status=1; }
done
exit $status
