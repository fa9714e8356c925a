#!/usr/bin/env bash
# One lease of a 4-GPU machine for the studies and issue 14's kernels, in three consecutive
# calls (the machine keeps /root and /tmp between the calls of one lease; the calls must follow
# each other at once). Each call carries at most 64 MiB, the working tree included, so the
# committed results (experiments/results, 41 MB) stay here during the lease and the SmolLM2
# GGUF (98 MB) comes in two parts beside the wheels the image lacks:
#   call 1  carry [.whl/core, .stage/p1]     bash experiments/gpu/lease_x4.sh 1
#           overlay (hydra, lightning, datasets, ...), GGUF part 1 kept; the pre-training study's
#           six arms on GPUs 0-2 (two per GPU) and the kernel tests + benchmark on GPU 3
#   call 2  carry [.whl/hfcore2, .stage/p2]  bash experiments/gpu/lease_x4.sh 2
#           transformers, peft, gguf; the GGUF joined; the SmolLM2 study's arms on GPUs 0-2 and
#           the 7B LoRA+ step (MS vs S2, 64K and 128K) then two more arms on GPU 3
#   call 3  no carry                          bash experiments/gpu/lease_x4.sh 3
#           the SmolLM2 shards resumed (finished arms skipped, evaluations resumed from cells)
# Make the carried folders here with:
#   bash experiments/gpu/stage_smollm2.sh split 55600000 (then .stage/aa -> .stage/p1, ab -> p2)
#   .whl/core: hydra_core omegaconf antlr4 lightning lightning_utilities datasets dill multiprocess
#              fsspec torchdata pytest pluggy iniconfig; .whl/hfcore2: transformers peft regex gguf
#   (from `make gpu-wheels gpu-wheels-extra`; the image has tokenizers, safetensors, accelerate and
#   huggingface_hub at versions transformers accepts).
# Results come back as OUT/<study>-s<i>-<k>.tar (experiments/gpu/unpack.sh), OUT/kernels.tgz and
# OUT/finetune_7b.tgz.
set -uo pipefail
CALL=${1:?usage: lease_x4.sh 1|2|3}
source "$(dirname "$0")/lease_common.sh" 570
SHARDS=("0:ms_paper+crd,base+rope,crd_no_offset" "1:ms_causal+crd,dense+pi,base+ntk"
        "2:dense+crd,dense+yarn,s2+pi" "3:crd_no_cyclic,crd_no_growth")
case $CALL in
  1)
    bash "$here/stage_smollm2.sh" keep
    CUDA_VISIBLE_DEVICES=3 bash "$here/kernels_issue14.sh" "$OUT" $(( $(left) - 40 )) > /root/kernels.log 2>&1 &
    kpid=$!
    CTXLAB_STUDY_TIMEOUT=$(( $(left) - 45 )) bash "$here/study_shards.sh" study_pretrain_books_2k "$OUT" \
      "0:dense+rope/s1" "0:dense+rope/s2" "1:ms_causal+rope/s1" "1:ms_causal+rope/s2" \
      "2:ms_causal+selected/s1" "2:ms_causal+selected/s2" -- logger=csv
    wait $kpid
    cat /root/kernels.log ;;
  2)
    bash "$here/stage_smollm2.sh" join || exit 1
    CTXLAB_STUDY_TIMEOUT=$(( $(left) - 40 )) bash "$here/study_shards.sh" study_smollm2_16k "$OUT" \
      "${SHARDS[@]:0:3}" -- logger=csv > /root/smol012.log 2>&1 &
    spid=$!
    # GPU 3: the 7B step first (alone on its GPU: 128K takes nearly all of an H100), then shard 3.
    mkdir -p /root/ft
    CUDA_VISIBLE_DEVICES=3 timeout 330 python3 -m ctxlab.bench.finetune --out /root/ft --tag finetune_7b_ms_vs_s2 \
      --lengths 65536,131072 --variants s2,ms --warmup 1 --steps 1 --long-steps 1 > /root/ft/log.txt 2>&1
    tar -czf "$OUT/finetune_7b.tgz" -C /root/ft .
    tail -25 /root/ft/log.txt
    CTXLAB_SHARD_BASE=3 CTXLAB_STUDY_TIMEOUT=$(( $(left) - 40 )) bash "$here/study_shards.sh" study_smollm2_16k "$OUT" \
      "${SHARDS[3]}" -- logger=csv
    wait $spid
    cat /root/smol012.log ;;
  3)
    CTXLAB_STUDY_TIMEOUT=$(( $(left) - 40 )) bash "$here/study_shards.sh" study_smollm2_16k "$OUT" \
      "${SHARDS[@]}" -- logger=csv ;;
  *) echo "lease_x4.sh: call must be 1, 2 or 3" >&2; exit 2 ;;
esac
ls -la "$OUT"
