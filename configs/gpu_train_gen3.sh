#!/usr/bin/env bash
# The third-generation candidate of the embedded tiny NaViL (8-px patches: 16-px visual tokens, 4x as many),
# trained on a lent GPU machine (one H200, 16 CPU cores) in one call: encoder pretraining (stage 0, token heads
# only, glyph-dense scenes), then stages 1-7 (configs/tiny_gen3_stage*.json), each capped by wall time.
#   bash configs/gpu_train_gen3.sh              -> $OUT/{model.safetensors,config.json,logs.tar.gz}
#   SMOKE=1 DEVICE=cpu WORKERS=2 OUT=/tmp/x bash configs/gpu_train_gen3.sh   (a few steps per stage, on a CPU)
# It first runs benchmarks/data_feed.py (FEED_CHECK=0 skips it): the first run's loop reached ~140 images/s
# (data/gpu_runs/gen3_2026-12-04/README.md), and this says within a minute whether the fixes since hold.
# Main-process threads default to the cores the workers leave (navil_utils.tiny.train.main_process_threads).
# After each stage the latest weights are copied to $OUT, so a run stopped by the call's time limit still
# returns the last finished stage. On the device machine carry .whl/ with the transformers 5.24 wheel.
set -eu
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
WORKERS=${WORKERS:-14}
RUN=${RUN:-runs/navil-tiny-gen3}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$RUN" "$OUT"
smoke_encoder=() smoke=()
if [ -n "${SMOKE:-}" ]; then
  smoke_encoder=(--steps 3 --batch-size 4 --eval-every 3 --eval-images 8)
  smoke=(--set total_steps=3 --set batch_size=4 --set eval_every=3 --set log_every=1 --set checkpoint_every=2)
fi
# stage caps in minutes of training (the call's budget: ~9 minutes in all, start-up and exports included)
caps=(0 2.6 0.8 0.3 0.3 0.4 0.35 0.6)
ship() {  # the latest finished stage's weights and every log so far -> $OUT
  cp "$1/model.safetensors" "$1/config.json" "$OUT/"
  tar czf "$OUT/logs.tar.gz" --exclude='*.safetensors' --exclude=checkpoint --exclude='*.pt' "$RUN"
}
if [ -z "${SMOKE:-}" ] && [ "${FEED_CHECK:-1}" = 1 ]; then   # ~1 min: does the training loop now keep up?
  $PY benchmarks/data_feed.py --config configs/tiny_gen3_stage1.json --workers "$WORKERS" --batch-size 256 \
    --seconds 6 --device "$DEVICE" | tee "$OUT/data_feed.log"
fi
date +"%T stage 0"
test -f "$RUN/stage0/model.safetensors" || $PY -m navil_utils.tiny.encoder_capacity \
  --model '{"llm_intermediate": 384, "patch_size": 8}' --steps 1000 --batch-size 128 --eval-every 250 \
  --target-weights '{"kind": 1, "color": 0.1, "glyph": 0.5}' \
  --train-data '{"distractor_text_prob": 1.0, "max_distractor_texts": 3}' \
  --device "$DEVICE" --workers "$WORKERS" --time-limit 1.3 --save "$RUN/stage0" --out "$RUN/stage0.jsonl" "${smoke_encoder[@]}"
ship "$RUN/stage0"
for stage in 1 2 3 4 5 6 7; do
  date +"%T stage $stage"
  $PY -m navil_utils.train --out "$RUN/stage$stage" --config "configs/tiny_gen3_stage$stage.json" \
    --device "$DEVICE" --set num_workers="$WORKERS" --time-limit "${caps[$stage]}" --no-progress "${smoke[@]}"
  ship "$RUN/stage$stage/final"
done
date +"%T done"
