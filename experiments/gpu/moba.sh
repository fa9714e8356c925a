#!/usr/bin/env bash
# MoBA on a GPU machine, beside dense, S2 and MS:
#   source experiments/gpu/device_env.sh   # only where the image lacks ctxlab's packages
#   bash experiments/gpu/moba.sh OUT_DIR [stage ...]
# Stages: test (the gpu-marked MoBA and conformance tests), kernels (the kernel benchmark's h100
# preset at 8K-128K, 8 kv heads: dense, gather, triton, moba), finetune (the 7B fine-tuning
# benchmark at 16K and 32K on one GPU: dense, s2, ms, moba). Default: all three.
# Each stage writes into OUT_DIR (test.log, kernels/, finetune.json and .md).
set -uo pipefail
OUT=${1:?usage: moba.sh OUT_DIR [stage ...]}
shift
STAGES=${*:-test kernels finetune}
mkdir -p "$OUT"
for stage in $STAGES; do
  echo "== stage $stage"
  case $stage in
    test) python3 -m pytest -q -m gpu tests/test_moba.py 2>&1 | tee "$OUT/test.log" ;;
    kernels) python3 -m ctxlab.kernels.bench.run --preset h100 --cases kv8 --ops gather,dense,triton,moba \
               --out "$OUT/kernels" --stem moba_h100 --time-limit-s 420 ;;
    finetune) CUDA_VISIBLE_DEVICES=0 python3 -m ctxlab.bench.finetune --out "$OUT" --tag finetune \
                --lengths 16384,32768 --variants dense,s2,ms,moba --steps 2 --long-from 32768 --long-steps 1 ;;
    *) echo "unknown stage $stage (test, kernels, finetune)" >&2; exit 2 ;;
  esac
done
