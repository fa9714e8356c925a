# Sourced by the lease plans (lease_x4*.sh) on the device machine, after `set -uo pipefail`, with
# the call's budget in seconds as its argument (always pass it: a `source` without arguments sees
# the caller's own $1): checks OUT, defines `here` (this folder) and `left` (seconds left of the
# budget; CTXLAB_CALL_SECONDS overrides it), sets up ctxlab's packages (device_env.sh), lists
# the GPUs and defines `card` (GPU 0's name, spaces as underscores: the result files' stems),
# `ncu_stage` (Nsight Compute of one profiled stage) and `sweep_cases` (a stage swept over launch
# variants), below.
: "${OUT:?OUT must be set (the output folder of the device call)}"
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
start=$(date +%s)
call_seconds=${CTXLAB_CALL_SECONDS:-${1:?lease_common.sh needs the budget of the call in seconds}}
left() { echo $(( call_seconds - ($(date +%s) - start) )); }
source "$here/device_env.sh" || exit 1
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
card=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")

# Nsight Compute of COUNT launches (after SKIP) of the kernels matching KERNEL_REGEX in one run of
# profile_stage.py (its arguments follow), within LIMIT seconds: DIR/NAME.log, the details page
# (DIR/NAME_details.csv) and the SASS source page (DIR/NAME_sass.csv.gz), which ncu_summary reads;
# the report itself is removed.
#   ncu_stage DIR NAME KERNEL_REGEX SKIP COUNT LIMIT --setting paper --length 64K --stage dkvdq
ncu_stage() {
  local dir=$1 name=$2 kernels=$3 skip=$4 count=$5 limit=$6
  shift 6
  timeout "$limit" ncu --clock-control none --kernel-name "regex:$kernels" --launch-skip "$skip" \
    --launch-count "$count" --set full -o "$dir/$name" \
    python3 "$here/profile_stage.py" "$@" > "$dir/$name.log" 2>&1
  ncu --import "$dir/$name.ncu-rep" --page details --csv > "$dir/${name}_details.csv" 2>/dev/null
  ncu --import "$dir/$name.ncu-rep" --page source --csv --print-source sass 2>/dev/null \
    | gzip > "$dir/${name}_sass.csv.gz"
  rm -f "$dir/$name.ncu-rep"
}

# One stage swept over launch variants for each case "SETTING KV_HEADS LENGTHS", each case within
# LIMIT seconds: R/STEM_SETTING_kvKV.{json,jsonl,md} and R/sweep_SETTING_kvKV.log.
#   sweep_cases R STAGE VARIANTS STEM LIMIT CASE...
sweep_cases() {
  local r=$1 stage=$2 variants=$3 stem=$4 limit=$5 c
  shift 5
  for c in "$@"; do
    set -- $c
    timeout "$limit" python3 -m ctxlab.kernels.bench.stage_sweep --setting "$1" --kv-heads "$2" \
      --lengths "$3" --stages "$stage" --variants "$variants" --out "$r" \
      --stem "${stem}_$1_kv$2" > "$r/sweep_$1_kv$2.log" 2>&1
  done
}
