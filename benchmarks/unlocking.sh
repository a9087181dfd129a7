#!/usr/bin/env bash
# The unlocking benchmark of docs/performance.md: dkp/dfa through our layer-parallel runtime
# against bp on one device and through torch.distributed.pipelining (GPipe, 1F1B), on 1 and 2
# gloo ranks with one thread each, M = 4 and 8; then the cost model's predictions to 64 ranks.
#
#   bash benchmarks/unlocking.sh [OUT_DIR]     # default docs/performance; 20-22 min on 2 idle cores
#
# Needs an otherwise idle machine (check `uptime`): the ranks share its cores. Step times do not
# depend on pixel values, so every network runs on synthetic 1x28x28 data (Fashion-MNIST's shape).
# 4 short rounds rather than 2 long ones: each world is measured at four times spread over the run,
# so a drifting machine (this VM's speed varies by 10-40 % within minutes) hits every world alike.
set -euo pipefail
out=${1:-docs/performance}
mkdir -p "$out"
data=(--set data.name=synthetic --set "data.synthetic_shape=[1, 28, 28]" --set data.synthetic_size=1024
      --set run.progress=false)
common=(--ranks 1,2 --microbatches 4,8 --steps 10 --warmup 3 --rounds 4)
# conv nets in channels-last (NHWC), the layout oneDNN's kernels prefer: faster for bp too
for model in ${MODELS:-convdeep vit conv2}; do
  layout=$([[ $model == vit ]] && echo false || echo true)
  python -m parallel_dkp bench --config configs/default.toml "${data[@]}" --set "model.name=$model" \
    --set "run.channels_last=$layout" "${common[@]}" --out "$out/unlocking_$model.json"
done
# the prediction tables take the measured link from convdeep's run (skipped when MODELS leaves it out)
if [[ -f "$out/unlocking_convdeep.json" ]]; then
  OMP_NUM_THREADS=1 python benchmarks/cost_model_tables.py --bench "$out/unlocking_convdeep.json" --out "$out"
fi
