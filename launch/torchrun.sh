#!/usr/bin/env bash
# One node, one rank per GPU (NCCL), through torchrun.
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: launch/torchrun.sh [parallel-dkp train options...]

Runs `python -m parallel_dkp train` under torchrun on this node, one rank per GPU
(NCCL is picked automatically on CUDA). All arguments go to `train`;
`python -m parallel_dkp train --help` lists them.

Environment:
  NPROC          number of ranks (default: the number of GPUs torch can see,
                 which honours CUDA_VISIBLE_DEVICES)
  RDZV_ENDPOINT  HOST:PORT of the rendezvous (default: torchrun --standalone,
                 a free port on localhost)
  PYTHON         interpreter that has parallel_dkp installed (default: python)

Example:
  launch/torchrun.sh --config configs/<experiment>.toml --set rule.name=dkp
  NPROC=4 launch/torchrun.sh --set data.name=cifar10 --set parallel.microbatches=8

No GPU? launch/cpu_sim.sh runs the same job as CPU ranks with gloo.
USAGE
}

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    usage
    exit 0
fi

PYTHON="${PYTHON:-python}"
if [[ -z "${NPROC:-}" ]]; then
    NPROC="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')"
    if [[ "$NPROC" == "0" ]]; then
        echo "launch/torchrun.sh: torch sees no GPU here; set NPROC=N to launch N ranks anyway," \
             "or use launch/cpu_sim.sh for the CPU simulation" >&2
        exit 2
    fi
fi

if [[ -n "${RDZV_ENDPOINT:-}" ]]; then
    rdzv=(--nnodes 1 --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT")
else
    rdzv=(--standalone)
fi

# torchrun == python -m torch.distributed.run, through $PYTHON to keep the right interpreter.
exec "$PYTHON" -m torch.distributed.run "${rdzv[@]}" --nproc-per-node "$NPROC" -m parallel_dkp train "$@"
