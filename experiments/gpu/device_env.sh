# Source on a GPU machine with its own torch/Triton/CUDA and no package registry (the lent H100s):
#   source experiments/gpu/device_env.sh
# Installs, into an overlay folder, the Python packages ctxlab needs that the image lacks, from
# every wheel carried under .whl/ (`make gpu-wheels` fetches them into .whl/hf and .whl/extra),
# then makes ctxlab importable from this tree (kernels/ as ctxlab.kernels) without touching the
# image's torch. Wheels may come over several calls of one held machine (each call adds its set;
# a call without .whl reuses the overlay): experiments/gpu/LEASE.md gives a lease's plan that
# carries the SmolLM2 GGUF beside them in two calls.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
CTXLAB_OVERLAY=${CTXLAB_OVERLAY:-/tmp/ctxlab-overlay}
wheels=$(find .whl -type f -name '*.whl' 2>/dev/null | sort)
if [ -n "$wheels" ]; then
  # Every carried wheel, whatever its folder: a lease may bring them over several calls (each
  # call's set is added to the overlay; packages the image already has at a suitable version,
  # e.g. tokenizers or huggingface_hub, need not travel).
  python3 -m pip install --quiet --no-deps --no-index --no-compile --target "$CTXLAB_OVERLAY" --upgrade $wheels
  touch "$CTXLAB_OVERLAY/.installed"
elif [ ! -f "$CTXLAB_OVERLAY/.installed" ]; then
  echo "device_env.sh: no .whl here and no overlay installed earlier in $CTXLAB_OVERLAY" >&2
  return 1 2>/dev/null || exit 1
fi
rm -rf "$CTXLAB_OVERLAY/ctxlab" "$CTXLAB_OVERLAY/hydra_plugins"
cp -r src/ctxlab "$CTXLAB_OVERLAY/ctxlab"
cp -r src/hydra_plugins "$CTXLAB_OVERLAY/hydra_plugins"  # the ctxlab CLI registers its Hydra plugins
ln -sfn "$PWD/kernels" "$CTXLAB_OVERLAY/ctxlab/kernels"
export PYTHONPATH="$CTXLAB_OVERLAY" CTXLAB_CFG="$PWD/cfg"
python3 - <<'PY'
import importlib
import torch, triton, lightning, hydra, ctxlab.kernels, ctxlab.data.datamodule  # noqa: F401  (what every run needs)
def version(name):
    try:
        return importlib.import_module(name).__version__
    except Exception as e:  # an optional part (model=hf needs transformers, peft, gguf)
        return f"missing ({type(e).__name__})"
print("device env: torch", torch.__version__, "triton", triton.__version__, "lightning", lightning.__version__,
      "transformers", version("transformers"), "peft", version("peft"), "gguf", version("gguf"),
      "gpus", torch.cuda.device_count(), flush=True)
PY
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}  # less fragmentation at 128K
