#!/usr/bin/env bash
# Pre-train the small model on the shipped books on every visible GPU (DDP via torchrun) at 2K
# tokens, then evaluate perplexity and passkey retrieval up to 64K (32x) with the grid dealt over
# the ranks; dense+RoPE against causal MS with positions on the selected tokens only.
#   source experiments/gpu/device_env.sh   # where the image lacks ctxlab's packages
#   bash experiments/gpu/extrapolate_ddp.sh OUT_DIR [arm ...]      # arms: dense_rope ms_selected
set -uo pipefail
OUT=${1:?usage: extrapolate_ddp.sh OUT_DIR [arm ...]}
shift
ARMS=${*:-dense_rope ms_selected}
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")
COMMON=(trainer=ddp "trainer.devices=$NGPU" model=small data=books data.seq_len=2048 data.batch_size=8
        trainer.max_steps=400 trainer.val_check_interval=200 trainer.limit_val_batches=4 logger=csv
        eval=long "eval.perplexity.lengths=[2048,4096,8192,16384,32768,65536]" eval.perplexity.max_tokens=65536
        "eval.passkey.lengths=[2048,8192,32768,65536]" "eval.passkey.depths=[0.0,0.25,0.5,0.75,1.0]"
        eval.passkey.trials=4 eval.causality.n_cuts=1)
for arm in $ARMS; do
  case $arm in
    dense_rope)  A=(attention=dense position=rope) ;;
    ms_selected) A=(attention=ms_causal position=selected attention.region=16 attention.budget=32 attention.merge=4) ;;
    *) echo "unknown arm $arm (dense_rope, ms_selected)" >&2; exit 2 ;;
  esac
  echo "== $arm"
  python3 -m torch.distributed.run --standalone --nproc_per_node "$NGPU" -m ctxlab "${COMMON[@]}" "${A[@]}" \
    "name=$arm" "hydra.run.dir=$OUT/$arm"
  # the tables and plots next to the run's config as well (a copy-back that skips nested folders)
  cp "$OUT/$arm"/results/* "$OUT/$arm"/plots/* "$OUT/$arm"/ 2>/dev/null || true
done
