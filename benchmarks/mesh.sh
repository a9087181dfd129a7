#!/usr/bin/env bash
# Stages x replicas on this machine (docs/performance.md, "Stages x replicas"): for each network,
# one rank, 2 pipeline stages, and 1 stage x 2 data-parallel replicas (each replica on a full
# batch), one thread per rank, M = 4; 2 stages x 2 replicas where the machine has 4 cores. The
# JSON also holds the cost model's prediction of every world and its error.
#
#   bash benchmarks/mesh.sh [OUT_DIR]     # default docs/performance; about 6 min on 2 idle cores
#
# Needs an otherwise idle machine (check `uptime`): the ranks share its cores.
set -euo pipefail
out=${1:-docs/performance}
mkdir -p "$out"
data=(--set data.name=synthetic --set "data.synthetic_shape=[1, 28, 28]" --set data.synthetic_size=1024
      --set run.progress=false)
common=(--ranks 1,2 --replicas 2 --microbatches 4 --steps 20 --warmup 3 --rounds 2)
for model in ${MODELS:-convdeep vit}; do
  layout=$([[ $model == vit ]] && echo false || echo true)
  python -m parallel_dkp bench --config configs/default.toml "${data[@]}" --set "model.name=$model" \
    --set "run.channels_last=$layout" "${common[@]}" --out "$out/mesh_$model.json"
done
