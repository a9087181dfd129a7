#!/usr/bin/env bash
# Side by side: 2 CPU ranks bound to their own cores (run.bind_cores=true, the default) or left to
# the OS scheduler (false), alternated ROUNDS times, dkp through our runtime, M = 4, one thread per
# rank. Each run prints its median step (the slowest rank's) of STEPS steps after 3 warm-up steps.
#
#   bash benchmarks/binding.sh [OUT_DIR]     # default docs/performance/binding; ~4 min on 2 idle cores
set -euo pipefail
out=${1:-docs/performance/binding}
mkdir -p "$out"
data=(--set data.name=synthetic --set "data.synthetic_shape=[1, 28, 28]" --set data.synthetic_size=1024
      --set run.progress=false --set parallel.microbatches=4)
for round in $(seq "${ROUNDS:-4}"); do
  for model in vit convdeep; do
    steps=$([[ $model == vit ]] && echo 100 || echo 30)
    layout=$([[ $model == vit ]] && echo false || echo true)
    for bind in true false; do
      OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc-per-node 2 -m parallel_dkp bench \
        --config configs/default.toml "${data[@]}" --set "model.name=$model" --set "run.channels_last=$layout" \
        --set "run.bind_cores=$bind" --rules dkp --steps "$steps" --warmup 3 \
        --out "$out/${model}_bind-${bind}_round${round}.json" > /dev/null
      python -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[2], sys.argv[3], sys.argv[4], \
round(r['by_microbatches']['4']['rules']['dkp']['median_s']*1e3, 1), 'ms')" \
        "$out/${model}_bind-${bind}_round${round}.json" "$model" "bind_cores=$bind" "round=$round"
    done
  done
done
