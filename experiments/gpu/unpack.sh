#!/usr/bin/env bash
# Put what study.sh / study_shards.sh brought back into the committed study folder:
#   bash experiments/gpu/unpack.sh STUDY FILE.tar [FILE.tar ...]
# Each arm-<arm>.tgz of a finished arm (results/summary.json and results/grid.json in it) replaces
# experiments/results/STUDY/arms/<arm>/ (its results, small weights, configs and logs); an
# unfinished arm's goes to experiments/results/STUDY/partial/<arm>/ and leaves the committed arm
# as it was. Each study-<tag>.tgz goes to experiments/results/STUDY/logs/<tag>/ (study.log, the
# shard's compare/ tables). Bundles are applied in the order given (a later one wins).
set -euo pipefail
STUDY=${1:?usage: unpack.sh STUDY FILE.tar ...}
shift
DEST=experiments/results/$STUDY
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for bundle in "$@"; do
  tar -xf "$bundle" -C "$tmp"
done
for f in "$tmp"/arm-*.tgz; do
  [ -e "$f" ] || continue
  arm=$(basename "$f" .tgz); arm=${arm#arm-}
  where=arms
  tar -tzf "$f" > "$tmp/list"  # (not piped into grep -q: pipefail would count tar's SIGPIPE)
  if ! grep -qx './results/grid.json' "$tmp/list" || ! grep -qx './results/summary.json' "$tmp/list"; then
    where=partial
  fi
  rm -rf "${DEST:?}/$where/$arm" && mkdir -p "$DEST/$where/$arm"
  tar -xzf "$f" -C "$DEST/$where/$arm"
  [ "$where" = arms ] && rm -rf "${DEST:?}/partial/$arm"
  echo "$where/$arm <- $(basename "$f")"
done
for f in "$tmp"/study-*.tgz; do
  [ -e "$f" ] || continue
  tag=$(basename "$f" .tgz); tag=${tag#study-}
  mkdir -p "$DEST/logs/$tag" && tar -xzf "$f" -C "$DEST/logs/$tag"
  echo "logs $tag <- $(basename "$f")"
done
