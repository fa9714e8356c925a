# Source on a GPU machine with its own torch/Triton/CUDA and no package registry (the lent H100s):
#   source experiments/gpu/device_env.sh
# Installs, into an overlay folder, the versions of ctxlab's Python dependencies that the dev
# machine uses, from wheels carried in .whl/hf (fetch them with `make gpu-wheels`; W&B, gguf and
# their needs in .whl/extra with `make gpu-wheels-extra`), then makes ctxlab importable from this
# tree (kernels/ as ctxlab.kernels) without touching the image's torch. On a machine that is still
# held, a later call without .whl reuses the overlay installed by an earlier one.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
CTXLAB_OVERLAY=${CTXLAB_OVERLAY:-/tmp/ctxlab-overlay}
if [ -d .whl/hf ]; then
  python3 -m pip install --quiet --no-deps --no-index --find-links .whl/hf --target "$CTXLAB_OVERLAY" \
    transformers peft huggingface_hub httpx2 httpcore2 truststore tokenizers safetensors hf-xet regex \
    accelerate lightning lightning-utilities hydra-core omegaconf antlr4-python3-runtime \
    datasets torchdata dill multiprocess fsspec
  if [ -d .whl/extra ]; then
    python3 -m pip install --quiet --no-deps --no-index --target "$CTXLAB_OVERLAY" --upgrade .whl/extra/*.whl
  fi
  touch "$CTXLAB_OVERLAY/.installed"
elif [ ! -f "$CTXLAB_OVERLAY/.installed" ]; then
  echo "device_env.sh: no .whl/hf here and no overlay installed earlier in $CTXLAB_OVERLAY" >&2
  return 1 2>/dev/null || exit 1
fi
rm -rf "$CTXLAB_OVERLAY/ctxlab" "$CTXLAB_OVERLAY/hydra_plugins"
cp -r src/ctxlab "$CTXLAB_OVERLAY/ctxlab"
cp -r src/hydra_plugins "$CTXLAB_OVERLAY/hydra_plugins"  # the ctxlab CLI registers its Hydra plugins
ln -sfn "$PWD/kernels" "$CTXLAB_OVERLAY/ctxlab/kernels"
export PYTHONPATH="$CTXLAB_OVERLAY" CTXLAB_CFG="$PWD/cfg"
python3 -c "import torch, triton, transformers, lightning, peft, hydra, ctxlab.kernels, ctxlab.data.datamodule; print('device env:', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'lightning', lightning.__version__, 'peft', peft.__version__, 'gpus', torch.cuda.device_count())"
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}  # less fragmentation at 128K
