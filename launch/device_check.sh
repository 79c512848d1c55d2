#!/usr/bin/env bash
# The accelerator check of launch/bench.py, in one script (under 8 minutes on
# one GPU): the DDPM CIFAR-10 UNet (35.7M parameters) on random uint8 data,
# 8 clients × 5 local steps of batch 32, every execution mode in float32 and
# bfloat16, the centralized limit (one model on batches of 8 × 32 = 256),
# achieved TFLOP/s and MFU against the datasheet peak, then the memory one
# more client costs under vmap and how many clients would fit.
#
#   bash launch/device_check.sh            # results in $OUT (default /tmp/device_check)
#
# Needs jax, flax and optax (preinstalled on the project's GPU machines) and
# ml_collections with absl-py and PyYAML: if they do not import, wheels in
# .whl/ are installed to /tmp/site (README, "Benchmarks", says how to fetch
# them). No dataset, TensorFlow, clu or torch is needed.
#
# Every size can be overridden, e.g. for a CPU smoke test:
#   CONFIG=configs/test.py IMAGE_SHAPE=8,8,1 CLIENTS=2 STEPS=1 BATCH=2 \
#     EXTRA='--config.model.ch_mult=(1,)' bash launch/device_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/device_check}
CONFIG=${CONFIG:-configs/cifar10_fedavg.py}
IMAGE_SHAPE=${IMAGE_SHAPE:-32,32,3}
CLIENTS=${CLIENTS:-8}
STEPS=${STEPS:-5}
BATCH=${BATCH:-32}
CHUNK=${CHUNK:-4}
EXTRA=${EXTRA:-}
PY=${PYTHON:-python3}
mkdir -p "$OUT"

if ! "$PY" -c 'import ml_collections, absl, yaml' 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "device_check: ml_collections, absl-py or PyYAML is missing and no" \
         "wheels are in .whl/ (see README, Benchmarks)." >&2
    exit 2
  fi
fi
"$PY" -c 'import jax; print("device_check:", jax.__version__, jax.devices())'

common=(--config="$CONFIG" --random_data --image_shape="$IMAGE_SHAPE"
        --examples_per_client=$((4 * BATCH))
        --config.federation.num_clients="$CLIENTS"
        --config.federation.clients_per_round="$CLIENTS"
        --config.federation.local_steps="$STEPS"
        --config.federation.batch_size="$BATCH"
        --repeats=2 --rounds_warmup=1)
# shellcheck disable=SC2086
"$PY" launch/bench.py "${common[@]}" $EXTRA --modes=vmap,map,chunked,central \
  --chunk_sizes="$CHUNK" --dtypes=float32,bfloat16 \
  --output="$OUT/modes.json" 2>&1 | tee "$OUT/modes.log"
# shellcheck disable=SC2086
"$PY" launch/bench.py "${common[@]}" $EXTRA --modes=vmap --dtypes=bfloat16 \
  --memory --output="$OUT/memory.json" 2>&1 | tee "$OUT/memory.log"
echo "device_check: wrote $OUT/modes.{json,log} and $OUT/memory.{json,log}"
