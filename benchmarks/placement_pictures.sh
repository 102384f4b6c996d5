#!/usr/bin/env bash
# The README's placement pictures (docs/images/placement-*.png): 4 steps of the demo experiment with a KL term
# (algorithm.kl_coef=0.001, so the reference group runs) on this machine split into 2 devices, once per
# placement, with context switching on (CPU devices leave it off by default); `m2flow report` draws step 3 of each and prints its iteration window and bubble fraction.
#   bash benchmarks/placement_pictures.sh        # about 3-4 minutes on 2 cores (the base model cached)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/m2flow-placement-pictures}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
for placement in collocated disaggregated hybrid; do
  spec=$placement
  [ "$placement" = hybrid ] && spec='{"rollout,inference": "0", actor: "1"}'
  .venv/bin/m2flow train train.steps=4 eval.num_problems=50 cluster.devices=2 algorithm.kl_coef=0.001 \
    cluster.context_switch=true \
    "cluster.placement=$spec" "name=pictures-$placement" "output_dir=$OUT" > "$OUT-$placement.log" 2>&1 \
    || { tail -20 "$OUT-$placement.log"; exit 1; }
  run=$(ls -td "$OUT"/pictures-"$placement"-* | head -1)
  echo "== $placement ($run)"
  .venv/bin/m2flow report "$run" --step 3
  cp "$run/timeline.png" "docs/images/placement-$placement.png"
done
