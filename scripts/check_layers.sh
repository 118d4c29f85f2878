#!/usr/bin/env bash
# The layers of src/ only include downwards: core <- ops <- kv <- model <- {train, eval} <- serve <- tools.
# Prints every include that runs up (or sideways between train and eval) and fails if there is one.
set -euo pipefail
cd "$(dirname "$0")/../src"
declare -A allowed=(
  [core]="core"
  [ops]="core ops"
  [kv]="core ops kv"
  [model]="core ops kv model"
  [train]="core ops kv model train"
  [eval]="core ops kv model eval"
  [serve]="core ops kv model eval serve"
  [tools]="core ops kv model train eval serve tools"
)
bad=0
for layer in "${!allowed[@]}"; do
  for file in "$layer"/*; do
    while IFS= read -r inc; do
      dep=${inc%%/*}
      if [[ " ${allowed[$layer]} " != *" $dep "* ]]; then
        echo "$file includes \"$inc\": $layer may include only ${allowed[$layer]}"
        bad=1
      fi
    done < <(sed -n 's/^#include "\([a-z]*\/[^"]*\)".*/\1/p' "$file")
  done
done
for dir in */; do
  [[ -n "${allowed[${dir%/}]+x}" ]] || { echo "src/$dir is not a known layer"; bad=1; }
done
exit $bad
