#!/usr/bin/env bash
# Why do high learning rates stall the tiny NaViL? Runs of the first generation's stage 1 (random initialisation,
# 32 images per step, one thread each, two side by side) that differ only in lr / connector_init_scale / length
# (configs/lr_stall/*.json); then the visual tokens' geometry (probes --geometry, 200 images of seed 11) of every
# run at its initialisation (step0) and at its end (final). data/lr_stall/README.md has the results.
#   bash configs/lr_stall/run.sh     (about 1.5 h on the 2-core box; finished runs and measurements are skipped)
set -eu
PY=${PY:-.venv/bin/python}
OUT=runs/lr_stall
mkdir -p $OUT
train() { test -f $OUT/$1/final/model.safetensors || \
  $PY -m navil_utils.train --out $OUT/$1 --config configs/lr_stall/$1.json --no-progress > $OUT/$1.out 2>&1; }
train lr4e-4 & train lr2e-3 & wait
train lr2e-3_connector0.125 & train long_lr2e-3 & wait
train long_lr4e-4
for arm in lr4e-4 lr2e-3 lr2e-3_connector0.125 long_lr4e-4 long_lr2e-3; do
  test -f $OUT/$arm/step0/model.safetensors || \
    $PY -m navil_utils.train --config configs/lr_stall/$arm.json --out $OUT/$arm --export-init $OUT/$arm/step0
  for at in step0 final; do
    grep -q "\"$OUT/$arm/$at\"" $OUT/geometry.jsonl 2>/dev/null || \
      $PY -m navil_utils.tiny.probes --model $OUT/$arm/$at --geometry --images 200 --out $OUT/geometry.jsonl
  done
done
