#!/usr/bin/env bash
# Why do high learning rates stall the tiny NaViL? Four 400-step runs of the first generation's stage 1 (random
# initialisation, 32 images per step) that differ only in lr / connector_init_scale (configs/lr_stall/*.json),
# two at a time on one thread each; then the visual tokens' geometry (probes --geometry) of every run at step 0
# (its initialisation) and at the end. Results: runs/lr_stall/<arm>/log.jsonl, runs/lr_stall/geometry.jsonl.
#   bash configs/lr_stall/run.sh            (about 30 min on the 2-core box; resumable: re-run to continue)
set -eu
PY=${PY:-.venv/bin/python}
OUT=runs/lr_stall
mkdir -p $OUT
pair() {
  for arm in "$@"; do
    $PY -m navil_utils.train --out $OUT/$arm --config configs/lr_stall/$arm.json --no-progress > $OUT/$arm.out 2>&1 &
  done
  wait
}
pair lr4e-4 lr2e-3
pair lr2e-3_connector0.125 lr1e-3
for arm in lr4e-4 lr2e-3 lr2e-3_connector0.125 lr1e-3; do
  if ! grep -q "\"$OUT/$arm/step0\"" $OUT/geometry.jsonl 2>/dev/null; then
    $PY - "$arm" <<'PYEOF'
import json, sys
from navil_utils.tiny.train import TrainConfig, _tokenizer_for, build_model, export_model
arm = sys.argv[1]
config = TrainConfig.from_dict({**json.load(open(f"configs/lr_stall/{arm}.json")), "out": f"runs/lr_stall/{arm}"})
tokenizer, tokenizer_dir = _tokenizer_for(config)
export_model(build_model(config, tokenizer).eval(), tokenizer_dir, f"runs/lr_stall/{arm}/step0")
PYEOF
    $PY -m navil_utils.tiny.probes --model $OUT/$arm/step0 --geometry --images 200 --out $OUT/geometry.jsonl
  fi
  grep -q "\"$OUT/$arm/final\"" $OUT/geometry.jsonl || \
    $PY -m navil_utils.tiny.probes --model $OUT/$arm/final --geometry --images 200 --out $OUT/geometry.jsonl
done
