# Sourced by the lease plans (lease_x4*.sh) on the device machine, after `set -uo pipefail`, with
# the call's budget in seconds as its argument (always pass it: a `source` without arguments sees
# the caller's own $1): checks OUT, defines `here` (this folder) and `left` (seconds left of the
# budget; CTXLAB_CALL_SECONDS overrides it), sets up ctxlab's packages (device_env.sh), lists
# the GPUs and defines `card` (GPU 0's name, spaces as underscores: the result files' stems).
: "${OUT:?OUT must be set (the output folder of the device call)}"
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
start=$(date +%s)
call_seconds=${CTXLAB_CALL_SECONDS:-${1:?lease_common.sh needs the budget of the call in seconds}}
left() { echo $(( call_seconds - ($(date +%s) - start) )); }
source "$here/device_env.sh" || exit 1
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
card=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
